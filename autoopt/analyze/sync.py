"""Host-device synchronisations: where the CPU waits for the GPU.

A sync site is one top-level operator (or a bare runtime call) that contains a blocking
runtime call (stream/device/event synchronize, a synchronous cudaMemcpy) or an
`aten::item` / `aten::_local_scalar_dense` (which copies a scalar to the host). Several
blocking calls under one operator count once. On CPU-only traces `item()` calls are
reported, since each one becomes a sync on a GPU. Each site gets the user's Python source
line when the trace has stacks (python_function frames, or the 2021 "Call stack" arg).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from autoopt.analyze import trace as T
from autoopt.analyze.operators import OpTree
from autoopt.analyze.steps import Steps

BLOCKING_RUNTIME = frozenset({
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cudaMemcpyFromSymbol", "cudaMemcpyToSymbol", "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize",
    "cuMemcpyDtoH", "cuMemcpyDtoH_v2", "hipDeviceSynchronize", "hipStreamSynchronize", "hipEventSynchronize",
    "hipMemcpy", "hipMemcpyWithStream", "hipMemcpyDtoH",
})
ITEM_OPS = frozenset({"aten::item", "aten::_local_scalar_dense"})
_FRAME_RE = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<func>.*)$")
_LIB_MARKERS = ("/torch/", "\\torch\\", "site-packages", "dist-packages", "<built-in", "<frozen", "/lib/python",
                "/autoopt/", "threading.py", "runpy.py", "<string>", "/contextlib.py")


def user_frame(frame: str) -> Optional[str]:
    """'model.py(23): forward' -> 'model.py:23 (forward)' when the frame is user code."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return None
    f = m.group("file")
    if any(k in f for k in _LIB_MARKERS) or f.startswith("torch/"):
        return None
    return f"{f}:{m.group('line')} ({m.group('func')})"


def _from_call_stack(stack: str) -> Optional[str]:
    for fr in stack.split(";"):
        u = user_frame(fr)
        if u:
            return u
    return None


def sync_stats(tr: T.Trace, tree: OpTree, st: Steps, top_n: int = 10) -> dict:
    nsteps = st.count
    rt = tr.idx(T.RUNTIME)
    blk_ids = tr.name_ids(lambda s: s in BLOCKING_RUNTIME)
    rt = rt[tr.has_name(blk_ids)[rt]] if rt.size else rt
    rt = rt[st.index_of(tr.ts[rt]) >= 0] if rt.size else rt
    ops = tr.idx(T.OP)
    items = ops[tr.has_name(tr.name_ids(lambda s: s in ITEM_OPS))[ops]] if ops.size else ops
    items = items[st.index_of(tr.ts[items]) >= 0] if items.size else items
    sites: dict[int, dict] = {}
    if rt.size:
        lop = tr.op_by_ext(tr.ext[rt])
        for r, o in zip(rt.tolist(), lop.tolist()):
            key = int(tree.top_op[o]) if o >= 0 and tree.top_op[o] >= 0 else r
            s = sites.setdefault(key, {"wait_us": 0.0, "kind": set(), "inner": o if o >= 0 else r})
            s["wait_us"] += float(tr.dur[r])
            s["kind"].add(tr.names[int(tr.name[r])])
    for i in items.tolist():
        key = int(tree.top_op[i]) if tree.top_op[i] >= 0 else i
        s = sites.setdefault(key, {"wait_us": 0.0, "kind": set(), "inner": i})
        if not any(k in BLOCKING_RUNTIME for k in s["kind"]):
            s.setdefault("item_us", 0.0)
            s["item_us"] = max(s["item_us"], float(tr.dur[i]))
        s["kind"].add("item")
    # group by (site name, source line)
    groups: dict[tuple, dict] = {}
    resolved = 0
    py_index = _PyIndex(tr)
    for key, s in sites.items():
        name = tr.names[int(tr.name[key])]
        src = None
        if resolved < 2000:
            src = _source_of(tr, key, s["inner"], py_index)
            resolved += 1
        g = groups.setdefault((name, src), {"name": name, "source": src, "count": 0, "total_ms": 0.0,
                                            "calls": set()})
        g["count"] += 1
        g["total_ms"] += (s["wait_us"] or s.get("item_us", 0.0)) / 1e3
        g["calls"] |= s["kind"]
    rows = sorted(groups.values(), key=lambda g: (-g["count"], -g["total_ms"]))
    for g in rows:
        g["calls"] = sorted(g["calls"])
        g["total_ms"] = round(g["total_ms"], 4)
        g["per_step"] = round(g["count"] / nsteps, 3) if nsteps else None
    wait = sum(s["wait_us"] or s.get("item_us", 0.0) for s in sites.values())
    d2h = tr.idx(T.MEMCPY)
    d2h = d2h[tr.has_name(tr.name_ids(lambda s: "DtoH" in s or "Device -> Host" in s
                                      or "Device -> Pageable" in s))[d2h]] if d2h.size else d2h
    d2h = d2h[st.index_of(tr.ts[d2h]) >= 0] if d2h.size else d2h
    return {
        "sync_count_per_step": len(sites) / nsteps if nsteps else None,
        "sync_time_fraction": wait / st.total if st.total > 0 else None,
        "item_calls_per_step": (len({int(tree.top_op[i]) if tree.top_op[i] >= 0 else i for i in items.tolist()})
                                / nsteps) if nsteps else None,
        "d2h_copies_per_step": d2h.size / nsteps if nsteps else None,
        "sites": rows[:top_n],
    }


class _PyIndex:
    """python_function frames per thread, for finding the user frame enclosing an event."""

    def __init__(self, tr: T.Trace):
        py = tr.idx(T.PYFN)
        self.by_thread: dict[tuple, np.ndarray] = {}
        if py.size == 0:
            return
        users = np.zeros(len(tr.names), dtype=bool)
        for i, s in enumerate(tr.names):
            if s and "(" in s and user_frame(s):
                users[i] = True
        py = py[users[tr.name[py]]]
        if py.size == 0:
            return
        key = (tr.pid[py].astype(np.int64) << 32) | tr.tid[py].astype(np.int64)
        for k in np.unique(key):
            sel = py[key == k]
            self.by_thread[int(k)] = sel[np.argsort(tr.ts[sel], kind="stable")]

    def innermost(self, tr: T.Trace, i: int) -> Optional[int]:
        k = (int(tr.pid[i]) << 32) | int(tr.tid[i])
        cand = self.by_thread.get(k)
        if cand is None:
            return None
        upto = np.searchsorted(tr.ts[cand], tr.ts[i], side="right")
        c = cand[:upto]
        c = c[tr.end[c] >= tr.end[i]]
        return int(c[-1]) if c.size else None


def _source_of(tr: T.Trace, site: int, inner: int, py: _PyIndex) -> Optional[str]:
    for i in (inner, site):
        stack = tr.call_stacks.get(int(i))
        if stack:
            u = _from_call_stack(stack)
            if u:
                return u
    if py.by_thread:
        for i in (site, inner):
            f = py.innermost(tr, int(i))
            if f is not None:
                return user_frame(tr.names[int(tr.name[f])])
    return None
