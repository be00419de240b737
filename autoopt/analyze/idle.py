"""GPU idle time split as Holistic Trace Analysis defines it (get_idle_time_breakdown):
a gap before a GPU event is host wait when the event's launching runtime call started
after the previous GPU event ended (the CPU did not enqueue work fast enough), kernel
wait when it is shorter than `consecutive_kernel_delay_us` (back-to-back launch
overhead), and other otherwise.

Reported two ways: per stream, exactly as HTA does; and over the whole device timeline
(all streams merged, gaps inside the steps only), which is what the step fractions use,
so idle = host wait + kernel wait + other = step time - GPU busy time.
"""
from __future__ import annotations

import numpy as np

from autoopt.analyze import intervals as I
from autoopt.analyze import trace as T
from autoopt.analyze.steps import Steps

CONSECUTIVE_KERNEL_DELAY_US = 30.0


def idle_stats(tr: T.Trace, st: Steps, delay_us: float = CONSECUTIVE_KERNEL_DELAY_US) -> dict:
    g = tr.idx(*T.GPU_KINDS)
    out: dict = {"idle_fraction": None, "host_wait_fraction": None, "kernel_wait_fraction": None,
                 "other_wait_fraction": None, "by_stream": []}
    if g.size == 0 or st.total <= 0:
        return out
    rt = tr.runtime_of(g)
    rts = np.where(rt >= 0, tr.ts[np.maximum(rt, 0)], -np.inf)
    # per stream (HTA)
    for s in np.unique(tr.stream[g]).tolist():
        sel = np.flatnonzero(tr.stream[g] == s)
        sel = sel[np.argsort(tr.ts[g][sel], kind="stable")]
        ts = tr.ts[g][sel]
        prev_end = np.concatenate([[np.nan], tr.end[g][sel][:-1]])
        gap = ts - prev_end
        host = rts[sel] > prev_end
        kern = ~host & (gap < delay_us)
        valid = ~np.isnan(gap)
        tot = {"host_wait_us": float(gap[valid & host].sum()), "kernel_wait_us": float(gap[valid & kern].sum()),
               "other_us": float(gap[valid & ~host & ~kern].sum())}
        out["by_stream"].append({"stream": int(s), **{k: round(v, 3) for k, v in tot.items()}})
    # device timeline, inside the steps
    for dev in [int(np.bincount(np.maximum(tr.device[g], 0)).argmax())]:
        gd = g[tr.device[g] == dev]
        ms, me = I.merge(tr.ts[gd], tr.end[gd])
        # the runtime start of the first event of each busy block
        order = np.argsort(tr.ts[gd], kind="stable")
        first = np.searchsorted(tr.ts[gd][order], ms, side="left")
        first_rt = rts[np.flatnonzero(tr.device[g] == dev)][order][first]
        steps_iv = (st.starts, st.ends)
        busy = I.intersect((ms, me), steps_iv)
        idle_total = st.total - I.total(busy)
        # gaps between busy blocks, clipped to the steps; a gap is classified by the block after it
        gs = np.concatenate([[st.starts[0]], me])
        ge = np.concatenate([ms, [st.ends[-1]]])
        nxt_rt = np.concatenate([first_rt, [np.inf]])
        raw = ge - gs
        host = nxt_rt > gs
        kern = ~host & (raw < delay_us)
        cls = np.where(host, 0, np.where(kern, 1, 2))
        sums = np.zeros(3)
        for c in range(3):
            sel = (cls == c) & (ge > gs)
            if sel.any():
                sums[c] = I.total(I.intersect(I.merge(gs[sel], ge[sel]), steps_iv))
        out["idle_fraction"] = idle_total / st.total
        out["host_wait_fraction"] = sums[0] / st.total
        out["kernel_wait_fraction"] = sums[1] / st.total
        out["other_wait_fraction"] = max(idle_total - sums[0] - sums[1], 0.0) / st.total
    return out
