"""Numerical verification of a variant against the baseline.

Both start from the same seed, so from the same initial weights (checked by checksum), and
run on the same batches (autoopt.run.session.seeded_batch, per rank in a distributed job).
In training, each verification step is one optimizer step of the session's own training
step (autoopt.run.apply.TrainingStep) on the baseline's batch, split into the variant's
micro-batches when it accumulates gradients. Compared:
- the outputs of the first forward pass (when both ran it on the same inputs): max absolute
  error, and the relative error max|variant - baseline| / max|baseline| per output tensor
  (norm-wise, so outputs near zero do not blow the ratio up);
- in training, the loss of every step: each step's relative difference must stay within
  the tolerance, which widens by half of itself per step (trajectories of two correct
  implementations drift apart slowly through rounding);
- where recorded (a distributed job), the parameters after the last step, within the
  tolerance widened to the last step;
- no inf or NaN anywhere.

Batch size and gradient accumulation change training semantics, not numerics: they are
verified at the baseline's batch size (their semantic change is reported, never hidden).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from autoopt.run.health import HealthMonitor
from autoopt.run.session import Session, seeded_batch, split_batch
from autoopt.types import Verification
from autoopt.workload import contract

DEFAULT_STEPS = 4
# Relative tolerance of fp32 reference against fp32 rounding noise when no transform says more.
FP32_TOLERANCE = 1e-4


@dataclass
class RunRecord:
    outputs: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)
    checksum: str = ""
    scaler_skips: int = 0
    health: Optional[dict] = None  # autoopt.run.health's summary, when asked for
    params: Optional[list[torch.Tensor]] = None  # after the last step, when asked for


@contextlib.contextmanager
def eager_rng_in_compiled_graphs():
    """Inductor draws random numbers (dropout) with its own generator unless
    `fallback_random` is set: a compiled model with dropout then computes different masks
    than eager from the same seed, and no tolerance tells that from a bug (BERT and GPT-2
    with their default dropout 0.1 differ by 5e-3). While set, the graphs compiled use
    eager's random streams; the setting is put back after."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - a torch without Inductor compiles nothing here
        yield
        return
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        yield
    finally:
        inductor_config.fallback_random = old


def record_run(s: Session, steps: int = DEFAULT_STEPS, *, keep_params: bool = False,
               health: bool = False) -> RunRecord:
    """Run a freshly built session on the verification batches and record what it computes.
    Call it before anything else steps the session, so it starts from the initial weights.
    A compiled session compiles here, with eager's random streams (eager_rng_in_compiled_graphs):
    its timing afterwards runs that graph, so a model with dropout is, if anything, timed a
    little slow (its own torch.compile draws with Inductor's faster generator).
    With `health`, a training run also reads gradient health on these steps
    (autoopt.run.health) into the record's `health`."""
    with eager_rng_in_compiled_graphs():
        return _record(s, steps, keep_params, health)


def _record(s: Session, steps: int, keep_params: bool, health: bool = False) -> RunRecord:
    workload = s.workload
    rec = RunRecord(outputs=[], checksum=s.initial_checksum)
    if not s.train:
        for i in range(2):
            out = s.infer_on(s.prepare(seeded_batch(workload, workload.batch_size, i, s.rank)))
            rec.outputs.extend(contract.output_tensors(out))
        return rec
    step = s.training_step
    step.count_skips = True
    if health:
        step.monitor = HealthMonitor(s.eager_model, scaler=s.scaler, fp16=s.cfg.amp_dtype == "float16",
                                     optimizer=s.optimizer)
    # the baseline's effective batch; a variant that accumulates runs it as its micro-batches
    effective = workload.batch_size if s.accum == 1 else s.cfg.batch_size * s.accum
    try:
        for i in range(steps):
            micro = split_batch(seeded_batch(workload, effective, i, s.rank), s.accum)
            keep = (lambda out: rec.outputs.extend(contract.output_tensors(out))) if i == 0 and s.accum == 1 else None
            loss = s.train_on([s.prepare(b) for b in micro], on_outputs=keep)
            rec.losses.append(float(loss.detach().float().cpu()))
    finally:
        step.count_skips = False
        monitor, step.monitor = step.monitor, None
        if monitor is not None:
            monitor.detach()
    rec.scaler_skips = step.skipped_steps
    if monitor is not None:
        rec.health = monitor.summary(rec.losses)
    if keep_params:
        rec.params = [p.detach().float().cpu().clone() for p in s.eager_model.parameters()]
    s.sync()
    return rec


