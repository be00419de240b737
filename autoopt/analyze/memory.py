"""Memory: host-to-device copies (pinned versus pageable) and peak memory from the
profiler's [memory] events (profile_memory=True)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from autoopt.analyze import trace as T
from autoopt.analyze.steps import Steps

CPU_DEVICE, CUDA_DEVICE = 0, 1


def h2d_stats(tr: T.Trace, st: Steps) -> dict:
    m = tr.idx(T.MEMCPY)
    out = {"h2d_copies_per_step": None, "h2d_mb_per_step": None, "pageable_h2d_fraction": None,
           "h2d_pinned_mb": 0.0, "h2d_pageable_mb": 0.0, "h2d_unknown_mb": 0.0}
    if m.size == 0:
        if not tr.has_gpu:
            return out
        out["h2d_copies_per_step"] = 0.0
        return out
    h2d_ids = tr.name_ids(lambda s: "HtoD" in s or "Host -> Device" in s or "Pageable -> Device" in s
                          or "Pinned -> Device" in s)
    h = m[tr.has_name(h2d_ids)[m]]
    h = h[st.index_of(tr.ts[h]) >= 0]
    b = np.nan_to_num(tr.nbytes[h])
    pageable = tr.has_name(tr.name_ids(lambda s: "Pageable" in s))[h]
    pinned = tr.has_name(tr.name_ids(lambda s: "Pinned" in s))[h]
    n = st.count
    out["h2d_copies_per_step"] = h.size / n
    out["h2d_mb_per_step"] = float(b.sum()) / 1e6 / n
    out["h2d_pageable_mb"] = float(b[pageable].sum()) / 1e6
    out["h2d_pinned_mb"] = float(b[pinned].sum()) / 1e6
    out["h2d_unknown_mb"] = float(b[~pageable & ~pinned].sum()) / 1e6
    known = out["h2d_pageable_mb"] + out["h2d_pinned_mb"]
    if known > 0:
        out["pageable_h2d_fraction"] = out["h2d_pageable_mb"] / known
    elif pageable.any() or pinned.any():  # copies without byte counts: count them instead
        out["pageable_h2d_fraction"] = float(pageable.sum()) / float(pageable.sum() + pinned.sum())
    return out


def peak_memory(tr: T.Trace) -> dict:
    """Peak allocated MB per device from [memory] events: the allocator's "Total Allocated"
    when recorded, else the running sum of allocation sizes (relative to the trace start)."""
    out: dict = {"peak_memory_mb": None, "by_device": {}}
    if tr.mem_ts.size == 0:
        return out
    order = np.argsort(tr.mem_ts, kind="stable")
    dtype = tr.mem_device_type[order]
    did = tr.mem_device_id[order]
    for key in sorted(set(zip(dtype.tolist(), did.tolist()))):
        sel = order[(dtype == key[0]) & (did == key[1])]
        tot = tr.mem_total[sel]
        if np.any(~np.isnan(tot)):
            peak = float(np.nanmax(tot))
            how = "allocator"
        else:
            c = np.cumsum(tr.mem_bytes[sel])
            peak = float(max(c.max(), 0.0))
            how = "running sum"
        label = ("cuda" if key[0] == CUDA_DEVICE else "cpu" if key[0] == CPU_DEVICE else f"type{key[0]}") + (
            f":{key[1]}" if key[1] >= 0 else "")
        out["by_device"][label] = {"peak_mb": round(peak / 2**20, 3), "source": how}
    gpu = [v["peak_mb"] for k, v in out["by_device"].items() if k.startswith("cuda")]
    cpu = [v["peak_mb"] for k, v in out["by_device"].items() if k.startswith("cpu")]
    out["peak_memory_mb"] = max(gpu) if gpu else (max(cpu) if cpu else None)
    return out


def max_or_none(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None
