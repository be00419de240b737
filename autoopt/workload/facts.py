"""The model.* and workload.* facts of a workload, complete: what autoopt.workload.load
measured when it built the workload, and whatever is missing computed by building (never
running) the model, its optimizer or its loader on the CPU.

Transforms decide on these (`workload_facts`), and so do the rules (through
autoopt.diagnosis.facts_builder). Private keys (`_optimizer_class`, `_dataloader`) carry what
no registered fact does.
"""
from __future__ import annotations

import weakref
from typing import Any

from autoopt.env import available_cpus
from autoopt.types import Workload

_CACHE: dict[int, tuple[Any, dict]] = {}

_MODEL_KEYS = ("model.conv2d_count", "model.conv_count", "model.repeated_block_count",
               "workload.channels_last", "workload.compiled")


def workload_facts(workload: Workload) -> dict[str, Any]:
    """Facts already in `workload.facts` win; missing ones are computed as needed. Cached per
    workload object."""
    key = id(workload)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is workload:
        return hit[1]
    facts = dict(workload.facts or {})
    need_optimizer = workload.spec.build_optimizer is not None and not _optimizer_from_facts(facts)
    if need_optimizer or any(k not in facts for k in _MODEL_KEYS):
        facts.update({k: v for k, v in _built_facts(workload).items() if k not in facts})
    if workload.spec.build_dataloader is not None and "_dataloader" not in facts:
        import torch

        torch.manual_seed(workload.seed)
        facts["_dataloader"] = describe_loader(workload.spec.build_dataloader(workload.batch_size))
    facts.setdefault("workload.cpu_count", available_cpus())
    _CACHE[key] = (weakref.ref(workload), facts)
    return facts


def _optimizer_from_facts(facts: dict) -> bool:
    """Fill _optimizer_class from the facts (a torch.optim class name and the implementation
    it runs); False when the optimizer has to be built to know."""
    import torch

    name = facts.get("workload.optimizer")
    impl = facts.get("workload.optimizer_impl")
    cls = getattr(torch.optim, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or impl is None:
        return False
    facts.setdefault("_optimizer_class", cls)
    return True


def _built_facts(workload: Workload) -> dict[str, Any]:
    """Facts of the model (and optimizer) built from the model file on the CPU, seeded."""
    import torch

    from autoopt.torch_helpers import _autoopt_is_channels_last
    from autoopt.workload.inspect import _repeated_block_count, optimizer_impl

    spec = workload.spec
    torch.manual_seed(workload.seed)
    model = spec.build_model()
    inner = getattr(model, "_orig_mod", model)
    out: dict[str, Any] = {
        "workload.compiled": type(model).__name__ == "OptimizedModule",
        "model.conv2d_count": sum(isinstance(m, torch.nn.Conv2d) for m in inner.modules()),
        "model.conv_count": sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
                                for m in inner.modules()),
        "model.repeated_block_count": _repeated_block_count(inner),
        "workload.channels_last": _autoopt_is_channels_last(inner),
        "workload.optimizer": "",
    }
    if spec.build_optimizer is not None:
        opt = spec.build_optimizer(model)
        out["workload.optimizer"] = type(opt).__name__
        out["workload.optimizer_impl"] = _impl_on_device(opt, optimizer_impl(opt), workload.caps.device_type)
        out["_optimizer_class"] = type(opt)
    return out


def _impl_on_device(opt, impl: str, device_type: str) -> str:
    """What an optimizer built here on the CPU will run on `device_type`: torch picks foreach
    by itself for CUDA parameters when the optimizer leaves the choice open."""
    groups = opt.param_groups
    left_open = "foreach" in opt.defaults and all(g.get("foreach") is None and not g.get("fused") for g in groups)
    if impl == "for-loop" and device_type == "cuda" and left_open:
        return "foreach"
    return impl


def describe_loader(loader) -> dict[str, Any]:
    """The settings of a DataLoader (or {"type": name} for another iterable)."""
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader):
        return {"type": type(loader).__name__, "is_dataloader": False}
    return {
        "type": "DataLoader",
        "is_dataloader": True,
        "iterable_dataset": isinstance(loader.dataset, IterableDataset),
        "num_workers": loader.num_workers,
        "pin_memory": bool(loader.pin_memory),
        "persistent_workers": bool(loader.persistent_workers),
        "prefetch_factor": loader.prefetch_factor,
    }
