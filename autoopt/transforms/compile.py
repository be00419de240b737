"""`compile`: torch.compile the model (TorchDynamo + Inductor by default).

Fuses elementwise chains and removes Python overhead; compile time is paid once and is
reported apart from step time (Measurement.compile_time_s). A compile failure is recorded
on the variant as `failed` with its message, never fatal (the search records it).

Params: `mode` ("default" | "max-autotune-no-cudagraphs" | "reduce-overhead" |
"max-autotune"; default "default"), `backend` (default "inductor"; tests use
"aot_eager" to exercise the plumbing without code generation). `candidates()` lists the
modes worth measuring on the device (the search picks one by measurement).

Config: `ExecConfig.compile_mode`, `ExecConfig.compile_backend` ("reduce-overhead" also
sets `cuda_graphs`).

Patch: `build_model` returns `torch.compile(<model>, mode="...")` (the innermost
transforms — channels_last, checkpointing — are applied first, so compile wraps them). A
compiled module's state_dict keys gain an `_orig_mod.` prefix; load checkpoints into
`model._orig_mod` or before compiling.

Safety: safe. Tolerance 1e-3 relative: same fp32 math, but fused kernels and reordered
reductions round differently (~1e-6 per op), accumulating over layers and the training
steps verification compares.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts

MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compiler_problem(caps: Capabilities, backend: str = "inductor") -> Optional[str]:
    """Why torch.compile cannot work here (None when it can)."""
    try:
        import torch._dynamo

        if hasattr(torch._dynamo, "is_dynamo_supported") and not torch._dynamo.is_dynamo_supported():
            return "torch.compile (TorchDynamo) is not supported on this Python / platform"
    except Exception as exc:  # an unusable torch install is a reason, not a crash
        return f"torch.compile is unavailable: {exc}"
    if backend != "inductor":
        return None
    if caps.device_type == "cpu":
        cxx = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in cxx):
            return "Inductor on the CPU needs a C++ compiler (g++ or clang++) on PATH, and none was found"
    elif importlib.util.find_spec("triton") is None:
        return "Inductor on the GPU needs Triton, which is not installed (pip install triton)"
    return None


def patch_compile(editor, mode: str, backend: str) -> None:
    """build_model returns torch.compile(...) with this mode/backend; an existing
    torch.compile(...) return (from compile or cuda_graphs) is updated, not wrapped twice."""
    kwargs = {"mode": f'"{mode}"'}
    if backend != "inductor":
        kwargs["backend"] = f'"{backend}"'
    editor.ensure_import("torch")
    if editor.update_return_call("build_model", "torch.compile", kwargs):
        return
    extra = "".join(f", {k}={v}" for k, v in kwargs.items())
    editor.wrap_return("build_model", "torch.compile({}" + extra + ")")


class Compile(Transform):
    name = "compile"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        mode = params.get("mode", "default")
        if mode not in MODES:
            return f"unknown torch.compile mode {mode!r}; use one of {', '.join(MODES)}"
        if mode in _CUDA_GRAPH_MODES and caps.device_type != "cuda":
            return f"mode {mode!r} captures CUDA graphs, which need a CUDA device"
        if workload_facts(workload).get("workload.compiled"):
            return "build_model() already returns a torch.compile'd module"
        return compiler_problem(caps, params.get("backend", "inductor"))

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return {"mode": params.get("mode", "default"), "backend": params.get("backend", "inductor")}

    def candidates(self, workload: Workload, caps: Capabilities, params: dict) -> list[dict]:
        base = self.resolve_params(workload, caps, params)
        if "mode" in params or caps.device_type != "cuda":
            return [base]
        modes = ["default", "max-autotune-no-cudagraphs"]
        if workload_facts(workload).get("workload.static_shapes") is not False:
            modes.append("reduce-overhead")
        return [dict(base, mode=m) for m in modes]

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        mode = params.get("mode", "default")
        if mode not in MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}")
        cfg = cfg.with_(compile_mode=mode, compile_backend=params.get("backend", "inductor"))
        if mode == "reduce-overhead":
            cfg = cfg.with_(cuda_graphs=True)
        return cfg

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        patch_compile(editor, params.get("mode", "default"), params.get("backend", "inductor"))
