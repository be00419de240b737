"""Multi-rank analysis: per-rank table, stragglers (skew of step time and of
communication kernel time), compute/communication overlap and the communication share.
`distributedInfo` is optional: the rank then comes from the file name or the order."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from autoopt.analyze import intervals as I
from autoopt.analyze import trace as T
from autoopt.analyze.breakdown import comm_kernel_mask
from autoopt.analyze.steps import Steps

_RANK_RE = re.compile(r"(?:rank|worker)[_\-.]?(\d+)", re.IGNORECASE)


def rank_of(tr: T.Trace, fallback: int) -> tuple[int, str]:
    info = tr.meta.get("distributedInfo")
    if isinstance(info, dict) and isinstance(info.get("rank"), int):
        return info["rank"], "distributedInfo"
    m = _RANK_RE.search(Path(tr.path).name)
    if m:
        return int(m.group(1)), "file name"
    return fallback, "order"


def comm_backend(tr: T.Trace) -> str:
    info = tr.meta.get("distributedInfo")
    if isinstance(info, dict) and isinstance(info.get("backend"), str):
        return info["backend"]
    for s in tr.names:
        if not s:
            continue
        low = s.lower()
        if "nccl" in low or "rccl" in low:
            return "nccl"
    for s in tr.names:
        if s and s.startswith("gloo:"):
            return "gloo"
    return ""


def comm_stats(tr: T.Trace, st: Steps) -> dict[str, Any]:
    """Communication kernel time per step and the share of it overlapped by compute kernels."""
    cm = comm_kernel_mask(tr)
    out: dict[str, Any] = {"comm_kernel_ms_per_step": 0.0, "compute_kernel_ms_per_step": None,
                           "comm_overlap_fraction": None, "backend": comm_backend(tr)}
    if not tr.has_gpu:
        out["comm_kernel_ms_per_step"] = None
        return out
    steps_iv = (st.starts, st.ends)
    comp = (tr.kind == T.KERNEL) & ~cm
    comm_iv = I.intersect(I.merge(tr.ts[cm], tr.end[cm]), steps_iv)
    comp_iv = I.intersect(I.merge(tr.ts[comp], tr.end[comp]), steps_iv)
    n = st.count
    out["comm_kernel_ms_per_step"] = I.total(comm_iv) / 1e3 / n
    out["compute_kernel_ms_per_step"] = I.total(comp_iv) / 1e3 / n
    if comm_iv[0].size:
        out["comm_overlap_fraction"] = I.total(I.intersect(comm_iv, comp_iv)) / I.total(comm_iv)
    return out


def ranks_summary(rows: list[dict]) -> dict[str, Any]:
    """rows: one per trace with rank, step_time_ms mean, communication stats, breakdown."""
    table = []
    for r in rows:
        st = r.get("step_time_ms") or {}
        comm = r.get("communication") or {}
        bd = r.get("breakdown_ms") or {}
        mean = st.get("mean")
        table.append({
            "rank": r["rank"], "path": r["path"], "step_time_ms": mean,
            "comm_kernel_ms_per_step": comm.get("comm_kernel_ms_per_step"),
            "compute_kernel_ms_per_step": comm.get("compute_kernel_ms_per_step"),
            "communication_fraction": (bd.get("communication", 0.0) / mean) if mean else None,
            "comm_overlap_fraction": comm.get("comm_overlap_fraction"),
            "gpu_utilization": r.get("gpu_utilization"),
        })
    table.sort(key=lambda x: x["rank"])
    steps = [t["step_time_ms"] for t in table if t["step_time_ms"]]
    out: dict[str, Any] = {"rank_count": len(table), "per_rank": table, "rank_step_skew": None,
                           "slowest_rank": None, "fastest_rank": None, "comm_skew": None,
                           "straggler_rank": None, "comm_overlap_fraction": None, "communication_fraction": None}
    if len(steps) >= 1 and min(steps) > 0:
        slow = max(table, key=lambda t: t["step_time_ms"] or 0)
        fast = min(table, key=lambda t: t["step_time_ms"] or float("inf"))
        out["rank_step_skew"] = (slow["step_time_ms"] - fast["step_time_ms"]) / fast["step_time_ms"]
        out["slowest_rank"], out["fastest_rank"] = slow["rank"], fast["rank"]
    comms = [(t["comm_kernel_ms_per_step"], t["rank"]) for t in table if t["comm_kernel_ms_per_step"]]
    if len(comms) >= 2:
        hi = max(comms)[0]
        lo, lo_rank = min(comms)
        out["comm_skew"] = (hi - lo) / hi if hi > 0 else None
        # the rank that reaches the collectives last waits least in them: the straggler
        out["straggler_rank"] = lo_rank
    ov = [t["comm_overlap_fraction"] for t in table if t["comm_overlap_fraction"] is not None]
    out["comm_overlap_fraction"] = float(np.mean(ov)) if ov else None
    cf = [t["communication_fraction"] for t in table if t["communication_fraction"] is not None]
    out["communication_fraction"] = float(np.mean(cf)) if cf else None
    return out


def mean_or_none(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None
