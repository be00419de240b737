"""Helpers of the script driver (autoopt.scripting.driver) on the running script's live
objects: tensors nested in a model's inputs and outputs, the user's frames and the names
bound to an object there, and what a DataLoader's settings are."""
from __future__ import annotations

import gc
import json
import os
import random
from typing import Any, Optional


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return type(exc).__name__ in ("OutOfMemoryError",) or "out of memory" in text or "can't allocate memory" in text


def map_tensors(obj, fn):
    """obj with fn applied to every tensor in it (tuples, lists, dicts and their subclasses)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except TypeError:
            for k, v in items.items():
                obj[k] = v
            return obj
    return obj


def to_float32(t):
    import torch

    return t.float() if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16) else t


def to_channels_last(t):
    import torch

    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def channels_last_inputs(module, args, kwargs):
    return map_tensors(args, to_channels_last), map_tensors(kwargs, to_channels_last)


def site(frame, script: str) -> dict[str, Any]:
    """{"line", "function"} of a frame (with "file" when it is not the script)."""
    out: dict[str, Any] = {"line": frame.f_lineno, "function": frame.f_code.co_name}
    if os.path.abspath(frame.f_code.co_filename) != script:
        out["file"] = frame.f_code.co_filename
    return out


def name_of(obj, frame) -> Optional[str]:
    """The variable bound to `obj` in the frame's locals, else its globals (None: not found)."""
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        for k, v in list(scope.items()):
            if v is obj and not k.startswith("__"):
                return k
    return None


def describe(loaders: list, bs: Optional[int]) -> Optional[dict]:
    if not loaders:
        return None
    from autoopt.workload.inspect import describe_loader

    match = [ld for ld in loaders if bs is not None and ld.batch_size == bs]
    return describe_loader((match or loaders)[0])


def jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def flat_tensors(obj, torch) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v, torch)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_tensors(v, torch)]
    return []


def seed_everything(seed: int) -> None:
    """random, numpy (when installed) and torch seeded, as before the script runs."""
    import torch

    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def wraps_optimizer(opt) -> bool:
    """A wrapper around another optimizer (accelerate's AcceleratedOptimizer, ...)."""
    import torch

    return isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer)


def find_roots(opt) -> list:
    """The outermost modules whose parameters the optimizer holds, largest first."""
    import torch

    held = {id(p) for g in opt.param_groups for p in g["params"]}
    mods = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    cands = [m for m in mods if any(id(p) in held for p in m.parameters())]
    inner = {id(s) for m in cands for s in m.modules() if s is not m}
    roots = [m for m in cands if id(m) not in inner]
    roots.sort(key=lambda m: -sum(p.numel() for p in m.parameters()))
    return roots
