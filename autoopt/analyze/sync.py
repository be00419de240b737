"""Host-device synchronisations: where the CPU waits for the GPU.

A sync site is one top-level operator (or a bare runtime call) that contains a blocking
runtime call. Blocking calls are the synchronize calls (stream / device / event), the
synchronous copies (cudaMemcpy, cuMemcpyDtoH, ...), any copy call (cudaMemcpyAsync
included) whose device-to-host copy lands in pageable memory, which the driver completes
before the call returns, and any D2H copy call under an item op (CUPTI may call its
destination pinned: PyTorch reads the scalar through a pinned buffer, and the call still
returns only after the GPU has drained the stream).

A site's time is its stall: the time of all its blocking calls (the host waits) plus the
GPU idle gap it leaves behind: a sync returns with the device queue empty, so the device
idles from the end of the last blocking call until the next device work starts (counted
only when no device work is running then, and cut at the step's end and at the next
blocking call). With the queue full the host would have launched that work ahead; the gap
is the GPU's half of the cost, which the host-side wait alone misses on host-heavy steps.
Each site row says both: `total_ms` (the stall) and `blocked_ms` (the calls alone).

An `aten::item` / `aten::_local_scalar_dense` (`.item()`, `if tensor:`, ...) on a CUDA tensor
waits in both its D2H `cudaMemcpyAsync` and the `cudaStreamSynchronize` after it, so both
count; on a CPU tensor (Adam's step counters, a DataLoader's seed) it launches nothing on
the device and is no sync at all. Several blocking calls under one operator count once.

On CPU-only traces (no device events at all) `item()` calls are reported, since each one
becomes a sync on a GPU, except inside `Optimizer.step#...` (torch.optim's own `.item()`s
read CPU step counters, which stay on the CPU on a GPU too).

Each site gets the user's Python source line when the trace has stacks (python_function
frames, or the 2021 "Call stack" arg): the innermost frame that is neither a library
(torch, site-packages, the standard library) nor autoopt's own package. A site whose
innermost non-library frame is autoopt's (its measuring harness: `autoopt/runner.py(212):
sync`, the batch move in `autoopt/contract.py`, or torch.optim / torch.amp run by the
harness on the user's behalf) is not the user's code: it is left out of the counts and the
time and reported under "harness" instead. autoopt's frames are recognised by a path that
has the component `autoopt` followed by one of autoopt's own module files, relative
(`autoopt/runner.py`, as the profiler writes frames under the working directory) or
absolute (`/x/site-packages/autoopt/runner.py`, `C:\\x\\autoopt\\runner.py`).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional

import numpy as np

from autoopt.analyze import trace as T
from autoopt.analyze.operators import OpTree, up_the_chain
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
                "threading.py", "runpy.py", "<string>", "/contextlib.py")

USER, AUTOOPT, LIBRARY = "user", "autoopt", "library"


def is_d2h_memcpy_name(s: str) -> bool:
    return "DtoH" in s or "Device -> Host" in s or "Device -> Pageable" in s or "Device -> Pinned" in s


def _blocking_d2h_name(s: str) -> bool:
    """A D2H copy the launching call waits for: into pageable (or unnamed) host memory; a copy into
    pinned memory is asynchronous (the wait, if any, is in a later synchronize call)."""
    return is_d2h_memcpy_name(s) and "Pinned" not in s


# autoopt's harness modules before the package was laid out in stage folders: traces recorded by
# those versions name them in their Python frames.
_EARLIER_MODULE_FILES = ("runner.py", "contract.py", "profile.py", "measure.py", "verify.py", "load.py",
                         "optimize.py", "profiling.py", "_dist_worker.py", "script.py", "export.py")


@functools.lru_cache(maxsize=1)
def _autoopt_file_re() -> re.Pattern:
    """`autoopt/<one of autoopt's module files>` at the end of a path, '/' or '\\' separated."""
    pkg = Path(__file__).resolve().parents[1]
    files = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")} | set(_EARLIER_MODULE_FILES)
    files = sorted(files, key=len, reverse=True)
    alts = "|".join(r"[/\\]".join(re.escape(part) for part in f.split("/")) for f in files)
    return re.compile(rf"(?:^|[/\\])autoopt[/\\](?:{alts})$")


def is_autoopt_file(path: str) -> bool:
    return bool(_autoopt_file_re().search(path.strip()))


def frame_origin(frame: str) -> Optional[str]:
    """USER, AUTOOPT or LIBRARY for a 'file(line): function' frame; None when it is not one
    ('nn.Module: Net_0', '<built-in method item ...>')."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return None
    f = m.group("file")
    if is_autoopt_file(f):
        return AUTOOPT
    if any(k in f for k in _LIB_MARKERS) or f.startswith("torch/"):
        return LIBRARY
    return USER


