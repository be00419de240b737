"""Property-based tests of the trace parser: whatever the bytes, the analysis returns a result
or raises TraceError (exit 2, one paragraph) -- never another exception, never a hang."""
from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoopt.analyze import analyze_paths
from autoopt.analyze.loader import load_trace
from autoopt.errors import TraceError

DATA = Path(__file__).resolve().parent / "data" / "traces"
GOOD = (DATA / "pt2_dataloader_sync.json").read_bytes()
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(content: bytes, suffix: str = ".json"):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"t{suffix}"
        p.write_bytes(content)
        try:
            r = analyze_paths([p])
        except TraceError as e:
            assert str(p) in e.message and "\n" not in e.message
            return None
        json.dumps(r)  # the result is plain JSON
        return r


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(GOOD)),
       edits=st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(0, 255)),
                      max_size=4))
def test_truncated_or_corrupted_bytes(cut, edits):
    b = bytearray(GOOD[:cut])
    for pos, val in edits:
        if pos < len(b):
            b[pos] = val
    _run(bytes(b))


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=400), flip=st.integers(min_value=0, max_value=399))
def test_corrupted_gzip(cut, flip):
    z = bytearray(gzip.compress(GOOD))
    if flip < len(z):
        z[flip] ^= 0x5A
    _run(bytes(z[: len(z) - cut]), ".json.gz")


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.sampled_from(["X", "i", "M", "s", "f", "kernel", "cpu_op",
                                                           "cuda_runtime", "gpu_memcpy", "user_annotation",
                                                           "ProfilerStep#1", "[memory]", "Kernel", "Operator"]))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
_args = st.dictionaries(st.sampled_from(["External id", "external id", "correlation", "device", "stream",
                                          "blocks per SM", "est. achieved occupancy %", "grid", "bytes",
                                          "Input type", "Call stack", "Bytes", "Total Allocated", "Device Type",
                                          "Device Id"]), _value, max_size=5)
_event = st.fixed_dictionaries(
    {"ph": st.sampled_from(["X", "X", "X", "i", "M", "s", "f", "B"])},
    optional={"cat": st.one_of(st.sampled_from(["kernel", "cpu_op", "cuda_runtime", "gpu_memcpy", "gpu_memset",
                                                "user_annotation", "gpu_user_annotation", "python_function",
                                                "Kernel", "Operator", "Runtime", "Memcpy", "Trace"]), _scalar),
              "name": st.one_of(st.sampled_from(["ProfilerStep#3", "aten::mm", "aten::item", "cudaLaunchKernel",
                                                 "cudaStreamSynchronize", "ncclKernel", "[memory]",
                                                 "enumerate(DataLoader)#x.__next__", "Optimizer.step#SGD.step",
                                                 "Memcpy HtoD (Pageable -> Device)"]), _value),
              "ts": st.one_of(st.integers(0, 10**6), st.floats(-1e3, 1e16, allow_nan=False), _scalar),
              "dur": st.one_of(st.integers(-5, 10**4), st.floats(0, 1e5), _scalar),
              "pid": st.one_of(st.integers(0, 3), _scalar), "tid": st.one_of(st.integers(0, 3), _scalar),
              "args": st.one_of(_args, _value)})


@SETTINGS
@given(events=st.lists(st.one_of(_event, _value), max_size=25),
       wrap=st.sampled_from(["object", "list", "extra_keys"]))
def test_arbitrary_event_lists(events, wrap):
    if wrap == "object":
        doc = {"traceEvents": events}
    elif wrap == "list":
        doc = events
    else:
        doc = {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "x", "numSms": 0}],
               "traceEvents": events, "distributedInfo": {"rank": "zero"}}
    r = _run(json.dumps(doc, allow_nan=False).encode())
    if r is not None:
        for t in r["traces"]:
            for v in t["breakdown_ms"].values():
                assert v is None or (math.isfinite(v) and v >= 0)


@settings(max_examples=30, deadline=None)
@given(block=st.integers(min_value=64, max_value=4096))
def test_any_block_size_decodes_the_same(block):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.json"
        p.write_bytes(GOOD)
        a = load_trace(p)
        b = load_trace(p, block=block)
    assert a.n == b.n and a.names == b.names
    assert (a.ts == b.ts).all() and (a.kind == b.kind).all()
