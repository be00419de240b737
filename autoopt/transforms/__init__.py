"""Transforms: what autoopt can change about how a model runs, one module per transform
(the Transform base class and its four faces: autoopt.transforms.base). The list of
transforms and their metadata is autoopt.catalog; this package holds the implementations.

    from autoopt.transforms import TRANSFORMS, get_transform, apply_transforms
    t = get_transform("amp")
    reason = t.check(workload, caps, {})
    if reason is None:
        params = t.resolve_params(workload, caps, {})
        cfg = t.apply(workload.base_config(), params, workload)

`apply_transforms(cfg, [(t, params), ...])` applies several in the canonical order
(catalog `order`: batch size before accumulation, layout before compile, compile last),
which is also the order of the edits in a patch (autoopt.transforms.patch). The
distributed transforms (autoopt.transforms.ddp) change the DistributedDataParallel wrapper
and exist only in a --nproc job.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from autoopt.catalog import single_process_names
from autoopt.transforms import (
    activation_checkpointing,
    amp,
    batch_size,
    channels_last,
    compile,
    cuda_graphs,
    cudnn_benchmark,
    dataloader,
    fused_optimizer,
    grad_accumulation,
    inference_mode,
    tf32,
    threads,
)
from autoopt.transforms.base import Transform
from autoopt.types import ExecConfig, Workload

TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    batch_size.BatchSize(),
    grad_accumulation.GradAccumulation(),
    inference_mode.InferenceMode(),
    amp.Amp(),
    channels_last.ChannelsLast(),
    activation_checkpointing.ActivationCheckpointing(),
    fused_optimizer.FusedOptimizer(),
    tf32.TF32(),
    cudnn_benchmark.CudnnBenchmark(),
    dataloader.Dataloader(),
    threads.Threads(),
    compile.Compile(),
    cuda_graphs.CudaGraphs(),
)}

if set(TRANSFORMS) != set(single_process_names()):  # pragma: no cover - a packaging mistake
    raise ImportError(f"autoopt.catalog and autoopt.transforms disagree: {sorted(TRANSFORMS)} vs "
                      f"{sorted(single_process_names())}")


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise KeyError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}") from None


TransformRef = Union[str, Transform]


def _as_transform(t: TransformRef) -> Transform:
    return get_transform(t) if isinstance(t, str) else t


def ordered(items: Iterable[tuple[TransformRef, dict]]) -> list[tuple[Transform, dict]]:
    """(transform, params) pairs in the canonical order (stable for equal orders)."""
    pairs = [(_as_transform(t), p) for t, p in items]
    return sorted(pairs, key=lambda tp: tp[0].order)


def apply_transforms(
    cfg: ExecConfig, items: Sequence[tuple[TransformRef, dict]], workload: Optional[Workload] = None
) -> ExecConfig:
    """Apply several transforms (resolved params) in the canonical order."""
    for t, params in ordered(items):
        cfg = t.apply(cfg, params, workload)
    return cfg


__all__ = ["Transform", "TRANSFORMS", "get_transform", "ordered", "apply_transforms"]
