"""Vectorised interval arithmetic on (start, end) arrays, in microseconds."""
from __future__ import annotations

import numpy as np

EMPTY = (np.zeros(0), np.zeros(0))


def merge(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of intervals as sorted, disjoint (start, end) arrays (touching intervals merge)."""
    if starts.size == 0:
        return EMPTY
    order = np.argsort(starts, kind="stable")
    s = starts[order]
    e = ends[order]
    run_end = np.maximum.accumulate(e)
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    new[1:] = s[1:] > run_end[:-1]
    gi = np.cumsum(new) - 1
    ms = s[new]
    me = np.zeros(ms.size)
    np.maximum.at(me, gi, run_end)
    me = np.maximum(me, ms)
    return ms, me


def total(iv: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.sum(iv[1] - iv[0])) if iv[0].size else 0.0


def clip(iv: tuple[np.ndarray, np.ndarray], lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.maximum(iv[0], lo)
    e = np.minimum(iv[1], hi)
    keep = e > s
    return s[keep], e[keep]


def intersect(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Intersection of two merged interval sets."""
    if a[0].size == 0 or b[0].size == 0:
        return EMPTY
    pts = np.unique(np.concatenate([a[0], a[1], b[0], b[1]]))
    if pts.size < 2:
        return EMPTY
    mid = (pts[:-1] + pts[1:]) / 2
    cov = covered(a, mid) & covered(b, mid)
    return _runs(pts, cov)


def subtract(a, b):
    if a[0].size == 0:
        return EMPTY
    if b[0].size == 0:
        return a
    pts = np.unique(np.concatenate([a[0], a[1], b[0], b[1]]))
    mid = (pts[:-1] + pts[1:]) / 2
    cov = covered(a, mid) & ~covered(b, mid)
    return _runs(pts, cov)


def covered(iv: tuple[np.ndarray, np.ndarray], points: np.ndarray) -> np.ndarray:
    """For each point, whether it lies inside one of the merged intervals (start <= p < end)."""
    if iv[0].size == 0:
        return np.zeros(points.shape, dtype=bool)
    k = np.searchsorted(iv[0], points, side="right") - 1
    kk = np.maximum(k, 0)
    return (k >= 0) & (points < iv[1][kk])


def _runs(pts: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not cov.any():
        return EMPTY
    c = cov.astype(np.int8)
    d = np.diff(np.concatenate([[0], c, [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return pts[starts], pts[ends]
