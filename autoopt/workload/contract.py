"""How autoopt calls a model file's functions: the default forward, loss extraction,
moving batches to the device, and flattening outputs for verification.

Shared by the loader (validation), the runner (timed steps) and verification, so the
three agree on what a batch, an output and a loss are.
"""
from __future__ import annotations

from typing import Iterator

import torch

from autoopt.workload.guard import UserCall


def call_forward(spec, model, batch):
    """The model file's forward(model, batch), or the default: model(**batch) for a dict,
    model(*batch) for a tuple/list, model(batch) otherwise. An exception leaving it is marked
    as the model file's (autoopt.workload.guard)."""
    if spec.forward is not None:
        with UserCall(spec.path, "forward"):
            return spec.forward(model, batch)
    if isinstance(batch, dict):
        with UserCall(spec.path, "forward (default: model(**batch))"):
            return model(**batch)
    if isinstance(batch, (tuple, list)):
        with UserCall(spec.path, "forward (default: model(*batch))"):
            return model(*batch)
    with UserCall(spec.path, "forward (default: model(batch))"):
        return model(batch)


def extract_loss(out) -> torch.Tensor | None:
    """The training loss in a forward result: a scalar tensor, `.loss` (Hugging Face
    outputs), a dict's "loss", or the first element of a tuple. None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in a nested batch or output (dicts, sequences, dataclass-like objects)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_tensors(v)
    elif hasattr(obj, "to_tuple"):  # transformers.utils.ModelOutput
        yield from iter_tensors(obj.to_tuple())
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            if isinstance(v, (torch.Tensor, dict, tuple, list)):
                yield from iter_tensors(v)


def output_tensors(out) -> list[torch.Tensor]:
    """Floating-point tensors of a forward result, detached, as fp32 on the CPU."""
    return [t.detach().float().cpu() for t in iter_tensors(out) if t.is_floating_point()]


def map_tensors(obj, fn):
    """Apply fn to every tensor in a nested batch, keeping its structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items()) if type(obj) is not dict else {
            k: map_tensors(v, fn) for k, v in obj.items()
        }
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(batch, device: str, *, non_blocking: bool = False, channels_last: bool = False):
    """Move a batch to the device; with channels_last, 4-D floating tensors change layout."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=non_blocking)
        if channels_last and t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return map_tensors(batch, move)


def batch_len(batch) -> int | None:
    """The leading dimension of the first tensor in a batch."""
    for t in iter_tensors(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def has_4d_float_input(batch) -> bool:
    return any(t.dim() == 4 and t.is_floating_point() for t in iter_tensors(batch))


def shapes_of(batch) -> list[tuple[str, tuple[int, ...]]]:
    return [(str(t.dtype).replace("torch.", ""), tuple(t.shape)) for t in iter_tensors(batch)]

