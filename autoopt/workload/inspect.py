"""The model.* and workload.* facts a built model, batch or optimizer shows by inspection.

`model_facts` reads the module's structure (layer counts, parameter dtype, repeated blocks);
the workload.* helpers read the optimizer (`optimizer_impl`), the source of forward
functions (`source_uses_autocast`), compilation, memory layout and the CPUs available.
`autoopt.workload.build` calls them while it builds a workload; nothing here runs the
user's code.
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Any, Optional

from autoopt.types import ModelSpec


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


__all__ = [
    "channels_last_used",
    "model_facts",
    "optimizer_impl",
    "sdpa_attention_count",
    "source_uses_autocast",
    "uses_autocast",
]
