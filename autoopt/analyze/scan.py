"""Streaming JSON scanning: a trace file's bytes (gzip decompressed on the fly) cut into
chunks of whole events that decode on their own, in one pass, within autoopt.analyze.limits.

The file is read in blocks; the `traceEvents` array (or the legacy bare list) is cut at
event boundaries found with a fast candidate search (`}` , `{`) that a successful decode
confirms: a wrong cut can never decode, since it leaves brackets unbalanced. When a cut
fails, an exact scanner (`_Structure`: string- and escape-aware bracket depth, numpy per
block) takes over from the last known boundary; it carries its state (inside a string, an
odd run of backslashes, the depth) from block to block, so no byte is scanned twice by it.
The top-level `"traceEvents"` key is found by the same scanner (a `[` opening depth 2 after
`"traceEvents":`), never by re-searching from the start. Each decoded chunk goes to a sink
(autoopt.analyze.table's columns) at once and is dropped, so peak memory is one chunk (or
the document around the events), not the decoded document. Every limit (decompressed bytes,
events, bytes held at once, depth) ends the load with a TraceError that names it.
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

from autoopt.analyze.limits import MAX_DEPTH, Limits, exceeded
from autoopt.errors import TraceError

BLOCK = 32 << 10  # bytes of decoded JSON per chunk (small chunks keep the decoded objects in cache)
_CUT = re.compile(rb"\}\s*,\s*\{")
_SEP = re.compile(rb"[ \t\r\n,]*")
_WS_RUN = re.compile(rb"[ \t\r\n]*")
_WS = b" \t\r\n"
_KEY = b'"traceEvents"'

PathLike = Union[str, Path]

_FIX = "Pass a trace written by torch.profiler (on_trace_ready=tensorboard_trace_handler or export_chrome_trace)."
_DAMAGED = "The file is damaged; re-export the trace."


def _err(path: PathLike, problem: str, fix: str) -> TraceError:
    return TraceError(f"{path}: {problem} {fix}")


# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------
def _blocks(path: Path, size: int, cap: int) -> Iterator[bytes]:
    """The file's (decompressed) bytes a block at a time; a TraceError past `cap` bytes."""
    total = 0
    for b in _raw_blocks(path, size):
        total += len(b)
        if total > cap:
            raise exceeded(path, "it holds more JSON (decompressed)", "trace_bytes", cap)
        yield b


def _raw_blocks(path: Path, size: int) -> Iterator[bytes]:
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
        yield from _gunzip(f, path, size)


def _gunzip(f, path: Path, size: int) -> Iterator[bytes]:
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


