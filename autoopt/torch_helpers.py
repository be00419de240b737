"""Plain-PyTorch helpers shared by the in-process transforms and by `patch.diff`.

Each function here depends on `torch` only (no autoopt import, no other global), because
`autoopt.patching.editor` copies its source verbatim (via `inspect.getsource`) into a patched model
file: the file then runs the optimized configuration with nothing but PyTorch installed,
and the in-process runner and the patched file share one implementation.
"""
from __future__ import annotations

import torch


def _autoopt_repeated_blocks(model, min_run=2):
    """The longest run of consecutive identical children (the same type and parameter shapes)
    inside any nn.ModuleList / nn.Sequential of `model`: the model's repeated blocks
    (transformer layers, a ResNet stage's residual blocks). Only children with parameters
    count. Returns the run as a list of modules, or [] when it is shorter than `min_run`.
    Ties keep the first container found (outermost first)."""
    best = []
    for module in model.modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        run, prev = [], None
        for child in module.children():
            shapes = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in child.named_parameters())
            if not shapes:
                run, prev = [], None  # activations, dropout, pooling: nothing worth recomputing
                continue
            sig = (type(child).__qualname__, shapes)
            run = run + [child] if sig == prev else [child]
            prev = sig
            if len(run) > len(best):
                best = list(run)
    return best if len(best) >= min_run else []


def _autoopt_checkpoint_blocks(model):
    """Activation checkpointing on the model's repeated blocks: each block's forward runs
    under torch.utils.checkpoint (use_reentrant=False), so its activations are recomputed in
    backward instead of kept. The module tree and state_dict keys are unchanged (only the
    instances' forward is replaced). Outside autograd (eval, no_grad, inference_mode) the
    block runs directly. Returns the model."""
    import functools

    import torch.utils.checkpoint

    def checkpointed(inner, *args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    for block in _autoopt_repeated_blocks(model):
        if getattr(block, "_autoopt_checkpointed", False):
            continue
        block.forward = functools.partial(checkpointed, block.forward)
        block._autoopt_checkpointed = True
    return model


def _autoopt_channels_last(batch):
    """The batch with every 4-D floating-point tensor in channels_last memory format
    (dicts, lists, tuples and namedtuples keep their structure)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: _autoopt_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_autoopt_channels_last(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_autoopt_channels_last(v) for v in batch)
    return batch


def _autoopt_cast_floats(batch, dtype):
    """The batch with every floating-point tensor cast to `dtype` (for reduced-precision
    weights: the inputs must match the weights' dtype)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _autoopt_cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_autoopt_cast_floats(v, dtype) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_autoopt_cast_floats(v, dtype) for v in batch)
    return batch


def _autoopt_is_channels_last(model):
    """True when the model has 4-D parameters and all of them are in channels_last
    memory format."""
    weights = [
        p for p in model.parameters()
        if not torch.nn.parameter.is_lazy(p) and p.dim() == 4
    ]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
