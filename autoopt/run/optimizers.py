"""Optimizer implementations: which ones a torch.optim class offers on a device, and
rebuilding an optimizer as its fused (single-kernel) or foreach (multi-tensor) twin with
the same parameter groups, hyper-parameters and state."""
from __future__ import annotations

import inspect

import torch

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
