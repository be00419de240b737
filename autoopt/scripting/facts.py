"""What a running training script shows, as the rules' facts (autoopt.facts): its model's
structure, its batches, its optimizer, its DataLoader settings and torch's process-wide
settings; and where in the user's code the live stack is.

Used by `autoopt profile --script` (autoopt.pipelines.script, in autoopt's process) and by
the script driver (autoopt.scripting.driver, in the child that runs the script); nothing here
runs the user's code.
"""
from __future__ import annotations

import gc
import sys
import warnings
from typing import Any, Optional

from autoopt.userfiles import is_user_file


def user_frame(start_depth: int = 2):
    """The innermost frame of the user's code on the live stack (None when there is none)."""
    try:
        f = sys._getframe(start_depth)
    except ValueError:
        return None
    while f is not None:
        if is_user_file(f.f_code.co_filename):
            return f
        f = f.f_back
    return None


def user_frame_site(start_depth: int = 2) -> Optional[str]:
    """'path:line (function)' of the innermost frame of the user's code on the live stack."""
    f = user_frame(start_depth + 1)
    if f is None:
        return None
    return f"{f.f_code.co_filename.replace(chr(92), '/')}:{f.f_lineno} ({f.f_code.co_name})"


def autocast_on() -> bool:
    """Whether torch.autocast is active now (on CUDA or the CPU)."""
    import torch

    for dev in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(dev):
                return True
        except TypeError:  # older torch: no device argument
            return bool(torch.is_autocast_enabled())
    return False


def batch_facts(args) -> dict:
    """The batch a model was called with: its size (the first dimension of its first tensor),
    whether it has a 4-D float input, and whether that is channels_last already."""
    import torch

    from autoopt.workload.contract import iter_tensors

    ts = list(iter_tensors(args))
    out: dict[str, Any] = {"batch_size": None, "input_is_4d": False, "channels_last_input": False}
    for t in ts:
        if t.dim() > 0 and out["batch_size"] is None:
            out["batch_size"] = int(t.shape[0])
        if t.dim() == 4 and t.is_floating_point():
            out["input_is_4d"] = True
            if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
                out["channels_last_input"] = True
    out["device"] = ts[0].device.type if ts else None
    return out


def optimizer_impl_of(opt) -> Optional[str]:
    """The implementation an optimizer's step runs ('fused', 'foreach', 'for-loop'), None when
    autoopt cannot read it."""
    try:
        from autoopt.workload.inspect import optimizer_impl

        return optimizer_impl(opt)
    except Exception:  # noqa: BLE001 - an optimizer autoopt cannot read: the fact stays unknown
        return None


def env_facts() -> dict:
    """torch's process-wide settings as env.* facts ({} when they cannot be read)."""
    try:
        from autoopt.env import env_facts as _env_facts

        return _env_facts()
    except Exception:  # noqa: BLE001
        return {}


def live_dataloaders() -> list:
    """The DataLoaders alive in this process."""
    try:
        from torch.utils.data import DataLoader
    except ImportError:  # pragma: no cover
        return []
    with warnings.catch_warnings():  # isinstance on every live object trips deprecation shims
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, DataLoader)]


def loader_facts(batch_size: Optional[int], loaders: Optional[list] = None) -> dict:
    """Settings of the script's DataLoader (the one with the model's batch size, else the
    first), from `loaders` or the live ones."""
    loaders = live_dataloaders() if loaders is None else loaders
    if not loaders:
        return {"workload.has_dataloader": False}
    match = [ld for ld in loaders if batch_size is not None and ld.batch_size == batch_size]
    ld = (match or loaders)[0]
    return {
        "workload.has_dataloader": True,
        "workload.dataloader_workers": ld.num_workers,
        "workload.pin_memory": bool(ld.pin_memory),
        "workload.persistent_workers": bool(ld.persistent_workers),
    }


def optimizer_facts(opt_type: Optional[str], impl: Optional[str]) -> dict[str, Any]:
    """workload.mode / optimizer / optimizer_impl of the optimizer whose steps pace the script
    (none: inference)."""
    if opt_type is None:
        return {"workload.mode": "infer"}
    out: dict[str, Any] = {"workload.mode": "train", "workload.optimizer": opt_type}
    if impl:
        out["workload.optimizer_impl"] = impl
    return out


def model_facts(model, batch: Optional[dict], autocast: bool) -> dict[str, Any]:
    """model.* facts of the script's model and the workload.* facts its first batch shows."""
    import torch

    from autoopt.workload.inspect import model_facts as _model_facts

    out: dict[str, Any] = {}
    try:
        out.update(_model_facts(model))
    except Exception:  # noqa: BLE001 - a model autoopt cannot inspect still gets its trace's findings
        pass
    b = batch or {}
    if b.get("batch_size") is not None:
        out["workload.batch_size"] = b["batch_size"]
    out["workload.input_is_4d"] = bool(b.get("input_is_4d"))
    out["workload.autocast"] = bool(autocast)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    out["workload.channels_last"] = bool(b.get("channels_last_input")) or any(
        m.weight.dim() == 4 and m.weight.is_contiguous(memory_format=torch.channels_last)
        and not m.weight.is_contiguous() for m in convs)
    out["workload.compiled"] = type(model).__name__ == "OptimizedModule" or getattr(
        model, "_compiled_call_impl", None) is not None
    return out
