"""`tf32`: TF32 tensor-core math for fp32 matmuls and convolutions (Ampere and newer):
`torch.set_float32_matmul_precision("high")` and `torch.backends.cudnn.allow_tf32 = True`.

Params: none (`precision`: "high" or "medium", default "high").
Config: `ExecConfig.matmul_precision` (the applier also sets cuDNN allow_tf32 on cuda).

Patch: those two statements at module level, after the imports (they take effect when
the model file is imported).

Safety: unsafe (fp32 inputs are rounded to 10 mantissa bits inside the tensor cores).
Tolerance 1e-2 relative: TF32's unit roundoff is 2^-11 ~ 5e-4 per multiply (accumulation
stays fp32); over a deep network's layers and the compared training steps that grows
to the 1e-3 range, and 1e-2 leaves room without admitting a real bug.
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


class TF32(Transform):
    name = "tf32"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        if params.get("precision", "high") not in ("high", "medium"):
            return f"precision must be 'high' or 'medium', not {params.get('precision')!r}"
        if caps.device_type != "cuda":
            return "TF32 is a GPU tensor-core mode (Ampere and newer); this run is on the CPU"
        if not caps.tf32:
            cc = caps.compute_capability_float
            return f"{caps.name or 'this GPU'} (compute capability {cc}) has no TF32 tensor cores; they start at 8.0"
        current = workload_facts(workload).get("env.matmul_precision")
        if current in ("high", "medium"):
            return f"float32 matmul precision is already {current!r}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return {"precision": params.get("precision", "high")}

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        return cfg.with_(matmul_precision=params.get("precision", "high"))

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        editor.add_statements(
            f'torch.set_float32_matmul_precision("{params.get("precision", "high")}")\n'
            "torch.backends.cudnn.allow_tf32 = True\n",
            comment="autoopt (tf32): TF32 tensor cores for fp32 matmuls and convolutions",
        )
