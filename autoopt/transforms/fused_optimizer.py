"""`fused_optimizer`: the optimizer's multi-tensor (`foreach=True`) or single-kernel
(`fused=True`) implementation instead of a Python loop over parameters.

Adam, AdamW, SGD (and Adagrad on the CPU) have fused kernels on CPU and CUDA; most
torch.optim optimizers have foreach. On CUDA, PyTorch already defaults to foreach, so
the gain there is `fused`; on the CPU the default is the per-parameter loop, and fused
Adam/AdamW/SGD kernels replace it.

Params: `impl` ("fused" | "foreach"; default fused where the class and device support it,
else foreach). Config: `ExecConfig.optimizer_impl`; the applier rebuilds the optimizer
`build_optimizer` returned (autoopt.run.optimizers.rebuild_optimizer).

Patch: the `torch.optim.<Class>(...)` call in `build_optimizer` gets `fused=True` (or
`foreach=True`), and a conflicting keyword is dropped.

Safety: safe. Tolerance 1e-4 relative: the same update rule, vectorised; only the order
of fp32 operations inside an update differs (~1e-7 relative per step).
"""
from __future__ import annotations

from typing import Optional

from autoopt.run.optimizers import IMPLS, supported_impls
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


def _optimizer_info(workload: Workload, caps: Capabilities):
    facts = workload_facts(workload)
    cls = facts.get("_optimizer_class")
    name = facts.get("workload.optimizer") or ""
    if cls is None and name:
        import torch

        cls = getattr(torch.optim, name, None)
    return facts, cls, name


class FusedOptimizer(Transform):
    name = "fused_optimizer"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        facts, cls, name = _optimizer_info(workload, caps)
        if cls is None:
            return f"optimizer {name or '(none)'} is not a torch.optim class autoopt knows"
        impls = supported_impls(cls, caps.device_type)
        want = params.get("impl")
        if want is not None and want not in IMPLS:
            return f"impl must be 'fused' or 'foreach', not {want!r}"
        if want is not None and want not in impls:
            return f"{cls.__name__} has no {want} implementation on {caps.device_type}"
        if not impls:
            return f"{cls.__name__} has no foreach or fused implementation"
        cur = facts.get("workload.optimizer_impl") or "for-loop"
        target = want or impls[0]
        if cur == target:
            return f"{cls.__name__} already runs its {cur} implementation"
        if cur == "fused":
            return f"{cls.__name__} already runs its fused implementation"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        if params.get("impl"):
            return {"impl": params["impl"]}
        _, cls, _ = _optimizer_info(workload, caps)
        impls = supported_impls(cls, caps.device_type) if cls is not None else []
        return {"impl": impls[0] if impls else "foreach"}

    def candidates(self, workload: Workload, caps: Capabilities, params: dict) -> list[dict]:
        if params.get("impl"):
            return [{"impl": params["impl"]}]
        facts, cls, _ = _optimizer_info(workload, caps)
        if cls is None:
            return [self.resolve_params(workload, caps, params)]
        cur = facts.get("workload.optimizer_impl") or "for-loop"
        return [{"impl": i} for i in supported_impls(cls, caps.device_type) if i != cur] or [
            self.resolve_params(workload, caps, params)
        ]

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        impl = params.get("impl", "fused")
        if impl not in IMPLS:
            raise ValueError(f"impl must be 'fused' or 'foreach', not {impl!r}")
        return cfg.with_(optimizer_impl=impl)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        impl = params.get("impl", "fused")
        other = "foreach" if impl == "fused" else "fused"
        name = ""
        if workload is not None:
            name = workload_facts(workload).get("workload.optimizer") or ""
        callees = {name} if name else {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax",
                                        "NAdam", "RAdam", "ASGD", "Rprop"}
        editor.add_call_kwargs("build_optimizer", callees, {impl: "True"}, remove={other})
