"""Steps: ProfilerStep#N spans, stretched to the device work they launched.

The same algorithm as torch-tb-profiler's StepParser (event_parser.py), so the step
times and everything divided by them match its overview: a step starts where its host
span starts (or where the previous step ends, whichever is later) and ends where its
host span or the last GPU event launched from inside it ends, whichever is later. Tail
steps that launched no (or clearly too little) device work are dropped, as the profiler
may have missed their kernels. Without ProfilerStep spans the whole CPU-side extent of
the trace is one window, and the result says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from autoopt.analyze import trace as T


@dataclass
class Steps:
    starts: np.ndarray
    ends: np.ndarray
    names: list[str]
    from_spans: bool  # False: the whole trace is one window
    device_adjusted: bool = False
    dropped_tail: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.starts.size)

    @property
    def durations(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def span(self) -> tuple[float, float]:
        return float(self.starts[0]), float(self.ends[-1])

    @property
    def total(self) -> float:
        return float(np.sum(self.durations))

    def index_of(self, t: np.ndarray) -> np.ndarray:
        """Step index of each time point (-1 outside every step)."""
        k = np.searchsorted(self.starts, t, side="right") - 1
        kk = np.maximum(k, 0)
        return np.where((k >= 0) & (t < self.ends[kk]), k, -1)


_STEP_NUM = re.compile(r"ProfilerStep#(\d+)")


def find_steps(tr: T.Trace) -> Steps:
    idx = tr.idx(T.STEP)
    notes: list[str] = []
    if idx.size:
        order = np.argsort(tr.ts[idx], kind="stable")
        idx = idx[order]
        # one span per step: the same step recorded on several threads keeps its outermost span
        nm = [tr.names[int(tr.name[i])] for i in idx]
        keep = []
        seen: dict[str, int] = {}
        for j, n in enumerate(nm):
            if n in seen:
                p = seen[n]
                if tr.dur[idx[j]] > tr.dur[idx[keep[p]]]:
                    keep[p] = j
                continue
            seen[n] = len(keep)
            keep.append(j)
        idx = idx[np.asarray(keep, dtype=np.int64)]
        starts = tr.ts[idx].copy()
        ends = tr.end[idx].copy()
        names = []
        for i in idx:
            m = _STEP_NUM.search(tr.names[int(tr.name[i])])
            names.append(m.group(1) if m else str(len(names)))
        # nested or overlapping spans (rare): make them sequential
        for j in range(1, starts.size):
            if starts[j] < ends[j - 1]:
                ends[j - 1] = starts[j]
        st = Steps(starts, ends, names, from_spans=True, notes=notes)
    else:
        cpu = tr.mask(T.OP, T.ANNO, T.PYFN)
        sel = cpu if cpu.any() else np.ones(tr.n, dtype=bool)
        lo = float(tr.ts[sel].min())
        hi = float(tr.end[sel].max())
        notes.append("no ProfilerStep#N spans: the whole trace is analyzed as one window "
                     "(record with torch.profiler.schedule and call prof.step() each iteration for per-step numbers)")
        st = Steps(np.array([lo]), np.array([hi]), ["0"], from_spans=False, notes=notes)
    _adjust_to_device(tr, st)
    return st


def _adjust_to_device(tr: T.Trace, st: Steps) -> None:
    gpu = tr.idx(*T.GPU_KINDS)
    if gpu.size == 0:
        return
    rt = tr.runtime_of(gpu)
    has_rt = rt >= 0
    rts = np.where(has_rt, tr.ts[np.maximum(rt, 0)], np.nan)
    rte = np.where(has_rt, tr.end[np.maximum(rt, 0)], np.nan)
    k = np.searchsorted(st.starts, rts, side="right") - 1
    kk = np.clip(k, 0, st.count - 1)
    inside = has_rt & (k >= 0) & (rts >= st.starts[kk]) & (rte <= st.ends[kk])
    step_of = np.where(inside, kk, -1)
    if not inside.any():
        return
    n = st.count
    matched = np.bincount(step_of[inside], minlength=n)
    dmin = np.full(n, np.inf)
    dmax = np.full(n, -np.inf)
    np.minimum.at(dmin, step_of[inside], tr.ts[gpu][inside])
    np.maximum.at(dmax, step_of[inside], tr.end[gpu][inside])
    prev = float(st.starts[0])
    if np.isfinite(dmin[0]):
        unmatched_end = tr.end[gpu][~inside]
        before = unmatched_end[unmatched_end < dmin[0]]
        if before.size:
            prev = max(prev, float(before.max()))
    starts = st.starts.copy()
    ends = st.ends.copy()
    for i in range(n):
        s = max(prev, float(starts[i]))
        e = float(ends[i])
        if not np.isfinite(dmin[i]):
            e = max(e, s)
        else:
            e = max(e, float(dmax[i]))
            if e < s:
                e = s
        starts[i], ends[i] = s, e
        prev = e
    keep = n
    if n > 1:
        nz = np.flatnonzero(matched > 0)
        if nz.size:
            last = int(nz[-1])
            keep = last + 1
            if last > 0 and matched[last - 1] * 0.8 > matched[last]:
                keep = last
    st.starts, st.ends = starts[:keep], ends[:keep]
    st.dropped_tail = n - keep
    st.names = st.names[:keep]
    st.device_adjusted = True
    if st.dropped_tail:
        st.notes.append(f"dropped the last {st.dropped_tail} step(s): the profiler may have missed the kernels "
                        "they launched (as torch-tb-profiler does)")
