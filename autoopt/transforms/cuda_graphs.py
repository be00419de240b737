"""`cuda_graphs`: replay the step's kernels from CUDA graphs (torch.compile's
"reduce-overhead" mode, which captures CUDA graphs for static shapes through cudagraph
trees), removing per-kernel launch overhead for launch-bound models.

Refused with a reason on the CPU and for workloads whose batch shapes change (each new
shape is a new capture). Memory: the graph pool keeps its buffers alive.

Params: `backend` (default "inductor"). Config: `ExecConfig.cuda_graphs = True` and
`ExecConfig.compile_mode = "reduce-overhead"` (overriding a plain `compile` mode: the
two are one torch.compile call).

Patch: `build_model` returns `torch.compile(<model>, mode="reduce-overhead")` (an
existing torch.compile from the `compile` transform gets its mode changed instead).

Safety: safe. Tolerance 1e-3 relative, as for compile: the same Inductor kernels,
replayed; differences are fp32 rounding from fusion.
"""
from __future__ import annotations

from typing import Optional

from autoopt.transforms.base import Transform
from autoopt.transforms.compile import compiler_problem, patch_compile
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


class CudaGraphs(Transform):
    name = "cuda_graphs"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        if caps.device_type != "cuda":
            return "CUDA graphs need a CUDA device; this run is on the CPU"
        facts = workload_facts(workload)
        if facts.get("workload.static_shapes") is False:
            return "batch shapes change between steps; every new shape would be captured again"
        if facts.get("workload.compiled"):
            return "build_model() already returns a torch.compile'd module"
        return compiler_problem(caps, params.get("backend", "inductor"))

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return {"backend": params.get("backend", "inductor")}

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        backend = params.get("backend") or (cfg.compile_backend if cfg.compile_mode else "inductor")
        return cfg.with_(cuda_graphs=True, compile_mode="reduce-overhead", compile_backend=backend)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        patch_compile(editor, "reduce-overhead", params.get("backend", "inductor"))
