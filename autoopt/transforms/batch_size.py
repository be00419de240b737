"""`batch_size`: the batch size that gives the most samples per second, found by
measurement (autoopt.search.batch), not "the largest that fits".

Changing the batch size changes training: the gradient noise and the number of steps
per epoch change, so the learning rate must follow — scale it with the batch (the linear
scaling rule: lr x new/old, Goyal et al. 2017) with a few epochs of warm-up, or keep the
effective batch with `grad_accumulation`. It is therefore `manual`: measured and
reported, never applied without the user's explicit acceptance. Inference models have
no learning rate; there only the latency per request changes.

Params: `batch_size` (the chosen size; required by `apply`). `previous` (the batch size
it replaces, for the caveat).

Config: `ExecConfig.batch_size`. Patch: the module-level `BATCH_SIZE = n` constant (set,
or added after the imports), which autoopt and the file's own code read.

Safety: manual. Tolerance 1e-3 relative — per-sample outputs of the same inputs agree to
fp32 rounding at another batch size (batched kernels tile differently); the loss of a
different batch is not comparable, so verification compares the shared samples.
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload


def lr_caveat(old: Optional[int], new: Optional[int], mode: str = "train") -> str:
    if mode != "train":
        return "a larger batch raises throughput but also the latency of each batch"
    ratio = f" (x{new / old:g})" if old and new else ""
    return (
        f"changing the batch size from {old} to {new} changes training: scale the learning rate with it"
        f"{ratio}, the linear scaling rule, with a few epochs of warm-up — or keep the effective batch "
        "with grad_accumulation"
    )


class BatchSize(Transform):
    name = "batch_size"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        b = params.get("batch_size")
        if b is not None and (not isinstance(b, int) or b < 1):
            return f"batch_size must be a positive integer, not {b!r}"
        if b is not None and b == workload.batch_size:
            return f"the batch size is already {b}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        out = {"previous": workload.batch_size}
        if params.get("batch_size") is not None:
            out["batch_size"] = int(params["batch_size"])
        return out

    def caveat(self, params: dict, mode: str = "train") -> str:
        return lr_caveat(params.get("previous"), params.get("batch_size"), mode)

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            raise ValueError("batch_size needs a chosen 'batch_size' param (run search_batch_size first)")
        return cfg.with_(batch_size=b)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            from autoopt.patching.editor import PatchError

            raise PatchError("no batch size was chosen")
        editor.set_constant(
            "BATCH_SIZE", str(b),
            comment=f"autoopt (batch_size): {self.caveat(params, workload.mode if workload else 'train')}",
        )
