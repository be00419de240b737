"""The convergence check of an accepted change of training (a larger batch with its scaled
learning rate, gradient accumulation, any `manual` transform): does the changed run still
train like the baseline?

The configuration without the change (the baseline of the check) and the candidate are
trained from the model file's initial weights for `steps` optimizer steps each, on fresh
batches from make_batch (seeded: every run of one seed sees the same data stream at its
own batch size). The baseline runs with SEEDS seeds (weights and data), the candidate with
the first of them. Both run eager (without torch.compile or CUDA graphs, which change how fast,
not what, a step computes).

The losses are compared at equal numbers of optimizer steps, not at equal samples seen: the
candidate sees k x the samples per step, and at equal samples a run of N steps would leave
it N / k steps, too few to say anything. What the check catches is a learning-rate rule
that destabilises training (divergence, a loss that stalls above the baseline's), not the
epoch-level equivalence of the two (which only a full training run shows).

Each curve's final loss is smoothed: the mean of its last quarter (at least 3 steps). The
band is the baseline seeds' smoothed final losses widened by their spread (at least
BAND_FLOOR of their mean, since 2-3 seeds underestimate it): [min - w, max + w]. The
candidate is kept when its smoothed final loss is finite and lies within or below the band.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from autoopt.run.session import Session, seeded_batch, split_batch
from autoopt.types import ExecConfig, Workload

SEEDS = 3
BAND_FLOOR = 0.05  # the band's half-width is at least 5 % of the baseline's final loss
MIN_STEPS, MAX_STEPS = 20, 200
BUDGET_SHARE = 0.10  # the default number of steps: as many as fit in 10 % of the time budget


def default_steps(step_time_s: Optional[float], time_budget_s: Optional[float]) -> int:
    """Steps of the check when --convergence-steps is not given: as many baseline steps as fit
    in BUDGET_SHARE of the time budget (the check trains SEEDS + 1 runs of them), clamped to
    [MIN_STEPS, MAX_STEPS]; MIN_STEPS when either is unknown."""
    if not step_time_s or not time_budget_s or step_time_s <= 0:
        return MIN_STEPS
    n = int(BUDGET_SHARE * time_budget_s / (step_time_s * (SEEDS + 1)))
    return max(MIN_STEPS, min(MAX_STEPS, n))


def smoothed_final(curve: list[float]) -> float:
    """The mean of the curve's last quarter (at least 3 steps); inf when any of it is not finite."""
    if not curve:
        return math.inf
    tail = curve[-max(3, len(curve) // 4):]
    if not all(math.isfinite(x) for x in tail):
        return math.inf
    return sum(tail) / len(tail)


def loss_curve(workload: Workload, cfg: ExecConfig, steps: int, seed: int) -> list[float]:
    """The training loss of `steps` optimizer steps of cfg from `seed`; once a loss is not
    finite the run stops and the rest of the curve is inf."""
    wl = dataclasses.replace(workload, seed=seed)
    out: list[float] = []
    with Session(wl, cfg, build_loader=False) as s:
        s.activate()
        for i in range(steps):
            micro = split_batch(seeded_batch(wl, cfg.batch_size * s.accum, i), s.accum)
            loss = float(s.train_on([s.prepare(b) for b in micro]).detach().float().cpu())
            out.append(loss)
            if not math.isfinite(loss):
                out.extend([math.inf] * (steps - i - 1))
                break
        s.sync()
    return out


def _r(x: float) -> Optional[float]:
    return float(f"{x:.6g}") if math.isfinite(x) else None


@dataclass
class Convergence:
    steps: int
    seeds: list[int]
    baseline_curves: list[list[float]] = field(default_factory=list)
    candidate_curve: list[float] = field(default_factory=list)

    @property
    def band(self) -> tuple[float, float]:
        finals = [smoothed_final(c) for c in self.baseline_curves]
        lo, hi = min(finals), max(finals)
        if not math.isfinite(hi):
            return lo, hi
        mean = sum(finals) / len(finals)
        w = max(hi - lo, BAND_FLOOR * abs(mean))
        return lo - w, hi + w

    def to_json(self) -> dict[str, Any]:
        finals = [smoothed_final(c) for c in self.baseline_curves]
        base = sum(finals) / len(finals)
        lo, hi = self.band
        cand = smoothed_final(self.candidate_curve)
        if not math.isfinite(base):
            ok, reason = True, "the baseline itself does not train to a finite loss: nothing to compare with"
        elif not math.isfinite(cand):
            ok, reason = False, (f"the candidate's loss went inf/NaN within {self.steps} steps (the baseline's "
                                 f"ends at {base:.4g}, band {lo:.4g}-{hi:.4g})")
        elif cand <= hi:
            ok, reason = True, (f"the candidate's smoothed loss after {self.steps} steps, {cand:.4g}, lies "
                                f"{'within' if cand >= lo else 'below'} the baseline's band {lo:.4g}-{hi:.4g} "
                                f"({len(self.seeds)} seeds)")
        else:
            ok, reason = False, (f"the candidate's smoothed loss after {self.steps} steps, {cand:.4g}, lies above "
                                 f"the baseline's band {lo:.4g}-{hi:.4g} ({len(self.seeds)} seeds, final "
                                 f"{base:.4g}): it does not train like the baseline")
        return {"steps": self.steps, "seeds": list(self.seeds), "baseline_final_loss": _r(base),
                "band": [_r(lo), _r(hi)], "candidate_final_loss": _r(cand), "ok": ok, "reason": reason,
                "compared_at": "equal optimizer steps",
                "baseline_curves": [[_r(x) for x in c] for c in self.baseline_curves],
                "candidate_curve": [_r(x) for x in self.candidate_curve]}


def check_convergence(workload: Workload, base_cfg: ExecConfig, cfg: ExecConfig, steps: int,
                      seeds: int = SEEDS) -> dict[str, Any]:
    """The check of the module docstring: report.json's variant "convergence"."""
    seed_list = [workload.seed + i for i in range(seeds)]
    # eager: torch.compile and CUDA graphs do not change what trains, and compiling four runs costs minutes
    base_cfg, cfg = (c.with_(compile_mode=None, cuda_graphs=False) for c in (base_cfg, cfg))
    res = Convergence(steps, seed_list)
    res.baseline_curves = [loss_curve(workload, base_cfg, steps, s) for s in seed_list]
    res.candidate_curve = loss_curve(workload, cfg, steps, seed_list[0])
    return res.to_json()
