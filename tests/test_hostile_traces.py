"""Hostile traces: files built to take time or memory out of proportion to their size.

Every file is generated here (no committed blobs) and analysed by `python -m autoopt analyze`
in a subprocess under an address-space limit (RLIMIT_AS 1.5 GB) and a wall-clock timeout: each
case must end in time with exit 0 (analysed) or 2 (one paragraph naming the file and the limit),
never a traceback, never a numpy warning. Gzip bombs are written by repeating one
fully-flushed deflate piece, so a 10 GiB stream costs ~10 MB on disk and no time to build (the
CRC of those is not computed: every bomb ends at a limit long before the trailer).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AS_LIMIT = int(1.5 * (1 << 30))
WALL_S = 30.0
GiB, MiB = 1 << 30, 1 << 20

EVENT = (b'{"ph":"X","cat":"cpu_op","name":"aten::add","pid":1,"tid":1,"ts":%d,"dur":1}')
STEP = b'{"ph":"X","cat":"user_annotation","name":"ProfilerStep#1","pid":1,"tid":1,"ts":0,"dur":100}'


def _events(n: int = 3) -> bytes:
    return b",".join([STEP] + [EVENT % (10 + i) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _gzip_pieces(path: Path, parts: list[tuple[bytes, int]]) -> int:
    """A .json.gz whose content is each (bytes, times) repeated, without building it: each
    part is deflated once (full flush: no reference to what came before) and its compressed
    piece written `times` times. Returns the decompressed size."""
    total = 0
    crc = 0
    checked = sum(len(data) * times for data, times in parts) <= 512 * MiB  # else the CRC is left 0
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header, no name
        for data, times in parts:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            piece = c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)
            for _ in range(times):
                f.write(piece)
                crc = zlib.crc32(data, crc) if checked else 0
            total += len(data) * times
        f.write(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # the final (empty) block
        f.write(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    return total


def _gz(path: Path, data: bytes) -> Path:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + 15)
    path.write_bytes(c.compress(data) + c.flush())
    return path


def _bomb(path: Path, head: bytes, filler: bytes, size: int, tail: bytes) -> Path:
    """head + filler repeated to `size` bytes + tail, gzip-compressed (about size / 1000 on disk)."""
    unit = filler * max(1, MiB // len(filler))
    _gzip_pieces(path, [(head, 1), (unit, size // len(unit)), (tail, 1)])
    return path


# ---------------------------------------------------------------------------------------------
# the cases: name -> (writer(dir) -> path, seconds allowed, exit codes allowed, text expected on stderr)
# ---------------------------------------------------------------------------------------------
def decoys_nested_in_metadata(d: Path) -> Path:
    n = 1_000_000  # a million {"traceEvents":[]} objects before the real key: ~50 KB compressed
    body = b'{"meta":[' + b",".join([b'{"traceEvents":[]}'] * n) + b'],"traceEvents":[' + _events() + b"]}"
    return _gz(d / "decoys.json.gz", body)


def decoys_in_strings(d: Path) -> Path:
    s = b'\\"traceEvents\\":[' * 200_000
    body = b'{"s":"' + s + b'","traceEvents":[' + _events() + b"]}"
    return _gz(d / "decoy_strings.json.gz", body)


def decoys_chained(d: Path) -> Path:
    n = 200_000  # {"traceEvents":[], "x": {"traceEvents":[], "x": ...}}: beyond the depth limit
    body = b'{"x":' + b'{"traceEvents":[],"x":' * n + b"1" + b"}" * n + b',"traceEvents":[' + _events() + b"]}"
    return _gz(d / "decoy_chain.json.gz", body)


def whitespace_file(d: Path) -> Path:
    return _bomb(d / "spaces.json.gz", b"", b" ", 20 * MiB, b" ")


def whitespace_everywhere(d: Path) -> Path:
    ws = b" \n\t" * (3 * MiB)
    body = ws + b'{' + ws + b'"traceEvents"' + ws + b":" + ws + b"[" + ws + STEP + ws + b"," + ws + EVENT % 5 + ws \
        + b"]" + ws + b"}" + ws
    return _gz(d / "ws.json.gz", body)


def escaped_quotes(d: Path) -> Path:
    # 100 MB of escaped quotes in one event name
    return _bomb(d / "escapes.json.gz", b'{"traceEvents":[' + STEP + b',{"ph":"X","name":"', b'\\"',
                 100 * MiB, b'","pid":1,"tid":1,"ts":5,"dur":1}]}')


def backslash_runs(d: Path) -> Path:
    # runs of backslashes of every parity, across block boundaries, before quotes
    names = b",".join(b'{"ph":"X","cat":"cpu_op","name":"%s\\"x","pid":1,"tid":1,"ts":%d,"dur":1}'
                      % (b"\\\\" * (i % 40000), 10 + i) for i in range(0, 400000, 997))
    return _gz(d / "bs.json.gz", b'{"traceEvents":[' + STEP + b"," + names + b"]}")


def deep_event(d: Path) -> Path:
    n = 100_000
    ev = b'{"ph":"X","name":"x","pid":1,"tid":1,"ts":5,"dur":1,"args":' + b"[" * n + b"]" * n + b"}"
    return _gz(d / "deep_event.json.gz", b'{"traceEvents":[' + STEP + b"," + ev + b"]}")


def deep_metadata(d: Path) -> Path:
    n = 100_000
    return _gz(d / "deep_meta.json.gz", b'{"m":' + b"[" * n + b"]" * n + b',"traceEvents":[' + _events() + b"]}")


def deep_after(d: Path) -> Path:
    n = 100_000
    return _gz(d / "deep_after.json.gz", b'{"traceEvents":[' + _events() + b'],"m":' + b'{"a":' * n + b"1"
               + b"}" * n + b"}")


def deep_bare(d: Path) -> Path:
    return _gz(d / "deep_bare.json.gz", b"[" * 100_000 + b"]" * 100_000)


def nested_spans(d: Path) -> Path:
    n = 100_000  # properly nested: each span inside the one before
    evs = [STEP.replace(b'"dur":100', b'"dur":%d' % (4 * n))]
    evs += [b'{"ph":"X","cat":"cpu_op","name":"op%d","pid":1,"tid":1,"ts":%d,"dur":%d}' % (i % 7, 1 + i, 2 * n - 2 * i)
            for i in range(n)]
    return _gz(d / "nested.json.gz", b'{"traceEvents":[' + b",".join(evs) + b"]}")


def bomb_string_before(d: Path) -> Path:
    return _bomb(d / "bomb_before.json.gz", b'{"a":"', b"x", 10 * GiB, b'","traceEvents":[' + _events() + b"]}")


def bomb_string_after(d: Path) -> Path:
    return _bomb(d / "bomb_after.json.gz", b'{"traceEvents":[' + _events() + b'],"a":"', b"x", 10 * GiB, b'"}')


def bomb_event_name(d: Path) -> Path:
    return _bomb(d / "bomb_name.json.gz", b'{"traceEvents":[' + STEP + b',{"ph":"X","name":"', b"y", 10 * GiB,
                 b'","pid":1,"tid":1,"ts":5,"dur":1}]}')


def bomb_events(d: Path) -> Path:
    ev = b'{"ph":"X","cat":"cpu_op","name":"aten::add","pid":1,"tid":1,"ts":7,"dur":1},'
    return _bomb(d / "bomb_events.json.gz", b'{"traceEvents":[' + STEP + b",", ev, 1 * GiB, EVENT % 9 + b"]}")  # ~15M events


def bomb_whitespace(d: Path) -> Path:
    return _bomb(d / "bomb_ws.json.gz", b'{"traceEvents":[' + STEP + b",", b" ", 10 * GiB, EVENT % 9 + b"]}")


def non_finite(d: Path) -> Path:
    huge = b'{"ph":"X","cat":"cpu_op","name":"aten::mm","pid":1,"tid":1,"ts":%d,"dur":1e308}'
    evs = [STEP.replace(b'"dur":100', b'"dur":1e308'), EVENT % 10, huge % 20, huge % 21,  # sums overflow
           b'{"ph":"X","cat":"cpu_op","name":"aten::mm","pid":1,"tid":1,"ts":20,"dur":NaN}',
           b'{"ph":"X","cat":"cpu_op","name":"aten::mul","pid":1,"tid":1,"ts":Infinity,"dur":1}',
           b'{"ph":"X","cat":"cpu_op","name":"aten::div","pid":1,"tid":1,"ts":30,"dur":1e999}',
           b'{"ph":"X","cat":"kernel","name":"k","pid":0,"tid":7,"ts":40,"dur":-Infinity,"args":{"device":0}}']
    p = d / "nonfinite.json"
    p.write_bytes(b'{"traceEvents":[' + b",".join(evs) + b"]}")
    return p


# name -> (writer, seconds allowed, exit codes, text on stderr (exit 2) or None)
CASES = {
    "decoys_nested_in_metadata": (decoys_nested_in_metadata, 15, {0}, None),
    "decoys_in_strings": (decoys_in_strings, 15, {0}, None),
    "decoys_chained": (decoys_chained, 15, {2}, "nests deeper"),
    "whitespace_file": (whitespace_file, 10, {2}, "only whitespace"),
    "whitespace_everywhere": (whitespace_everywhere, 15, {0}, None),
    "escaped_quotes": (escaped_quotes, WALL_S, {0, 2}, None),
    "backslash_runs": (backslash_runs, 15, {0}, None),
    "deep_event": (deep_event, 10, {2}, "nests deeper"),
    "deep_metadata": (deep_metadata, 10, {2}, "nests deeper"),
    "deep_after": (deep_after, 10, {2}, "nests deeper"),
    "deep_bare": (deep_bare, 10, {2}, None),
    "nested_spans": (nested_spans, 15, {0}, None),
    # the 10 GiB-inflating ~10 MB files: a limit ends each within seconds
    "bomb_string_before": (bomb_string_before, 5, {2}, "--max-event-bytes"),
    "bomb_string_after": (bomb_string_after, 5, {2}, "--max-event-bytes"),
    "bomb_event_name": (bomb_event_name, 5, {2}, "--max-event-bytes"),
    "bomb_events": (bomb_events, WALL_S, {2}, "--max-events"),
    "bomb_whitespace": (bomb_whitespace, WALL_S, {2}, "--max-trace-bytes"),
    "non_finite": (non_finite, 15, {0, 2}, None),
}
SLOW = {"bomb_events", "bomb_whitespace", "escaped_quotes"}


def _limit_memory() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_analyze(path: Path, *args: str, timeout: float = WALL_S) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONWARNINGS="default")
    t = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "autoopt", "analyze", str(path), *args], capture_output=True,
                           timeout=timeout, env=env, cwd=str(ROOT), preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name}: still running after {timeout:.0f} s")
    return p, time.monotonic() - t


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_hostile_trace_ends_in_time_and_memory(name, tmp_path):
    write, budget, codes, expected = CASES[name]
    path = write(tmp_path)
    assert path.stat().st_size < 16 * MiB  # small on disk, whatever it inflates to
    p, took = run_analyze(path, "--json", timeout=max(budget * 2, 10))
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err and "Warning" not in err, err[-2000:]
    assert p.returncode in codes, (p.returncode, err[-2000:])
    assert took < budget, f"{name}: {took:.1f} s (allowed {budget} s)"
    if p.returncode == 2:
        assert str(path) in err and (expected is None or expected in err), err
    else:
        json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON output"))


def test_non_finite_numbers_become_null_with_a_note(tmp_path):
    p, _ = run_analyze(non_finite(tmp_path), "--json")
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON output"))
    notes = out["notes"] + [n for t in out["traces"] for n in t["notes"]]
    assert any("non-finite" in n and "null" in n for n in notes), notes
    assert b"Warning" not in p.stderr


def test_limits_are_flags_and_name_the_file(tmp_path):
    path = decoys_nested_in_metadata(tmp_path)
    p, _ = run_analyze(path, "--max-event-bytes", "64K")
    err = p.stderr.decode()
    assert p.returncode == 2 and str(path) in err and "--max-event-bytes" in err and "64 KiB" in err, err
    p, _ = run_analyze(path, "--max-trace-bytes", "1M")
    assert p.returncode == 2 and "--max-trace-bytes" in p.stderr.decode()
    p, _ = run_analyze(path, "--max-events", "2")
    assert p.returncode == 2 and "--max-events" in p.stderr.decode()
    p, _ = run_analyze(path, "--max-events", "lots")
    assert p.returncode == 2 and "not a count" in p.stderr.decode()


def test_sizes_and_counts_parse():
    from autoopt.analyze.limits import GiB, MiB, Limits, parse_count, parse_size

    assert parse_size("2G") == 2 * GiB and parse_size("500M") == 500 * MiB and parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("64k") == 64 << 10 and parse_size("123") == 123 and parse_size("2gb") == 2 * GiB
    assert parse_count("5M") == 5_000_000 and parse_count("200k") == 200_000 and parse_count("7") == 7
    for bad in ("", "x", "-1", "0", "2X", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
    small, big = Limits.default(256 * MiB), Limits.default(1 << 40)
    assert small.trace_bytes == GiB and small.events == 1_000_000 and small.event_bytes == 16 * MiB
    assert big.trace_bytes == 32 * GiB and big.events == 200_000_000 and big.event_bytes == GiB


def test_exact_scanner_agrees_with_json_at_any_block_size(tmp_path):
    """Names full of quotes, backslashes and brackets, cut at every kind of block boundary: the
    exact scanner (state carried across blocks) decodes what json decodes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from autoopt.analyze.loader import load_trace

    @settings(max_examples=60, deadline=None)
    @given(names=st.lists(st.text(alphabet='\\"[]{},: ab', min_size=0, max_size=40), min_size=1, max_size=12),
           block=st.integers(min_value=1, max_value=64), padding=st.integers(min_value=0, max_value=300))
    def check(names, block, padding):
        evs = [json.loads(STEP)] + [{"ph": "X", "cat": "cpu_op", "name": n, "pid": 1, "tid": 1, "ts": 10 + i,
                                     "dur": 1, "args": {"pad": "\\" * padding}} for i, n in enumerate(names)]
        p = tmp_path / "t.json"
        p.write_text(json.dumps({"m": {"s": '"traceEvents":[' * 3}, "traceEvents": evs, "after": ["]"]}))
        tr = load_trace(p, block=block)
        assert tr.n == len(evs) and sorted(tr.names) == sorted(set(e["name"] for e in evs))
        assert tr.meta == {"m": {"s": '"traceEvents":[' * 3}, "after": ["]"]}

    check()


def test_running_out_of_memory_is_a_trace_error(monkeypatch, tmp_path):
    """Within the limits memory can still run out (a smaller machine than the limits assume):
    one paragraph naming the file and the limits to lower, not an internal error."""
    from autoopt.analyze import core
    from autoopt.errors import TraceError

    def no_memory(path, limits=None):
        raise MemoryError

    monkeypatch.setattr(core, "load_trace", no_memory)
    p = non_finite(tmp_path)
    with pytest.raises(TraceError) as e:
        core.analyze_paths([p])
    assert str(p) in e.value.message and "--max-events" in e.value.message
