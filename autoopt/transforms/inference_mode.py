"""`inference_mode`: run an inference model under torch.inference_mode() (no autograd
bookkeeping, no version counters), optionally with reduced-precision weights.

Params: `weights_dtype` (None | "bfloat16" | "float16"; default None = fp32 weights).
With a weights dtype the model's floating-point parameters and buffers are cast after
`.to(device)` and the floating-point inputs are cast to the same dtype (the applier does
that for `ExecConfig.weights_dtype`; the patch adds it to forward).

Config: `ExecConfig.inference_mode = True`, `ExecConfig.weights_dtype`.

Patch: `forward`'s body runs under `with torch.inference_mode():`; with a weights dtype,
`build_model` returns `<model>.to(torch.<dtype>)` and forward starts with
`batch = _autoopt_cast_floats(batch, torch.<dtype>)` (a plain-PyTorch helper added to the
file).

Safety: safe without a weights dtype (tolerance 1e-5: the same kernels; only autograd
bookkeeping is skipped, so results match to the last bits); unsafe with one (weights and
activations rounded: bf16 5e-2 for 8 mantissa bits, fp16 1e-2 for 11, as for amp, but
with no fp32 islands, so verification decides).
"""
from __future__ import annotations

import inspect
from typing import Optional

from autoopt.torch_helpers import _autoopt_cast_floats
from autoopt.transforms.base import Transform, fmt_dtype
from autoopt.types import Capabilities, ExecConfig, Workload

WEIGHT_DTYPES = ("bfloat16", "float16")
TOLERANCE = {None: 1e-5, "bfloat16": 5e-2, "float16": 1e-2}


class InferenceMode(Transform):
    name = "inference_mode"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return "training needs autograd; inference_mode only applies to inference-only models"
        wd = params.get("weights_dtype")
        if wd is not None and fmt_dtype(wd) not in WEIGHT_DTYPES:
            return f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {wd!r}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        wd = params.get("weights_dtype")
        return {"weights_dtype": fmt_dtype(wd) if wd else None}

    def tolerance_for(self, params: dict) -> float:
        wd = params.get("weights_dtype")
        return TOLERANCE.get(fmt_dtype(wd) if wd else None, self.tolerance)

    def safety_for(self, params: dict) -> str:
        return "unsafe" if params.get("weights_dtype") else "safe"

    def describe(self, params: dict) -> str:
        wd = params.get("weights_dtype")
        return f"inference_mode(weights_dtype={wd})" if wd else "inference_mode"

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        wd = params.get("weights_dtype")
        wd = fmt_dtype(wd) if wd else None
        if wd is not None and wd not in WEIGHT_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHT_DTYPES}, not {wd!r}")
        return cfg.with_(inference_mode=True, weights_dtype=wd)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        wd = params.get("weights_dtype")
        editor.wrap_body("forward", "torch.inference_mode()")
        if wd:
            wd = fmt_dtype(wd)
            editor.wrap_return("build_model", "{}.to(torch." + wd + ")")
            editor.add_function(inspect.getsource(_autoopt_cast_floats))
            _, batch = editor.forward_params()
            editor.prepend("forward", f"{batch} = _autoopt_cast_floats({batch}, torch.{wd})\n")
