"""The model.* and workload.* facts a built model, batch or optimizer shows by inspection.

`model_facts` reads the module's structure (layer counts, parameter dtype, repeated blocks);
the workload.* helpers read the optimizer (`optimizer_impl`), the source of forward
functions (`source_uses_autocast`), compilation, memory layout and the CPUs available.
`autoopt.workload.build` calls them while it builds a workload; nothing here runs the
user's code.

`workload_facts(workload)` is what transforms decide on: the workload's facts, with whatever
autoopt.workload.build did not record computed by building (never running) the model, its
optimizer or its loader on the CPU. Private keys (`_optimizer_class`, `_dataloader`) carry
what no registered fact does.
"""
from __future__ import annotations

import inspect
import re
import sys
import weakref
from typing import Any, Optional

from autoopt.env import available_cpus
from autoopt.types import ModelSpec, Workload


def _repeated_block_count(model) -> int:
    """Length of the longest run of identical children (same type and parameter shapes) in any
    ModuleList / Sequential: the blocks activation checkpointing wraps (the same function)."""
    from autoopt.torch_helpers import _autoopt_repeated_blocks

    return len(_autoopt_repeated_blocks(model, min_run=1))


def _param_dtype(model) -> Optional[str]:
    counts: dict[str, int] = {}
    for p in model.parameters():
        k = str(p.dtype).replace("torch.", "")
        counts[k] = counts.get(k, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def optimizer_impl(opt) -> str:
    """What optimizer.step() runs: 'fused', 'foreach' or 'for-loop' (torch's own defaults
    for the device the parameters are on when the optimizer leaves it open)."""
    import torch

    groups = opt.param_groups
    if any(g.get("fused") for g in groups):
        return "fused"
    if any(g.get("foreach") is True for g in groups):
        return "foreach"
    if "foreach" not in opt.defaults or all(g.get("foreach") is False for g in groups):
        return "for-loop"
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # pragma: no cover - very old torch
        return "for-loop"
    params = [p for g in groups for p in g["params"]]
    differentiable = any(g.get("differentiable", False) for g in groups)
    _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    # Adam-family: torch does not flip on foreach for a tensor lr without capturable
    if foreach and any(isinstance(g.get("lr"), torch.Tensor) and not g.get("capturable", False) for g in groups):
        if type(opt).__name__ in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam"):
            foreach = False
    return "foreach" if foreach else "for-loop"


_AUTOCAST_RE = re.compile(r"autocast\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def source_uses_autocast(fn) -> bool:
    """The function's source enters torch.autocast (not `enabled=False`)."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    src = "\n".join(line.split("#", 1)[0] for line in src.splitlines())
    for m in _AUTOCAST_RE.finditer(src):
        if re.search(r"enabled\s*=\s*False", m.group(1)):
            continue
        return True
    return False


def _is_compiled(model, spec: ModelSpec) -> bool:
    import torch

    # only a process that imported torch._dynamo can hold a compiled module; importing it
    # here would cost seconds
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    OptimizedModule = getattr(dynamo, "OptimizedModule", None)
    if OptimizedModule is not None and any(isinstance(m, OptimizedModule) for m in model.modules()):
        return True
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return True
    if spec.forward is not None and hasattr(spec.forward, "_torchdynamo_orig_callable"):
        return True
    return isinstance(model, torch.jit.ScriptModule)


def _strict_channels_last(t) -> bool:
    import torch

    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def model_facts(model) -> dict[str, Any]:
    """model.* facts of a built module (attention_count without SDPA users; see build_workload)."""
    import torch.nn as nn

    conv = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return {
        "model.param_count": sum(p.numel() for p in model.parameters()),
        "model.conv_count": len(conv),
        "model.conv2d_count": sum(1 for m in conv if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))),
        "model.linear_count": sum(1 for m in model.modules() if isinstance(m, nn.Linear)),
        "model.rnn_count": sum(1 for m in model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))),
        "model.attention_count": sum(1 for m in model.modules() if isinstance(m, nn.MultiheadAttention)),
        "model.param_dtype": _param_dtype(model),
        "model.repeated_block_count": _repeated_block_count(model),
        "model.is_data_parallel": isinstance(model, nn.DataParallel),
    }



def channels_last_used(model, batch) -> bool:
    """A Conv2d weight or a batch tensor is strictly channels_last (workload.channels_last)."""
    import torch.nn as nn

    return any(
        _strict_channels_last(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)
    ) or any(_strict_channels_last(t) for t in _tensors(batch))


def sdpa_attention_count(model, sdpa_callers: set[int]) -> int:
    """Modules other than nn.MultiheadAttention seen calling scaled_dot_product_attention
    (added to model.attention_count)."""
    import torch.nn as nn

    sdpa_modules = {
        id(m) for m in model.modules() if id(m) in sdpa_callers and not isinstance(m, nn.MultiheadAttention)
    }
    return len(sdpa_modules)


def uses_autocast(spec: ModelSpec, model, autocast_seen: bool) -> bool:
    """workload.autocast: autocast was active during the first forward, or the file's forward
    or the model's forward enters it in its source."""
    autocast = autocast_seen
    if spec.forward is not None:
        autocast = autocast or source_uses_autocast(spec.forward)
    autocast = autocast or source_uses_autocast(type(model).forward)
    return autocast


def _tensors(batch):
    from autoopt.workload.contract import iter_tensors

    return list(iter_tensors(batch))


# ---------------------------------------------------------------------------- a workload's facts, complete
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


def note_cpu_load(workload: Workload, busy_other: Optional[float]) -> None:
    """Record the other work measured on the machine before the run (env.cpus_busy_other,
    autoopt.env.cpu_busy_other) and the free cores it leaves (env.cpus_free) in the
    workload's facts, cached ones included. None (unknown) records nothing."""
    if busy_other is None:
        return
    from autoopt.diagnosis.facts_builder import cpu_share_facts

    add = {"env.cpus_busy_other": round(float(busy_other), 3)}
    facts = workload_facts(workload)
    add.update({k: v for k, v in cpu_share_facts({**facts, **add}).items() if k == "env.cpus_free"})
    workload.facts = {**(workload.facts or {}), **add}
    facts.update(add)


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
    from autoopt.workload.guard import UserCall

    spec = workload.spec
    torch.manual_seed(workload.seed)
    with UserCall(spec.path, "build_model"):
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
        with UserCall(spec.path, "build_optimizer"):
            opt = spec.build_optimizer(model)
        out["workload.optimizer"] = type(opt).__name__
        out["workload.optimizer_impl"] = _impl_on_device(opt, optimizer_impl(opt), workload.caps.device_type)
        out["_optimizer_class"] = type(opt)
        lr = opt.param_groups[0].get("lr") if opt.param_groups else None
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            out["_optimizer_lr"] = float(lr)  # the batch-size transform's learning-rate rule reads it
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


__all__ = [
    "describe_loader",
    "workload_facts",
    "channels_last_used",
    "model_facts",
    "optimizer_impl",
    "sdpa_attention_count",
    "source_uses_autocast",
    "uses_autocast",
]
