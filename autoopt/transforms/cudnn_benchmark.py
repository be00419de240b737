"""`cudnn_benchmark`: `torch.backends.cudnn.benchmark = True`, so cuDNN times its
convolution algorithms for each new input shape once and keeps the fastest.

Only for convolutions on a CUDA device with static input shapes (each new shape pays a
new benchmark).

Params: none. Config: `ExecConfig.cudnn_benchmark = True`.
Patch: `torch.backends.cudnn.benchmark = True` at module level, after the imports.

Safety: safe. Tolerance 1e-3 relative: another fp32 convolution algorithm sums in
another order (fp32 rounding, ~1e-6 per op, growing over layers and training steps).
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


class CudnnBenchmark(Transform):
    name = "cudnn_benchmark"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        if caps.device_type != "cuda":
            return "cudnn.benchmark tunes cuDNN convolutions on a GPU; this run is on the CPU"
        facts = workload_facts(workload)
        if not facts.get("model.conv_count"):
            return "the model has no convolutions for cuDNN to tune"
        if facts.get("workload.static_shapes") is False:
            return "batch shapes change between steps; every new shape would be benchmarked again"
        if facts.get("env.cudnn_benchmark"):
            return "torch.backends.cudnn.benchmark is already on"
        return None

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        return cfg.with_(cudnn_benchmark=True)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        editor.add_statements(
            "torch.backends.cudnn.benchmark = True\n",
            comment="autoopt (cudnn_benchmark): pick the fastest cuDNN convolution algorithm per shape",
        )