def user_frame(frame: str) -> Optional[str]:
    """'model.py(23): forward' -> 'model.py:23 (forward)' when the frame is user code."""
    if frame_origin(frame) != USER:
        return None
    m = _FRAME_RE.match(frame.strip())
    return f"{m.group('file')}:{m.group('line')} ({m.group('func')})"


def _from_call_stack(stack: str) -> Optional[tuple[str, str]]:
    """(origin, frame) of the innermost non-library frame of a 2021 "Call stack" (innermost first)."""
    for fr in stack.split(";"):
        o = frame_origin(fr)
        if o in (USER, AUTOOPT):
            return o, fr.strip()
    return None


def sync_stats(tr: T.Trace, tree: OpTree, st: Steps, top_n: int = 10) -> dict:
    nsteps = st.count
    gpu = tr.has_gpu

    def in_step(ix):
        return ix[st.index_of(tr.ts[ix]) >= 0] if ix.size else ix

    # blocking runtime calls: synchronize / synchronous copies; the calls that launched a D2H copy into
    # pageable memory (.cpu(), .tolist()); and every D2H copy call under an item op, whatever CUPTI names
    # the destination (PyTorch's _local_scalar_dense reads into a pinned buffer, and its cudaMemcpyAsync
    # still returns only once the GPU has drained the stream and copied the scalar)
    rt = tr.idx(T.RUNTIME)
    blocking = rt[tr.has_name(tr.name_ids(lambda s: s in BLOCKING_RUNTIME))[rt]] if rt.size else rt
    cp = tr.idx(T.MEMCPY)
    cp = cp[tr.has_name(tr.name_ids(is_d2h_memcpy_name))[cp]] if cp.size else cp
    d2h_calls = tr.runtime_of(cp) if cp.size else cp
    pageable = tr.has_name(tr.name_ids(_blocking_d2h_name))[cp] if cp.size else np.zeros(0, dtype=bool)
    ok = d2h_calls >= 0
    d2h_calls, pageable = d2h_calls[ok], pageable[ok]
    is_item = tr.has_name(tr.name_ids(lambda s: s in ITEM_OPS))
    # an item op or nested in one (along the whole chain of enclosing ops, in rows x log(depth))
    under_item = up_the_chain(tree.parent, np.full(tr.n, -1, dtype=np.int64), is_item)[1] if is_item.any() else is_item
    if d2h_calls.size:
        ops_of = tr.op_by_ext(tr.ext[d2h_calls])
        under = (ops_of >= 0) & under_item[np.maximum(ops_of, 0)]
        d2h_calls = d2h_calls[pageable | under]
    blk = in_step(np.unique(np.concatenate([blocking, d2h_calls]).astype(np.int64)))
    sites: dict[int, dict] = {}
    if blk.size:
        lop = tr.op_by_ext(tr.ext[blk])
        for r, o in zip(blk.tolist(), lop.tolist()):
            key = int(tree.top_op[o]) if o >= 0 and tree.top_op[o] >= 0 else r
            s = sites.setdefault(key, {"wait_us": 0.0, "gap_us": 0.0, "kind": set(), "inner": o if o >= 0 else r,
                                       "last_end": -np.inf})
            s["wait_us"] += float(tr.dur[r])
            s["last_end"] = max(s["last_end"], float(tr.end[r]))
            s["kind"].add(tr.names[int(tr.name[r])])
            if o >= 0 and under_item[o]:
                s["kind"].add("item")
        _add_gaps(tr, st, blk, sites)
    if not gpu:
        # CPU-only trace: every item() outside torch.optim's step is a sync-to-be on a GPU
        ops = tr.idx(T.OP)
        items = in_step(ops[is_item[ops]]) if ops.size else ops
        for i in items.tolist():
            if tree.in_optimizer[i]:
                continue
            key = int(tree.top_op[i]) if tree.top_op[i] >= 0 else i
            s = sites.setdefault(key, {"wait_us": 0.0, "gap_us": 0.0, "kind": set(), "inner": i})
            s["item_us"] = max(s.get("item_us", 0.0), float(tr.dur[i]))
            s["kind"].add("item")
    rows, harness, counted = _group_sites(tr, sites, nsteps)
    wait = sum(_site_us(s) for s in counted)
    d2h = tr.idx(T.MEMCPY)
    d2h = in_step(d2h[tr.has_name(tr.name_ids(is_d2h_memcpy_name))[d2h]]) if d2h.size else d2h
    per_step = len(counted) / nsteps if nsteps else None
    return {
        # a CPU-only trace has no device to wait for: its item() calls are host reads that would
        # synchronise on a GPU, reported as such, never as device syncs
        "sync_count_per_step": per_step if gpu else None,
        "sync_time_fraction": (wait / st.total if st.total > 0 else None) if gpu else None,
        "host_reads_per_step": None if gpu else per_step,
        "item_calls_per_step": sum(1 for s in counted if "item" in s["kind"]) / nsteps if nsteps else None,
        "d2h_copies_per_step": d2h.size / nsteps if nsteps else None,
        "sites": rows[:top_n],
        "harness": harness,
    }


