"""Transforms: what autoopt can change about how a model runs.

A transform never runs the model. It has four faces:

- `check(workload, caps, params) -> str | None`: None when it applies, else the reason it
  is skipped (a value, shown in the report);
- `resolve_params(workload, caps, params) -> dict`: the parameters with defaults filled
  (what plan.json stores);
- `apply(cfg, params, workload) -> ExecConfig`: a modified copy of the run configuration
  (autoopt.types.ExecConfig); autoopt.run.session is the single place that turns a config
  into a step, calling the functions the transform modules export for real code
  (apply_checkpointing, rebuild_optimizer, rebuild_dataloader);
- `patch(editor, params, workload)`: its part of `patch.diff` (autoopt.patching.editor), or
  `autoopt.patching.editor.PatchError(reason)` when the model file cannot express it.

Plus `safety` ("safe": same results to fp32 tolerance; "unsafe": changes numerics;
"manual": changes training semantics), `tolerance` (the relative error allowed on
outputs and loss when the variant is verified; `tolerance_for(params)` refines it per
parameter, e.g. fp16 vs bf16), and `summary`.

    from autoopt.transforms import TRANSFORMS, get_transform, apply_transforms
    t = get_transform("amp")
    reason = t.check(workload, caps, {})
    if reason is None:
        params = t.resolve_params(workload, caps, {})
        cfg = t.apply(workload.base_config(), params, workload)

`apply_transforms(cfg, [(t, params), ...])` applies several in the canonical order
(`Transform.order`: batch size before accumulation, layout before compile, compile last),
which is also the order of the edits in a patch.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Iterable, Optional, Sequence, Union

from autoopt.types import Capabilities, ExecConfig, Workload


class Transform:
    """Base class; one subclass per module in this package."""

    name: str = ""
    safety: str = "safe"
    tolerance: float = 1e-3
    summary: str = ""
    modes: tuple[str, ...] = ("train", "infer")
    order: int = 50

    # -- the four faces ---------------------------------------------------------------
    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        """None when the transform applies to this workload on this device, else the reason."""
        if workload.mode not in self.modes:
            return f"{self.name} applies to {' and '.join(self.modes)} workloads; this one is {workload.mode}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return dict(params or {})

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        raise NotImplementedError

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        raise NotImplementedError

    # -- refinements --------------------------------------------------------------------
    def tolerance_for(self, params: dict) -> float:
        """The verification tolerance for these parameters (default: `tolerance`)."""
        return self.tolerance

    def safety_for(self, params: dict) -> str:
        """The safety level for these parameters (default: `safety`)."""
        return self.safety

    def candidates(self, workload: Workload, caps: Capabilities, params: dict) -> list[dict]:
        """Parameter sets worth measuring (e.g. compile modes); the first is the default."""
        return [self.resolve_params(workload, caps, params)]

    def describe(self, params: dict) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items()) if v is not None)
        return f"{self.name}({shown})" if shown else self.name

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Transform {self.name} safety={self.safety}>"


TRANSFORMS: dict[str, Transform] = {}


def register(cls):
    inst = cls()
    if not inst.name or inst.safety not in ("safe", "unsafe", "manual"):
        raise ValueError(f"bad transform definition {cls.__name__}")
    TRANSFORMS[inst.name] = inst
    return cls


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


# -- inspecting a workload (building, never running, the model) ---------------------------
_INSPECTED: dict[int, tuple[Any, dict]] = {}


def inspect_workload(workload: Workload) -> dict[str, Any]:
    """model.* / workload.* facts the transforms decide on. Facts already in
    `workload.facts` (from autoopt.workload.load) win; missing ones are computed by building the
    model (seeded, on the CPU) and its optimizer, or only the loader, as needed. Private
    keys (`_optimizer_class`, `_dataloader`) describe what no registered fact does.
    Cached per workload object."""
    key = id(workload)
    hit = _INSPECTED.get(key)
    if hit is not None and hit[0]() is workload:
        return hit[1]
    facts = dict(workload.facts or {})
    model_keys = ("model.conv2d_count", "model.conv_count", "model.repeated_block_count",
                  "workload.channels_last", "workload.compiled")
    need_optimizer = workload.spec.build_optimizer is not None and not _optimizer_from_facts(facts)
    if need_optimizer or any(k not in facts for k in model_keys):
        facts.update({k: v for k, v in _build_facts(workload).items() if k not in facts})
    if workload.spec.build_dataloader is not None and "_dataloader" not in facts:
        import torch

        torch.manual_seed(workload.seed)
        facts["_dataloader"] = describe_loader(workload.spec.build_dataloader(workload.batch_size))
    facts.setdefault("workload.cpu_count", available_cpus())
    _INSPECTED[key] = (weakref.ref(workload), facts)
    return facts


def _optimizer_from_facts(facts: dict) -> bool:
    """Fill _optimizer_class from autoopt.workload.load's facts (a torch.optim class name and the
    implementation it runs); False when the optimizer has to be built to know."""
    import torch

    name = facts.get("workload.optimizer")
    impl = facts.get("workload.optimizer_impl")
    cls = getattr(torch.optim, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or impl is None:
        return False
    facts.setdefault("_optimizer_class", cls)
    return True


def _build_facts(workload: Workload) -> dict[str, Any]:
    import torch

    from autoopt.run.torch_helpers import _autoopt_is_channels_last, _autoopt_repeated_blocks

    spec = workload.spec
    out: dict[str, Any] = {}
    torch.manual_seed(workload.seed)
    model = spec.build_model()
    compiled = type(model).__name__ == "OptimizedModule"
    inner = getattr(model, "_orig_mod", model)
    out["workload.compiled"] = compiled
    out["model.conv2d_count"] = sum(isinstance(m, torch.nn.Conv2d) for m in inner.modules())
    out["model.conv_count"] = sum(
        isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in inner.modules()
    )
    out["model.repeated_block_count"] = len(_autoopt_repeated_blocks(inner))
    out["workload.channels_last"] = _autoopt_is_channels_last(inner)
    out["workload.optimizer"] = ""
    if spec.build_optimizer is not None:
        from autoopt.transforms.fused_optimizer import current_impl

        opt = spec.build_optimizer(model)
        out["workload.optimizer"] = type(opt).__name__
        out["workload.optimizer_impl"] = current_impl(
            opt.defaults.get("foreach"), opt.defaults.get("fused"), workload.caps.device_type
        )
        out["_optimizer_class"] = type(opt)
    return out


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


def available_cpus() -> int:
    """CPU cores this process may run on (affinity / cgroup aware where the OS says)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n)


def _fmt_dtype(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)


# Register the transforms (each module defines one subclass and decorates it).
from autoopt.transforms import (  # noqa: E402,F401  (registration side effect)
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
)

__all__ = [
    "Transform",
    "TRANSFORMS",
    "get_transform",
    "ordered",
    "apply_transforms",
    "inspect_workload",
    "available_cpus",
]
