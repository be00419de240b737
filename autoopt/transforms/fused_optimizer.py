"""`fused_optimizer`: the optimizer's multi-tensor (`foreach=True`) or single-kernel
(`fused=True`) implementation instead of a Python loop over parameters.

Adam, AdamW, SGD (and Adagrad on the CPU) have fused kernels on CPU and CUDA; most
torch.optim optimizers have foreach. On CUDA, PyTorch already defaults to foreach, so
the gain there is `fused`; on the CPU the default is the per-parameter loop, and fused
Adam/AdamW/SGD kernels replace it.

Params: `impl` ("fused" | "foreach"; default fused where the class and device support it,
else foreach). Config: `ExecConfig.optimizer_impl`; the runner calls
`rebuild_optimizer(optimizer, impl, device_type)` on the optimizer `build_optimizer`
returned.

Patch: the `torch.optim.<Class>(...)` call in `build_optimizer` gets `fused=True` (or
`foreach=True`), and a conflicting keyword is dropped.

Safety: safe. Tolerance 1e-4 relative: the same update rule, vectorised; only the order
of fp32 operations inside an update differs (~1e-7 relative per step).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from autoopt.transforms import Transform, inspect_workload, register
from autoopt.types import Capabilities, ExecConfig, Workload

IMPLS = ("fused", "foreach")
# optimizers whose fused kernel exists on fewer devices than torch's general list
_FUSED_DEVICES_OVERRIDE = {"Adagrad": ("cpu",)}


def fused_devices(cls) -> tuple[str, ...]:
    """Devices on which cls(fused=True) has kernels (empty when it has no fused impl)."""
    if "fused" not in inspect.signature(cls.__init__).parameters:
        return ()
    for base in cls.__mro__:
        if base.__name__ in _FUSED_DEVICES_OVERRIDE and base.__module__.startswith("torch.optim"):
            return _FUSED_DEVICES_OVERRIDE[base.__name__]
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch
        return ("cuda",)


def supported_impls(cls, device_type: str) -> list[str]:
    """The implementations cls offers on device_type, best first."""
    params = inspect.signature(cls.__init__).parameters
    out = []
    if device_type in fused_devices(cls):
        out.append("fused")
    if "foreach" in params:
        out.append("foreach")
    return out


def current_impl(foreach, fused, device_type: str) -> str:
    """What an optimizer with these defaults runs: 'fused', 'foreach' or 'for-loop'
    (PyTorch picks foreach by itself when both are None and the params are on CUDA)."""
    if fused:
        return "fused"
    if foreach or (foreach is None and not fused and device_type == "cuda"):
        return "foreach"
    return "for-loop"


def rebuild_optimizer(optimizer, impl: str, device_type: str) -> torch.optim.Optimizer:
    """The same optimizer class over the same parameter groups with the same
    hyper-parameters (and the same state, when it has taken steps), running the `impl`
    ("fused" | "foreach") implementation. Raises ValueError with the reason when the
    class or the device does not support it. An LR scheduler built on the old optimizer
    must be rebuilt on the new one."""
    cls = type(optimizer)
    if impl not in IMPLS:
        raise ValueError(f"optimizer implementation must be 'fused' or 'foreach', not {impl!r}")
    sig = inspect.signature(cls.__init__).parameters
    if impl not in sig:
        raise ValueError(f"{cls.__name__} has no {impl} implementation")
    other = "foreach" if impl == "fused" else "fused"
    groups = optimizer.param_groups
    if impl == "fused":
        devices = fused_devices(cls)
        if device_type not in devices:
            raise ValueError(f"{cls.__name__}(fused=True) has no kernels for {device_type} (only {', '.join(devices)})")
        for g in groups:
            if g.get("differentiable"):
                raise ValueError(f"{cls.__name__}(fused=True) does not support differentiable=True")
            for p in g["params"]:
                if not torch.is_floating_point(p) or p.device.type not in devices:
                    raise ValueError(
                        f"{cls.__name__}(fused=True) needs floating-point parameters on {', '.join(devices)}; "
                        f"found {p.dtype} on {p.device.type}"
                    )
                if p.is_sparse:
                    raise ValueError(f"{cls.__name__}(fused=True) does not support sparse parameters")

    def flags(d: dict) -> dict:
        d = dict(d)
        d[impl] = True
        if other in sig:
            d[other] = False
        return d

    ctor = flags({k: v for k, v in optimizer.defaults.items() if k in sig and k != "params"})
    new_groups = [flags(g) for g in groups]
    try:
        new = cls(new_groups, **ctor)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{cls.__name__}({impl}=True) cannot be built: {exc}") from exc
    if optimizer.state:
        state = optimizer.state_dict()
        state["param_groups"] = [flags(g) for g in state["param_groups"]]
        new.load_state_dict(state)
    return new


def _optimizer_info(workload: Workload, caps: Capabilities):
    facts = inspect_workload(workload)
    cls = facts.get("_optimizer_class")
    name = facts.get("workload.optimizer") or ""
    if cls is None and name:
        cls = getattr(torch.optim, name, None)
    return facts, cls, name


@register
class FusedOptimizer(Transform):
    name = "fused_optimizer"
    safety = "safe"
    tolerance = 1e-4
    summary = "Use the optimizer's fused (single-kernel) or foreach (multi-tensor) implementation"
    modes = ("train",)
    order = 50

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
            name = inspect_workload(workload).get("workload.optimizer") or ""
        callees = {name} if name else {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax",
                                        "NAdam", "RAdam", "ASGD", "Rprop"}
        editor.add_call_kwargs("build_optimizer", callees, {impl: "True"}, remove={other})
