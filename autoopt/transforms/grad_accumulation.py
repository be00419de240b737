"""`grad_accumulation`: keep the effective batch when the wanted batch does not fit —
k micro-batches of B/k samples, gradients summed, one optimizer step.

The applier divides each micro-batch loss by k (so the summed gradient is the mean over
the effective batch, as with one batch of B) and steps every k micro-batches.
BatchNorm sees micro-batches (its statistics use B/k samples), and anything counting
optimizer steps sees 1/k as many per sample — so it is `manual`, like batch_size.

Params: `steps` (k, >= 2) and optionally `effective_batch_size` (default: the config's
current batch size, e.g. the one batch_size chose). Config: `ExecConfig.batch_size` becomes
the micro-batch (effective / k, which must divide evenly) and `grad_accum_steps = k`;
the samples per optimizer step are batch_size x grad_accum_steps.

Patch: `BATCH_SIZE = <micro-batch>` and `GRAD_ACCUM_STEPS = k` at module level — a
contract extension the applier honours: a model file with GRAD_ACCUM_STEPS runs k
micro-batches (loss / k, backward each) per optimizer step.

Safety: manual. Tolerance 1e-3 relative: without batch-dependent layers the accumulated
gradient equals the full batch's up to fp32 summation order; with BatchNorm the outputs
differ by more, and verification decides.
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload


class GradAccumulation(Transform):
    name = "grad_accumulation"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        k = params.get("steps", 2)
        if not isinstance(k, int) or k < 2:
            return f"steps must be an integer >= 2, not {k!r}"
        eff = params.get("effective_batch_size", workload.batch_size)
        if eff % k:
            return f"the effective batch {eff} does not split into {k} equal micro-batches"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        out = {"steps": int(params.get("steps", 2))}
        if params.get("effective_batch_size") is not None:
            out["effective_batch_size"] = int(params["effective_batch_size"])
        return out

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        k = int(params.get("steps", 2))
        eff = int(params.get("effective_batch_size") or cfg.batch_size)
        if k < 2 or eff % k:
            raise ValueError(f"cannot split an effective batch of {eff} into {k} equal micro-batches")
        return cfg.with_(batch_size=eff // k, grad_accum_steps=k)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        k = int(params.get("steps", 2))
        eff = params.get("effective_batch_size")
        if eff is None:
            current = editor.get_constant("BATCH_SIZE")
            if current is not None and current.isdigit():
                eff = int(current)
            elif workload is not None:
                eff = workload.batch_size
            else:
                from autoopt.patching.editor import PatchError

                raise PatchError("the effective batch size is unknown")
        if eff % k:
            from autoopt.patching.editor import PatchError

            raise PatchError(f"the effective batch {eff} does not split into {k} micro-batches")
        editor.set_constant("BATCH_SIZE", str(eff // k),
                            comment=f"autoopt (grad_accumulation): {eff // k} samples per micro-batch, effective "
                                    f"batch {eff}")
        editor.set_constant(
            "GRAD_ACCUM_STEPS", str(k),
            comment=f"autoopt (grad_accumulation): {k} micro-batches per optimizer step (effective batch {eff})",
        )
