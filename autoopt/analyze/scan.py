"""Streaming JSON scanning: a trace file's bytes (gzip decompressed on the fly) cut into
chunks of whole events that decode on their own.

The file is read in blocks; the `traceEvents` array (or the legacy bare list) is cut at
event boundaries found with a fast candidate search (`}` , `{`) that a successful decode
confirms: a wrong cut can never decode, since it leaves brackets unbalanced. When a cut
fails, an exact numpy scanner (string- and escape-aware bracket depth) from the last
known boundary takes over. Each decoded chunk goes to a sink (autoopt.analyze.table's
columns) at once and is dropped, so peak memory is one chunk, not the decoded document.
"""
from __future__ import annotations

import collections
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import orjson

from autoopt.errors import TraceError

BLOCK = 32 << 10  # bytes of decoded JSON per chunk (small chunks keep the decoded objects in cache)
_CUT = re.compile(rb"\}\s*,\s*\{")
_KEY = re.compile(rb'"traceEvents"\s*:\s*\[')
_WS = b" \t\r\n"

PathLike = Union[str, Path]

_FIX = "Pass a trace written by torch.profiler (on_trace_ready=tensorboard_trace_handler or export_chrome_trace)."


def _err(path: PathLike, problem: str, fix: str) -> TraceError:
    return TraceError(f"{path}: {problem} {fix}")


# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------
def _blocks(path: Path, size: int = BLOCK) -> Iterator[bytes]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _err(path, f"cannot be opened ({e.strerror}).",
                   "Check the path and the file's permissions.") from e
    with f:
        head = f.read(2)
        f.seek(0)
        if head != b"\x1f\x8b":
            while True:
                b = f.read(size)
                if not b:
                    return
                yield b
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        raw = b""
        try:
            while True:
                if not raw:
                    raw = f.read(max(size // 8, 1 << 16))
                    if not raw:
                        break
                out = d.decompress(raw, size)
                raw = d.unconsumed_tail
                if out:
                    yield out
                if d.eof:
                    rest = d.unused_data + raw
                    raw = rest.lstrip(b"\0")
                    if raw[:2] == b"\x1f\x8b":  # another gzip member
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        continue
                    if raw:
                        raise _err(path, "has data after the end of its gzip stream.",
                                   "Re-export the trace, or decompress it and pass the .json.")
                    return
            tail = d.flush()
            if tail:
                yield tail
            if not d.eof:
                raise _err(path, "is a truncated gzip file (the compressed stream ends early).",
                           "The profiler was probably stopped while writing; re-export the trace.")
        except zlib.error as e:
            raise _err(path, f"is not a valid gzip file ({e}).",
                       "Pass the original .json or .json.gz written by torch.profiler.") from e


def _exact_scan(buf: bytes, start: int, depth0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Structural brackets of buf[start:], outside strings. Returns (positions, chars, depth after
    each bracket) for a scan that starts outside any string at bracket depth `depth0`."""
    a = np.frombuffer(buf, dtype=np.uint8)[start:]
    quotes = np.flatnonzero(a == 34)
    if quotes.size:
        prev = quotes[quotes > 0]
        esc_cand = prev[a[prev - 1] == 92]
        if esc_cand.size:
            escaped = []
            for q in esc_cand.tolist():
                k = q - 1
                while k >= 0 and a[k] == 92:
                    k -= 1
                if (q - 1 - k) % 2 == 1:
                    escaped.append(q)
            if escaped:
                quotes = np.setdiff1d(quotes, np.asarray(escaped, dtype=quotes.dtype), assume_unique=True)
    br = np.flatnonzero((a == 123) | (a == 125) | (a == 91) | (a == 93))
    if quotes.size:
        br = br[(np.searchsorted(quotes, br) & 1) == 0]
    ch = a[br]
    delta = np.where((ch == 123) | (ch == 91), 1, -1)
    depth = depth0 + np.cumsum(delta)
    return br + start, ch, depth


# ---------------------------------------------------------------------------------------------
# the scanner
# ---------------------------------------------------------------------------------------------
class _Reader:
    """The bytes read so far and not yet decoded (`buf`), refilled a block at a time."""

    def __init__(self, path: Path, block: int) -> None:
        self.blocks = _blocks(path, block)
        self.buf = bytearray()
        self.eof = False

    def more(self) -> bool:
        """Append the next block to buf; False at the end of the file."""
        if self.eof:
            return False
        try:
            b = next(self.blocks)
        except StopIteration:
            self.eof = True
            return False
        self.buf += b
        return True


def scan_events(path: Path, sink, block: int = BLOCK) -> dict:
    """Feed the file's events to `sink.ingest(list)`, a chunk at a time, and return the rest of
    the document (its top-level keys but traceEvents; {} for a bare list). `sink.events_total`
    (events ingested so far) goes into the messages about truncated files."""
    r = _Reader(path, block)
    first = _start(r, path)
    if first == b"[":
        prefix, pos, depth = None, 1, 1
    else:
        m = _find_key(r)
        if m is None:
            return _whole_document(r, path, sink)
        prefix = bytes(r.buf[:m.end() - 1])
        pos, depth = m.end(), 2
    suffix = _stream_array(r, path, sink, pos, depth, block)
    return _meta(path, prefix, suffix)


def _start(r: _Reader, path: Path) -> bytes:
    """Drop leading whitespace and a byte-order mark; the first byte, `{` or `[`, or a TraceError."""
    while not r.buf.strip(_WS) and r.more():
        pass
    stripped = bytes(r.buf).lstrip(_WS + b"\xef\xbb\xbf")
    if not stripped:
        raise _err(path, "holds no JSON (only whitespace).", _FIX)
    first = stripped[:1]
    if first not in (b"{", b"["):
        raise _err(path, f"is not JSON (it starts with {stripped[:16]!r}).", _FIX)
    r.buf = bytearray(stripped)
    return first


def _find_key(r: _Reader):
    """The match of `"traceEvents": [` at the top level of the object, reading on as needed;
    None when the key is not near the top (or not there at all)."""
    buf = r.buf
    m = None
    searched = 0
    while True:
        m = _KEY.search(buf, max(0, searched - 32))
        while m is not None:
            pb, _, dd = _exact_scan(bytes(buf[:m.start()]), 0, 0)
            if (int(dd[-1]) if dd.size else 0) == 1 and buf[m.start() - 1:m.start()] != b"\\":
                break
            m = _KEY.search(buf, m.end())
        if m is not None:
            break
        searched = len(buf)
        if len(buf) > (256 << 20):
            # the key is not near the top: decode the document as a whole
            while r.more():
                pass
            break
        grow = len(buf)
        while len(buf) < 2 * grow and r.more():
            pass
        if len(buf) == grow:
            break
    return m


def _whole_document(r: _Reader, path: Path, sink) -> dict:
    """Decode the whole (already read) document; its traceEvents go to sink in slices."""
    try:
        obj = _loads(bytes(r.buf))
    except ValueError as e:
        raise _err(path, f"is not valid JSON ({e}); the file may be truncated.",
                   "Re-export the trace from torch.profiler.") from e
    if isinstance(obj, dict) and isinstance(obj.get("traceEvents"), list):
        r.buf = bytearray()
        evs = obj.pop("traceEvents")
        for j in range(0, len(evs), 50000):
            sink.ingest(evs[j:j + 50000])
        return obj
    raise _err(path, f"is {_describe_non_trace(obj)}.", _FIX)


def _stream_array(r: _Reader, path: Path, sink, pos: int, depth: int, block: int) -> bytes:
    """Decode the event array from buf[pos] (inside it, at bracket depth `depth`) to its `]`,
    a chunk at a time; returns the bytes after the `]`."""
    buf = r.buf
    while True:
        pos = _skip_separators(r, path, sink, pos)
        c = buf[pos:pos + 1]
        if c == b"]":
            while r.more():
                pass
            return bytes(buf[pos + 1:])
        if c != b"{":
            raise _err(path, f"has an unexpected {c!r} inside traceEvents (byte {pos} of a chunk).",
                       "The file is damaged; re-export the trace.")
        while len(buf) - pos < block and r.more():
            pass
        cut = _last_cut(buf, pos)
        if cut is not None:
            evs = _loads_between(buf, pos, cut)
            if evs is not None:
                sink.ingest(evs)
                del evs
                del buf[:cut + 1]
                pos = 0
                continue
        elif not r.eof and len(buf) - pos < 256 * block:
            r.more()  # an event larger than a block: read on until a boundary shows up
            continue
        pos = _exact_chunk(r, path, sink, pos, depth)


def _skip_separators(r: _Reader, path: Path, sink, pos: int) -> int:
    """The position of the next non-separator byte (whitespace, commas) from pos, reading on as needed."""
    buf = r.buf
    while True:
        j = pos
        ln = len(buf)
        while j < ln and buf[j] in b" \t\r\n,":
            j += 1
        pos = j
        if j < ln:
            return pos
        if not r.more():
            raise _err(path, f"is truncated: the traceEvents array never closes ({sink.events_total} "
                             "complete events read).",
                       "The profiler was probably stopped while writing; re-export the trace.")


def _exact_chunk(r: _Reader, path: Path, sink, pos: int, depth: int) -> int:
    """The exact path: the complete events (and perhaps the array's end) from the known boundary
    pos go to sink. Returns where to go on: 0 after a chunk, the `]` when the array ends there,
    pos after reading more."""
    buf = r.buf
    pb, ch, dd = _exact_scan(buf, pos, depth)
    closes = pb[(ch == 125) & (dd == depth)]
    ends = pb[(ch == 93) & (dd == depth - 1)]
    if ends.size:
        closes = closes[closes < ends[0]]
    if closes.size == 0:
        if ends.size:
            return int(ends[0])
        grow = len(buf)
        while len(buf) < 2 * grow and r.more():  # geometric growth: no quadratic rescans
            pass
        if len(buf) == grow:
            raise _err(path, f"is truncated: the traceEvents array never closes ({sink.events_total} "
                             f"complete events read, an unfinished event of {len(buf) - pos} bytes at the end).",
                       "The profiler was probably stopped while writing; re-export the trace.")
        return pos
    last = int(closes[-1])
    try:
        evs = _loads(b"[" + bytes(buf[pos:last + 1]) + b"]")
    except ValueError as e:
        raise _err(path, f"is not valid JSON inside traceEvents ({e}).",
                   "The file is damaged; re-export the trace.") from e
    sink.ingest(evs if isinstance(evs, list) else [])
    del evs
    del buf[:last + 1]
    return 0


def _meta(path: Path, prefix: Optional[bytes], suffix: bytes) -> dict:
    """The document around the event array (prefix + [] + suffix) decoded, without traceEvents."""
    meta: dict = {}
    if prefix is not None:
        try:
            obj = _loads(prefix + b"[]" + suffix)
        except ValueError as e:
            raise _err(path, f"has invalid JSON around its traceEvents array ({e}); it may be truncated.",
                       "Re-export the trace from torch.profiler.") from e
        if isinstance(obj, dict):
            obj.pop("traceEvents", None)
            meta = obj
    elif suffix.strip(_WS):
        raise _err(path, "has data after the end of its event list.", "The file is damaged; re-export it.")
    return meta


def _last_cut(buf, pos: int) -> Optional[int]:
    """Position of the `}` of the last candidate event boundary (`}` , `{`) in buf[pos:], or None.
    A candidate is only a guess (it could sit inside a string); the decode that follows checks it."""
    j = len(buf)
    ws = b" \t\r\n"
    for _ in range(64):
        j = buf.rfind(b"{", pos, j)
        if j <= pos:
            return None
        k = j - 1
        while k > pos and buf[k] in ws:
            k -= 1
        if buf[k] == 44:  # ','
            k -= 1
            while k > pos and buf[k] in ws:
                k -= 1
            if buf[k] == 125:  # '}'
                return k
    last = collections.deque(_CUT.finditer(buf, pos), maxlen=1)  # the last separator
    return last[0].start() if last else None


def _loads_between(buf: bytearray, pos: int, cut: int) -> Optional[list]:
    """Decode the events in buf[pos:cut+1] without copying them: the separator bytes just
    before and after become '[' and ']' for the duration of the call."""
    if pos == 0 or cut + 1 >= len(buf):
        try:
            return orjson.loads(b"[" + bytes(buf[pos:cut + 1]) + b"]")
        except orjson.JSONDecodeError:
            return None
    a, b = buf[pos - 1], buf[cut + 1]
    buf[pos - 1] = 91
    buf[cut + 1] = 93
    try:
        with memoryview(buf) as mv:
            return orjson.loads(mv[pos - 1:cut + 2])
    except orjson.JSONDecodeError:
        return None
    finally:
        buf[pos - 1], buf[cut + 1] = a, b


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    # Kineto has written raw control characters, NaN and bare N/A: accept what json accepts
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return json.loads(re.sub(r'(?<!")N/A(?!")', '"N/A"', text), strict=False)


def _describe_non_trace(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = set(obj)
        if "nodes" in keys and ("schema" in keys or "pid" in keys):
            return "a PyTorch execution trace (ExecutionTraceObserver), not a Kineto trace"
        if "segments" in keys or "device_traces" in keys:
            return "a CUDA memory snapshot (torch.cuda.memory._snapshot), not a Kineto trace"
        if {"allocated", "reserved"} & keys or "timestamps" in keys:
            return "a memory-timeline dump, not a Kineto trace"
        shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
        return f"a JSON object without a traceEvents list (top-level keys: {shown})"
    if isinstance(obj, list):
        return "a JSON list whose items are not trace events"
    return f"a JSON {type(obj).__name__}, not a trace"
