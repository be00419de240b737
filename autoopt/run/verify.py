"""Numerical verification of a variant against the baseline.

Both start from the same seed, so from the same initial weights (checked by checksum), and
run on the same batches (autoopt.run.session.seeded_batch). Compared:
- the outputs of the first forward pass: max absolute error, and the relative error
  max|variant - baseline| / max|baseline| per output tensor (norm-wise, so outputs near zero
  do not blow the ratio up);
- in training, the loss over several optimizer steps: each step's relative difference must
  stay within the tolerance, which widens by half of itself per step (trajectories of two
  correct implementations drift apart slowly through rounding);
- no inf or NaN anywhere.

Batch size and gradient accumulation change training semantics, not numerics: they are
verified at the baseline's batch size (their semantic change is reported, never hidden).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from autoopt.workload import contract
from autoopt.run.session import Session, seeded_batch
from autoopt.types import Verification

DEFAULT_STEPS = 4
# Relative tolerance of fp32 reference against fp32 rounding noise when no transform says more.
FP32_TOLERANCE = 1e-4


@dataclass
class RunRecord:
    outputs: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)
    checksum: str = ""
    scaler_skips: int = 0


def record_run(s: Session, steps: int = DEFAULT_STEPS) -> RunRecord:
    """Run a freshly built session on the verification batches and record what it computes.
    Call it before anything else steps the session, so it starts from the initial weights."""
    workload = s.workload
    bs = workload.batch_size
    rec = RunRecord(outputs=[], checksum=s.initial_checksum)
    if s.train:
        for i in range(steps):
            b = s.prepare(seeded_batch(workload, bs, i))
            with s.autocast():
                out = contract.call_forward(s.spec, s.model, b)
                loss = contract.extract_loss(out)
            if i == 0:
                rec.outputs = contract.output_tensors(out)
            rec.losses.append(float(loss.detach().float().cpu()))
            if s.scaler is not None:
                scale_before = s.scaler.get_scale()
                s.scaler.scale(loss).backward()
                s.scaler.step(s.optimizer)
                s.scaler.update()
                if s.scaler.get_scale() < scale_before:
                    rec.scaler_skips += 1
            else:
                loss.backward()
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        return rec
    for i in range(2):
        out = s.infer_on(s.prepare(seeded_batch(workload, bs, i)))
        rec.outputs.extend(contract.output_tensors(out))
    return rec


def _nonfinite(rec: RunRecord) -> bool:
    if any(not math.isfinite(x) for x in rec.losses):
        return True
    return any(not torch.isfinite(t).all() for t in rec.outputs)


def compare(base: RunRecord, var: RunRecord, tolerance: float) -> Verification:
    tol = max(tolerance, FP32_TOLERANCE)
    if base.checksum and var.checksum and base.checksum != var.checksum:
        return Verification(False, None, None, tol, "the variant did not start from the baseline's weights")
    if _nonfinite(var):
        return Verification(
            False, None, None, tol,
            "produced inf/NaN" + (f" ({var.scaler_skips} GradScaler step(s) skipped)" if var.scaler_skips else "")
            + " — reduced precision overflowed",
            losses_baseline=base.losses, losses_variant=var.losses,
        )
    if len(base.outputs) != len(var.outputs):
        return Verification(False, None, None, tol, "the variant returned a different number of outputs")
    max_abs = 0.0
    max_rel = 0.0
    for a, b in zip(var.outputs, base.outputs):
        if a.shape != b.shape:
            return Verification(False, None, None, tol, f"output shape changed: {tuple(b.shape)} -> {tuple(a.shape)}")
        if a.numel() == 0:
            continue
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    loss_rel = []
    for i, (lb, lv) in enumerate(zip(base.losses, var.losses)):
        loss_rel.append(abs(lv - lb) / max(abs(lb), 1e-12))
    ok = max_rel <= tol
    reason = ""
    if not ok:
        reason = f"outputs differ by {max_rel:.2e} relative (tolerance {tol:.1e})"
    else:
        for i, r in enumerate(loss_rel):
            allowed = tol * (1 + 0.5 * i)
            if r > allowed:
                ok = False
                reason = (
                    f"training loss diverged from the baseline at step {i + 1}: {var.losses[i]:.6g} vs "
                    f"{base.losses[i]:.6g} ({r:.2e} relative, allowed {allowed:.1e})"
                )
                break
    worst = max([max_rel] + loss_rel[:1]) if loss_rel else max_rel
    return Verification(
        ok=ok,
        max_abs_error=float(f"{max_abs:.6g}"),
        max_rel_error=float(f"{worst:.6g}"),
        tolerance=tol,
        reason=reason,
        losses_baseline=base.losses,
        losses_variant=var.losses,
    )
