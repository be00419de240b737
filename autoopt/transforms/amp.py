"""`amp`: automatic mixed precision with torch.autocast around forward and loss.

bf16 where the device has fast bf16 math (Ampere+ GPUs; CPUs with AVX-512 BF16 / AMX),
else fp16 with a GradScaler in training (fp16's 5-bit exponent underflows small
gradients without loss scaling). Autocast covers the forward pass and the loss only,
never backward (backward runs in the dtypes autocast chose for forward).

Params: `dtype` ("bfloat16" | "float16"; default from the device), `grad_scaler` (bool;
default: training with float16).

Config: `ExecConfig.amp_dtype`, `ExecConfig.grad_scaler`.

Patch: the body of `forward(model, batch)` is wrapped in
`with torch.autocast("<device>", dtype=torch.<dtype>):` (a file without `forward` gets
the default one first). For fp16 training the patch adds a module-level
`GRAD_SCALER = torch.amp.GradScaler("<device>")` object — a contract extension the
applier honours: when the model file defines GRAD_SCALER, the training step runs
`GRAD_SCALER.scale(loss).backward(); GRAD_SCALER.step(opt); GRAD_SCALER.update()`.

Safety: unsafe (changes numerics). Tolerance (relative, outputs and loss): bf16 5e-2 —
bf16 keeps 8 mantissa bits (unit roundoff 2^-9 ~ 2e-3 per rounding), errors add up over
layers and over the training steps verification compares; fp16 1e-2 — 11 mantissa bits
(2^-12 ~ 2.4e-4 per rounding), about 8x tighter than bf16 but still far above fp32, and
its narrow range shows up as inf/NaN (rejected by verification) rather than as drift.
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform, fmt_dtype
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts

DTYPES = ("bfloat16", "float16")
TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2}


class Amp(Transform):
    name = "amp"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        dtype = params.get("dtype")
        if dtype is not None and fmt_dtype(dtype) not in DTYPES:
            return f"amp dtype must be one of {', '.join(DTYPES)}, not {dtype!r}"
        if workload_facts(workload).get("workload.autocast"):
            return "forward() already runs under torch.autocast"
        if dtype is None:
            if caps.device_type == "cpu" and not caps.bf16:
                return (
                    "this CPU has no fast bf16 math (AVX-512 BF16 or AMX), so autocast would rarely "
                    "pay off; pass dtype='bfloat16' explicitly to measure it anyway"
                )
            if caps.device_type == "cuda" and not (caps.bf16 or caps.fp16 or caps.tensor_cores):
                return (
                    f"{caps.name or 'this GPU'} has no tensor cores for fp16/bf16 math; pass a dtype "
                    "explicitly to measure it anyway"
                )
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        dtype = params.get("dtype")
        if dtype is None:
            dtype = "bfloat16" if (caps.bf16 or caps.device_type == "cpu") else "float16"
        dtype = fmt_dtype(dtype)
        scaler = params.get("grad_scaler")
        if scaler is None:
            scaler = workload.mode == "train" and dtype == "float16"
        return {"dtype": dtype, "grad_scaler": bool(scaler)}

    def tolerance_for(self, params: dict) -> float:
        return TOLERANCE.get(fmt_dtype(params.get("dtype") or "bfloat16"), self.tolerance)

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        dtype = fmt_dtype(params.get("dtype") or "bfloat16")
        if dtype not in DTYPES:
            raise ValueError(f"amp dtype must be one of {DTYPES}, not {dtype!r}")
        return cfg.with_(amp_dtype=dtype, grad_scaler=bool(params.get("grad_scaler", False)))

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        dtype = fmt_dtype(params.get("dtype") or "bfloat16")
        device = workload.device if workload is not None else "cuda"
        editor.ensure_import("torch")
        editor.wrap_body("forward", f'torch.autocast("{device}", dtype=torch.{dtype})')
        if params.get("grad_scaler"):
            editor.set_constant(
                "GRAD_SCALER",
                f'torch.amp.GradScaler("{device}")',
                comment="autoopt (amp): fp16 loss scaling; the training step scales the loss with it",
            )
