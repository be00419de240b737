"""GPU utilization, estimated SM efficiency and estimated achieved occupancy, per device,
by torch-tb-profiler's definitions (gpu_metrics_parser.py):

- GPU utilization: time with at least one kernel running, within [first step start, last
  step end], over that span.
- Est. SM efficiency: per kernel min(blocks per SM, 1); overlapping kernels add up (capped
  at 1); the time-weighted sum over the same span, divided by the span.
- Est. achieved occupancy: the kernels' "est. achieved occupancy %", weighted by their
  duration inside the span.

When a trace lacks "blocks per SM" (some ROCm traces) it is estimated from the grid size
and the device's SM count, and the result says so.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from autoopt.analyze import intervals as I
from autoopt.analyze import trace as T
from autoopt.analyze.steps import Steps


def _sm_counts(tr: T.Trace) -> dict[int, int]:
    out = {}
    for j, p in enumerate(device_props(tr)):
        n = p.get("numSms", p.get("multiProcessorCount"))
        did = p.get("id", j)
        if isinstance(n, (int, float)) and n > 0 and isinstance(did, int):
            out[did] = int(n)
    return out


def device_props(tr: T.Trace) -> list[dict]:
    props = tr.meta.get("deviceProperties")
    if not isinstance(props, list):
        props = tr.meta.get("computeProperties")
    if not isinstance(props, list):
        return []
    return [p for p in props if isinstance(p, dict)]


def gpu_metrics(tr: T.Trace, st: Steps) -> dict:
    k = tr.idx(T.KERNEL)
    out: dict = {"devices": {}, "notes": []}
    if k.size == 0:
        return out
    lo, hi = st.span
    span = hi - lo
    sms = _sm_counts(tr)
    estimated_bps = False
    for dev in sorted(set(tr.device[k].tolist())):
        kd = k[tr.device[k] == dev]
        ks, ke = tr.ts[kd], tr.end[kd]
        busy = I.clip(I.merge(ks, ke), lo, hi)
        util = I.total(busy) / span if span > 0 else None
        bps = tr.blocks_per_sm[kd].copy()
        if np.all(np.isnan(bps)) and dev in sms:
            bps = tr.grid_blocks[kd] / sms[dev]
            estimated_bps = bool(np.any(~np.isnan(bps)))
        sm_eff = _sm_efficiency(ks, ke, bps, lo, hi)
        occ = tr.occupancy_pct[kd]
        okm = ~np.isnan(occ) & (occ >= 0)
        occupancy: Optional[float] = None
        if okm.any():
            d = np.clip(np.minimum(ke[okm], hi) - np.maximum(ks[okm], lo), 0, None)
            if d.sum() > 0:
                occupancy = float(np.sum(occ[okm] * d) / d.sum()) / 100.0
        out["devices"][int(dev)] = {
            "gpu_utilization": util,
            "sm_efficiency": sm_eff if span > 0 else None,
            "achieved_occupancy": occupancy,
            "busy_us": I.total(busy),
        }
    if estimated_bps:
        out["notes"].append("the trace has no 'blocks per SM': SM efficiency estimated from grid size / SM count")
    return out


def _sm_efficiency(ks, ke, bps, lo, hi) -> Optional[float]:
    ok = ~np.isnan(bps) & (bps > 0)
    if not ok.any() or hi <= lo:
        return None
    s, e, v = ks[ok], ke[ok], bps[ok]
    pts, inv = np.unique(np.concatenate([s, e]), return_inverse=True)
    delta = np.zeros(pts.size)
    np.add.at(delta, inv[: s.size], v)
    np.add.at(delta, inv[s.size:], -v)
    level = np.cumsum(delta)[:-1]
    level = np.where(level > 1e-12, np.minimum(level, 1.0), 0.0)
    a = np.maximum(pts[:-1], lo)
    b = np.minimum(pts[1:], hi)
    w = np.clip(b - a, 0, None)
    if not np.any(w * level):
        return None
    return float(np.sum(level * w) / (hi - lo))
