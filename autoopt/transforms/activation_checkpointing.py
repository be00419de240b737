"""`activation_checkpointing`: recompute the repeated blocks' activations in backward
instead of keeping them (torch.utils.checkpoint, use_reentrant=False).

It costs time (each checkpointed block runs forward twice, typically +20..40 % step
time, which the variant's measurement reports) and saves activation memory; it is worth
it only to make room for a larger batch when memory is the limit, so the search pairs
it with `batch_size`.

The repeated blocks are the longest run of same-type children in any
ModuleList / Sequential (transformer layers, residual blocks). The module tree and
state_dict keys stay the same: only the blocks' `forward` is replaced.

Params: none. Config: `ExecConfig.activation_checkpointing`; the applier
(autoopt.run.apply.place_model) checkpoints the blocks after `.to(device)`.

Patch: a plain-PyTorch helper `_autoopt_checkpoint_blocks` (the same code the applier
uses) is added to the file and `build_model` returns `_autoopt_checkpoint_blocks(<model>)`.

Safety: safe. Tolerance 1e-4 relative: the recomputation runs the same kernels on the
same inputs with the RNG state restored (dropout matches); results agree to fp32
rounding, usually exactly.
"""
from __future__ import annotations

import inspect
from typing import Optional

from autoopt.torch_helpers import _autoopt_checkpoint_blocks, _autoopt_repeated_blocks
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


class ActivationCheckpointing(Transform):
    name = "activation_checkpointing"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        n = workload_facts(workload).get("model.repeated_block_count") or 0
        if n < 2:
            return "the model has no repeated blocks (a ModuleList/Sequential run of same-type layers) to checkpoint"
        return None

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        return cfg.with_(activation_checkpointing=True)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        editor.add_function(inspect.getsource(_autoopt_repeated_blocks))
        editor.add_function(inspect.getsource(_autoopt_checkpoint_blocks))
        editor.wrap_return("build_model", "_autoopt_checkpoint_blocks({})")