def _nonfinite(rec: RunRecord) -> bool:
    if any(not math.isfinite(x) for x in rec.losses):
        return True
    if rec.params is not None and any(not bool(p.isfinite().all()) for p in rec.params):
        return True
    return any(not torch.isfinite(t).all() for t in rec.outputs)


def _max_errors(var: list[torch.Tensor], base: list[torch.Tensor]) -> tuple[float, float, Optional[str]]:
    """(max absolute error, max relative error, a shape problem or None) over paired tensors."""
    max_abs = max_rel = 0.0
    for a, b in zip(var, base):
        if a.shape != b.shape:
            return 0.0, 0.0, f"output shape changed: {tuple(b.shape)} -> {tuple(a.shape)}"
        if a.numel() == 0:
            continue
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return max_abs, max_rel, None


def _structural_problem(base: RunRecord, var: RunRecord) -> Optional[str]:
    if base.checksum and var.checksum and base.checksum != var.checksum:
        return "the variant did not start from the baseline's weights"
    if base.outputs and var.outputs and len(base.outputs) != len(var.outputs):
        return "the variant returned a different number of outputs"
    if base.params is not None and var.params is not None and len(base.params) != len(var.params):
        return "the variant has a different number of parameters"
    return None


def _loss_divergence(base: RunRecord, var: RunRecord, tol: float) -> tuple[list[float], str]:
    """Per-step relative loss differences, and why they fail (empty when they do not)."""
    rel = [abs(lv - lb) / max(abs(lb), 1e-12) for lb, lv in zip(base.losses, var.losses)]
    for i, r in enumerate(rel):
        allowed = tol * (1 + 0.5 * i)
        if r > allowed:
            return rel, (f"training loss diverged from the baseline at step {i + 1}: {var.losses[i]:.6g} vs "
                         f"{base.losses[i]:.6g} ({r:.2e} relative, allowed {allowed:.1e})")
    return rel, ""


def compare(base: RunRecord, var: RunRecord, tolerance: float) -> Verification:
    tol = max(tolerance, FP32_TOLERANCE)
    problem = _structural_problem(base, var)
    if problem:
        return Verification(False, None, None, tol, problem)
    if _nonfinite(var):
        return Verification(
            False, None, None, tol,
            "produced inf/NaN" + (f" ({var.scaler_skips} GradScaler step(s) skipped)" if var.scaler_skips else "")
            + " — reduced precision overflowed",
            losses_baseline=base.losses, losses_variant=var.losses,
        )
    paired = bool(base.outputs) and bool(var.outputs)
    max_abs, max_rel, shape = _max_errors(var.outputs, base.outputs) if paired else (0.0, 0.0, None)
    if shape:
        return Verification(False, None, None, tol, shape)
    loss_rel, reason = _loss_divergence(base, var, tol)
    if max_rel > tol:
        reason = f"outputs differ by {max_rel:.2e} relative (tolerance {tol:.1e})"
    worst = max([max_rel] + (loss_rel[:1] if paired else loss_rel))
    if not reason and base.params is not None and var.params is not None:
        p_abs, p_rel, _ = _max_errors(var.params, base.params)
        allowed = tol * (1 + 0.5 * max(len(base.losses) - 1, 0))
        max_abs, worst = max(max_abs, p_abs), max(worst, p_rel)
        if p_rel > allowed:
            reason = (f"parameters after {len(base.losses)} steps differ from the baseline's by {p_rel:.2e} "
                      f"relative (allowed {allowed:.1e})")
    return Verification(ok=not reason, max_abs_error=float(f"{max_abs:.6g}"), max_rel_error=float(f"{worst:.6g}"),
                        tolerance=tol, reason=reason, losses_baseline=base.losses, losses_variant=var.losses)