def _group_sites(tr: T.Trace, sites: dict[int, dict], nsteps: int) -> tuple[list[dict], dict, list[dict]]:
    """The sites grouped by (operator, source line), most frequent first; the sites in
    autoopt's own harness apart ("harness"); and the sites that count as the user's."""
    py_index = _PyIndex(tr)
    groups: dict[tuple, dict] = {}
    harness = {"count": 0, "total_ms": 0.0, "sources": []}
    counted: list[dict] = []
    for n_resolved, (key, s) in enumerate(sites.items()):
        name = tr.names[int(tr.name[key])]
        origin, src = _source_of(tr, key, s["inner"], py_index) if n_resolved < 2000 else (None, None)
        wait = _site_us(s)
        if origin == AUTOOPT:
            harness["count"] += 1
            harness["total_ms"] += wait / 1e3
            if src not in harness["sources"]:
                harness["sources"].append(src)
            continue
        counted.append(s)
        g = groups.setdefault((name, src), {"name": name, "source": src, "count": 0, "total_ms": 0.0,
                                            "blocked_ms": 0.0, "calls": set()})
        g["count"] += 1
        g["total_ms"] += wait / 1e3
        g["blocked_ms"] += s["wait_us"] / 1e3
        g["calls"] |= s["kind"]
    rows = sorted(groups.values(), key=lambda g: (-g["count"], -g["total_ms"]))
    for g in rows:
        g["calls"] = sorted(g["calls"])
        g["total_ms"] = round(g["total_ms"], 4)
        g["blocked_ms"] = round(g["blocked_ms"], 4)
        g["per_step"] = round(g["count"] / nsteps, 3) if nsteps else None
    harness["total_ms"] = round(harness["total_ms"], 4)
    harness["per_step"] = round(harness["count"] / nsteps, 3) if nsteps else None
    return rows, harness, counted


def _site_us(s: dict) -> float:
    """A site's time: blocked calls plus the GPU gap after them; item() time on CPU-only traces."""
    return (s["wait_us"] + s["gap_us"]) or s.get("item_us", 0.0)


def _add_gaps(tr: T.Trace, st: Steps, blk: np.ndarray, sites: dict) -> None:
    """The GPU idle gap each site leaves: from the end of its last blocking call to the next device
    work, when no device work is running at that moment (the sync drained the queue), cut at the
    end of the step and at the next blocking call (so consecutive syncs do not count time twice)."""
    g = tr.idx(*T.GPU_KINDS)
    if g.size == 0:
        return
    order = np.argsort(tr.ts[g], kind="stable")
    gs = tr.ts[g][order]
    ge_max = np.maximum.accumulate(tr.end[g][order])
    blk_starts = np.sort(tr.ts[blk])
    for s in sites.values():
        e = s["last_end"]
        k = int(st.index_of(np.asarray([e]))[0])
        if k < 0:
            continue
        j = int(np.searchsorted(gs, e, side="right"))
        if j > 0 and ge_max[j - 1] > e:
            continue  # the device is still busy (another stream): no gap
        stop = float(st.ends[k])
        if j < gs.size:
            stop = min(stop, float(gs[j]))
        b = int(np.searchsorted(blk_starts, e, side="left"))
        if b < blk_starts.size:
            stop = min(stop, float(blk_starts[b]))
        s["gap_us"] = max(0.0, stop - e)


class _PyIndex:
    """python_function frames per thread that are user or autoopt code, for finding the innermost
    such frame enclosing an event."""

    def __init__(self, tr: T.Trace):
        py = tr.idx(T.PYFN)
        self.by_thread: dict[tuple, np.ndarray] = {}
        self.origin: dict[int, str] = {}
        if py.size == 0:
            return
        keep = np.zeros(len(tr.names), dtype=bool)
        for i, s in enumerate(tr.names):
            if s and "(" in s:
                o = frame_origin(s)
                if o in (USER, AUTOOPT):
                    keep[i] = True
                    self.origin[i] = o
        py = py[keep[tr.name[py]]]
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


def _source_of(tr: T.Trace, site: int, inner: int, py: _PyIndex) -> tuple[Optional[str], Optional[str]]:
    """(origin, source) of a site: USER with 'file:line (function)', AUTOOPT with the same for
    autoopt's frame, or (None, None) when the trace has no stack for it."""
    for i in (inner, site):
        stack = tr.call_stacks.get(int(i))
        if stack:
            hit = _from_call_stack(stack)
            if hit:
                return hit[0], _fmt(hit[1])
    if py.by_thread:
        for i in (site, inner):
            f = py.innermost(tr, int(i))
            if f is not None:
                nid = int(tr.name[f])
                return py.origin[nid], _fmt(tr.names[nid])
    return None, None


def _fmt(frame: str) -> str:
    m = _FRAME_RE.match(frame.strip())
    return f"{m.group('file')}:{m.group('line')} ({m.group('func')})" if m else frame
