"""Rank balance of a synchronous job: which rank is the straggler.

In a synchronous job every rank's wall-clock step equals the slowest rank's (the others wait
in the all-reduce), so the step-time skew is ~0 even with a straggler. What differs is the
time a rank spends waiting in collectives: `rank_balance` adds each rank's busy time (median
over steps of step time minus communication) and, when the busiest and the least busy rank
are clearly apart (medians at least 10 % and 1 ms apart, and the busier rank busier in two
thirds of the steps), uses their skew as `metrics.rank_step_skew` and names the straggler
(the busiest rank, which waits least). Torch-free.
"""
from __future__ import annotations

import math
import statistics
from typing import Any


def rank_balance(result: dict) -> dict:
    """Per-rank busy time (step minus communication) and the straggler, from an
    analyze_paths result of several ranks. Updates result["ranks"] and, when two ranks'
    busy times are clearly apart, result["metrics"]["rank_step_skew"]; returns the
    balance summary. Torch-free."""
    ranks = result.get("ranks") or {}
    traces = result.get("traces") or []
    if len(traces) < 2 or not ranks:
        return {}
    rows = []
    for t in traces:
        per_step = t.get("breakdown_per_step_ms") or []
        busy_steps = [max(0.0, (s.get("total") or 0.0) - (s.get("communication") or 0.0)) for s in per_step]
        st = (t.get("step_time_ms") or {}).get("mean")
        comm = (t.get("breakdown_ms") or {}).get("communication") or 0.0
        rows.append({"rank": t["rank"], "busy_steps": busy_steps,
                     "busy_ms_per_step": statistics.median(busy_steps) if busy_steps else None,
                     "wait_ms_per_step": comm if st else None})
    rows = [r for r in rows if r["busy_ms_per_step"]]
    out: dict[str, Any] = {"busy_skew": None, "straggler_rank": ranks.get("straggler_rank"), "clearly_apart": False}
    for pr in ranks.get("per_rank", []):
        match = next((r for r in rows if r["rank"] == pr["rank"]), None)
        if match:
            pr["busy_ms_per_step"] = round(match["busy_ms_per_step"], 4)
            pr["collective_wait_ms_per_step"] = (round(match["wait_ms_per_step"], 4)
                                                 if match["wait_ms_per_step"] is not None else None)
    if len(rows) >= 2:
        slow = max(rows, key=lambda r: r["busy_ms_per_step"])
        fast = min(rows, key=lambda r: r["busy_ms_per_step"])
        skew = (slow["busy_ms_per_step"] - fast["busy_ms_per_step"]) / fast["busy_ms_per_step"]
        out.update({"busy_skew": round(skew, 6), "clearly_apart": _apart(slow["busy_steps"], fast["busy_steps"])})
        apart = out["clearly_apart"]
        if apart:
            out["straggler_rank"] = slow["rank"]
            # in a synchronous job the slowest rank is the busiest one, whatever the wall clock says
            ranks["slowest_rank_wall"] = ranks.get("slowest_rank")
            ranks["fastest_rank_wall"] = ranks.get("fastest_rank")
            ranks["slowest_rank"], ranks["fastest_rank"] = slow["rank"], fast["rank"]
            m = result.setdefault("metrics", {})
            wall = m.get("rank_step_skew") or 0.0
            if skew > wall:
                m["rank_step_skew"] = round(skew, 6)
                result.setdefault("notes", []).append(
                    f"rank_step_skew is the skew of busy time (step minus time in collectives): rank {slow['rank']} is "
                    f"busy {slow['busy_ms_per_step']:.2f} ms per step, rank {fast['rank']} "
                    f"{fast['busy_ms_per_step']:.2f} ms and waits for it; wall-clock step times of a synchronous job "
                    f"are equal (skew {wall:.1%})")
    ranks["rank_busy_skew"] = out["busy_skew"]
    if out["straggler_rank"] is not None:
        ranks["straggler_rank"] = out["straggler_rank"]
    return out


# A straggler must be busier than the fastest rank by this much (fraction of the fastest
# rank's busy time, and at least MIN_BUSY_GAP_MS) and in most steps, not in one noisy step.
MIN_BUSY_GAP = 0.1
MIN_BUSY_GAP_MS = 1.0


def _apart(slow: list[float], fast: list[float]) -> bool:
    """The slow rank's per-step busy times are clearly above the fast rank's: the medians
    differ by the minimum gap, and the slow rank is busier in at least two thirds of the
    steps (paired by step: the ranks' steps are synchronous)."""
    n = min(len(slow), len(fast))
    if n < 2:
        return False
    ms, mf = statistics.median(slow), statistics.median(fast)
    if ms - mf <= max(MIN_BUSY_GAP * mf, MIN_BUSY_GAP_MS):
        return False
    wins = sum(1 for a, b in zip(slow[:n], fast[:n]) if a > b)
    return wins >= math.ceil(2 * n / 3)