class _Structure:
    """The exact scanner: the structural brackets (outside strings) of the bytes fed to it, one
    piece after another, with the state between pieces carried: inside a string or not, whether
    the piece ended in an odd run of backslashes (escaping the next byte), the bracket depth.
    Vectorised per piece; a depth beyond the limit is a TraceError."""

    def __init__(self, path: PathLike, depth: int, max_depth: int) -> None:
        self.path = path
        self.in_str = False
        self.esc = False
        self.depth = depth
        self.max_depth = max_depth

    def feed(self, data: bytes, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(absolute positions, bracket bytes, depth after each) of data's structural brackets;
        positions are base + the offset in data."""
        a = np.frombuffer(data, dtype=np.uint8)
        if a.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64)
        q = np.flatnonzero(a == 34)
        bs = a == 92
        if bs.any() or self.esc:
            q = self._unescaped(a, q, bs)
        br = np.flatnonzero((a == 123) | (a == 125) | (a == 91) | (a == 93))
        if q.size or self.in_str:
            inside = (np.searchsorted(q, br) & 1).astype(bool) ^ self.in_str
            br = br[~inside]
            self.in_str ^= bool(q.size & 1)
        ch = a[br]
        depth = self.depth + np.cumsum(np.where((ch == 123) | (ch == 91), 1, -1))
        if depth.size:
            self.depth = int(depth[-1])
            if int(depth.max()) > self.max_depth:
                raise exceeded(self.path, "its JSON nests deeper", "depth",
                               self.max_depth)
        return br + base, ch, depth

    def _unescaped(self, a: np.ndarray, q: np.ndarray, bs: np.ndarray) -> np.ndarray:
        """The quotes of q that no odd run of backslashes escapes; updates the carried escape."""
        n = a.size
        last_non = np.maximum.accumulate(np.where(bs, -1, np.arange(n, dtype=np.int64)))
        if q.size:
            before = np.maximum(q - 1, 0)
            run = np.where(q > 0, before - last_non[before], 0)
            run += (((q == 0) | (last_non[before] == -1)) & self.esc).astype(np.int64)
            q = q[(run & 1) == 0]
        tail = n - 1 - int(last_non[-1])
        self.esc = bool((tail + (self.esc if last_non[-1] == -1 else 0)) & 1)
        return q


class _Reader:
    """The bytes read so far and not yet decoded (`buf`), refilled a block at a time."""

    def __init__(self, path: Path, block: int, limits: Limits) -> None:
        self.blocks = _blocks(path, block, limits.trace_bytes)
        self.buf = bytearray()
        self.eof = False

    def next_block(self) -> Optional[bytes]:
        if self.eof:
            return None
        try:
            return next(self.blocks)
        except StopIteration:
            self.eof = True
            return None

    def more(self, collapse: bool = False) -> bool:
        """Append the next block to buf; False at the end of the file. `collapse`: a block of
        whitespace only is appended as one space (outside the event array, where it is held)."""
        b = self.next_block()
        if b is None:
            return False
        self.buf += b" " if collapse and not b.strip(_WS) else b
        return True


# ---------------------------------------------------------------------------------------------
# the scanner
# ---------------------------------------------------------------------------------------------
class _Ctx:
    """What every step of one file's scan needs."""

    def __init__(self, path: Path, sink, block: int, limits: Limits) -> None:
        self.path = path
        self.sink = sink
        self.block = block
        self.limits = limits
        self.r = _Reader(path, block, limits)

    def ingest(self, evs: Any) -> None:
        self.sink.ingest(evs if isinstance(evs, list) else [])
        if self.sink.events_total > self.limits.events:
            raise exceeded(self.path, "it holds more events", "events",
                           self.limits.events)

    def held(self, n: int, what: str) -> None:
        """A TraceError when n bytes of `what` would be held at once beyond the limit."""
        if n > self.limits.event_bytes:
            raise exceeded(self.path, f"{what} is larger", "event_bytes",
                           self.limits.event_bytes)

    def truncated(self, extra: str = "") -> TraceError:
        return _err(self.path, f"is truncated: the traceEvents array never closes ({self.sink.events_total} "
                               f"complete events read{extra}).",
                    "The profiler was probably stopped while writing; re-export the trace.")


def scan_events(path: Path, sink, block: int = BLOCK, limits: Optional[Limits] = None) -> dict:
    """Feed the file's events to `sink.ingest(list)`, a chunk at a time, and return the rest of
    the document (its top-level keys but traceEvents; {} for a bare list). `sink.events_total`
    (events ingested so far) goes into the messages about truncated files."""
    c = _Ctx(path, sink, block, limits or Limits.default())
    first = _start(c)
    if first == b"[":
        prefix, pos, depth = None, 1, 1
    else:
        p = _find_key(c)
        if p is None:
            return _whole_document(c)
        prefix = bytes(c.r.buf[:p])
        pos, depth = p + 1, 2
    end = _stream_array(c, pos, depth)
    suffix = _read_rest(c, end + 1, len(prefix or b""))
    return _meta(path, prefix, suffix)


def _start(c: _Ctx) -> bytes:
    """Drop leading whitespace and a byte-order mark; the first byte, `{` or `[`, or a TraceError."""
    r = c.r
    r.more()
    if r.buf[:3] == b"\xef\xbb\xbf":
        del r.buf[:3]
    while True:
        j = _WS_RUN.match(r.buf).end()
        if j < len(r.buf):
            del r.buf[:j]
            break
        r.buf.clear()  # whitespace only so far: never kept, never scanned again
        if not r.more():
            raise _err(c.path, "holds no JSON (only whitespace).", _FIX)
    first = bytes(r.buf[:1])
    if first not in (b"{", b"["):
        raise _err(c.path, f"is not JSON (it starts with {bytes(r.buf[:16])!r}).", _FIX)
    return first


def _find_key(c: _Ctx) -> Optional[int]:
    """The position of the `[` that opens the top-level `"traceEvents": [`, reading on as needed
    (one exact scan of each byte); None when the object ends, or the file does, without it."""
    r = c.r
    sc = _Structure(c.path, 0, c.limits.depth)
    scanned = 0
    while True:
        pb, ch, dd = sc.feed(bytes(r.buf[scanned:]), scanned)
        scanned = len(r.buf)
        for p in pb[(ch == 91) & (dd == 2)].tolist():
            if _is_trace_events_value(r.buf, p):
                return p
        if dd.size and int(dd.min()) <= 0:
            return None  # the top-level object closed
        c.held(len(r.buf), "the JSON before its traceEvents array (its metadata, or the whole file without one)")
        if not r.more(collapse=not sc.in_str):
            return None


def _is_trace_events_value(buf: bytearray, p: int) -> bool:
    """Whether the `[` at p (outside strings, opening depth 2) follows `"traceEvents":`."""
    k = _prev_nonws(buf, p)
    if k < 0 or buf[k] != 58:  # ':'
        return False
    k = _prev_nonws(buf, k)
    q = k - len(_KEY) + 1
    if q < 0 or buf[q:k + 1] != _KEY:
        return False
    j = q - 1
    while j >= 0 and buf[j] == 92:  # an escaped quote does not open the key
        j -= 1
    return (q - 1 - j) % 2 == 0


def _prev_nonws(buf: bytearray, p: int) -> int:
    """The position of the last non-whitespace byte before p (-1 if none), in growing windows."""
    lo, w = p, 64
    while lo > 0:
        start = max(0, lo - w)
        seg = bytes(buf[start:lo]).rstrip(_WS)
        if seg:
            return start + len(seg) - 1
        lo, w = start, w * 2
    return -1


def _read_rest(c: _Ctx, start: int, held: int) -> bytes:
    """The bytes from start to the end of the file (runs of whitespace blocks kept as one space)."""
    r = c.r
    del r.buf[:start]
    while True:
        c.held(held + len(r.buf), "the JSON around its traceEvents array (the trace's metadata)")
        if not r.more(collapse=True):
            break
    out = bytes(r.buf)
    r.buf = bytearray()
    return out


def _whole_document(c: _Ctx) -> dict:
    """Decode the whole document (read to its end, within the limits); its traceEvents go to the
    sink in slices."""
    r = c.r
    path = c.path
    obj = _decode(c, _read_rest(c, 0, 0), "is not valid JSON ({}); the file may be truncated.",
                  "Re-export the trace from torch.profiler.")
    if isinstance(obj, dict) and isinstance(obj.get("traceEvents"), list):
        r.buf = bytearray()
        evs = obj.pop("traceEvents")
        if len(evs) > c.limits.events:
            raise exceeded(path, "it holds more events", "events", c.limits.events)
        for j in range(0, len(evs), 50000):
            c.ingest(evs[j:j + 50000])
        return obj
    raise _err(path, f"is {_describe_non_trace(obj)}.", _FIX)


def _decode(c: _Ctx, data: bytes, problem: str, fix: str) -> Any:
    """_loads, with its errors as TraceErrors (problem's {} is the decoder's message)."""
    try:
        return _loads(data)
    except RecursionError as e:
        raise exceeded(c.path, "its JSON nests deeper", "depth", c.limits.depth) from e
    except ValueError as e:
        raise _err(c.path, problem.format(e), fix) from e


def _stream_array(c: _Ctx, pos: int, depth: int) -> int:
    """Decode the event array from buf[pos] (inside it, at bracket depth `depth`) to its `]`,
    a chunk at a time; returns the position of the `]` in buf."""
    r, buf, block = c.r, c.r.buf, c.block
    while True:
        pos = _skip_separators(c, pos)
        ch = buf[pos:pos + 1]
        if ch == b"]":
            return pos
        if ch != b"{":
            raise _err(c.path, f"has an unexpected {bytes(ch)!r} inside traceEvents (after "
                               f"{c.sink.events_total} events).", _DAMAGED)
        while len(buf) - pos < block and r.more():
            pass
        cut = _last_cut(buf, pos)
        if cut is not None:
            evs = _loads_between(buf, pos, cut)
            if evs is not None:
                c.ingest(evs)
                del evs
                del buf[:cut + 1]
                pos = 0
                continue
        pos = _exact_chunk(c, pos, depth)


def _skip_separators(c: _Ctx, pos: int) -> int:
    """The position of the next non-separator byte (whitespace, commas) from pos, reading on as
    needed; separators already passed are dropped from the buffer, never scanned again."""
    buf = c.r.buf
    while True:
        j = _SEP.match(buf, pos).end()
        if j < len(buf):
            return j
        del buf[:]
        pos = 0
        if not c.r.more():
            raise c.truncated()


def _exact_chunk(c: _Ctx, pos: int, depth: int) -> int:
    """The exact path from the known boundary pos (an event's `{`): the exact scanner reads on,
    each new byte once, until events end there; they go to the sink. Returns where to go on:
    0 after a chunk."""
    r, buf = c.r, c.r.buf
    sc = _Structure(c.path, depth, c.limits.depth)
    scanned = pos
    while True:
        pb, ch, dd = sc.feed(bytes(buf[scanned:]), scanned)
        scanned = len(buf)
        out = np.flatnonzero(dd < depth)
        closes = pb[(ch == 125) & (dd == depth)]
        if out.size:
            closes = closes[closes < pb[out[0]]]
            if closes.size == 0:
                raise _err(c.path, f"has unbalanced brackets inside traceEvents (after {c.sink.events_total} "
                                   "events).", _DAMAGED)
        if closes.size:
            last = int(closes[-1])
            evs = _decode(c, b"[" + bytes(buf[pos:last + 1]) + b"]", "is not valid JSON inside traceEvents ({}).",
                          _DAMAGED)
            c.ingest(evs)
            del evs
            del buf[:last + 1]
            return 0
        c.held(len(buf) - pos, f"one event (after {c.sink.events_total} events)")
        if not r.more():
            raise c.truncated(f", an unfinished event of {len(buf) - pos} bytes at the end")


def _meta(path: Path, prefix: Optional[bytes], suffix: bytes) -> dict:
    """The document around the event array (prefix + [] + suffix) decoded, without traceEvents."""
    meta: dict = {}
    if prefix is not None:
        try:
            obj = _loads(prefix + b"[]" + suffix)
        except RecursionError as e:
            raise exceeded(path, "its JSON nests deeper", "depth", MAX_DEPTH) from e
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
    for _ in range(64):
        j = buf.rfind(b"{", pos, j)
        if j <= pos:
            return None
        seg = bytes(buf[max(pos, j - 64):j]).rstrip(_WS)  # a bounded look back: no per-byte loop
        if seg.endswith(b","):
            seg = seg[:-1].rstrip(_WS)
            if seg.endswith(b"}"):
                return max(pos, j - 64) + len(seg) - 1
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
    """orjson, or json for what Kineto has written that orjson refuses (raw control characters,
    NaN, bare N/A). A RecursionError (JSON nested too deeply for json) goes to the caller."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
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
