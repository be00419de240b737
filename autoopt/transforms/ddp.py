"""Distributed transforms: how DistributedDataParallel (DDP) synchronises gradients.

These settings belong to the DDP wrapper that the applier (autoopt.run.apply.wrap_ddp)
builds around the model in a --nproc job; they live in the configuration's `ddp` dict
(ExecConfig.ddp):

    {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": False, "static_graph": False,
     "no_sync": False}

`default_settings(module)` reads a model file's own choices (module-level constants
`DDP_BUCKET_CAP_MB`, `DDP_GRADIENT_AS_BUCKET_VIEW`, `DDP_STATIC_GRAPH`, `DDP_NO_SYNC`,
a contract extension the worker honours, like GRAD_ACCUM_STEPS for accumulation), and
`ddp_kwargs(settings)` (autoopt.run.apply) turns the dict into DistributedDataParallel's
keyword arguments.

Four transforms, each with the faces of autoopt.transforms.Transform:

- `ddp_bucket_size` (params `bucket_cap_mb`): gradients are all-reduced in buckets of
  this many MiB as backward produces them. Smaller buckets start communicating earlier
  (more overlap, more collectives); larger ones use the link better. Safe: the same
  averaged gradients. Tolerance 1e-4 relative (the reduction may sum in another order).
- `ddp_gradient_as_bucket_view` (no params): `.grad` tensors become views into the
  communication buckets, saving one gradient-sized copy per step and that much memory.
  Safe; tolerance 1e-5 (the same arithmetic). Code that calls `.grad.detach_()` or
  replaces `.grad` by hand breaks; verification would catch a difference.
- `ddp_static_graph` (no params): tells DDP the set of used parameters and the graph do
  not change between iterations, so it can skip the per-iteration unused-parameter
  search and reorder buckets after the first iteration. Safe for a static graph;
  tolerance 1e-4. A model whose used parameters change between steps must not use it
  (DDP raises, or the verification run diverges: the variant is then rejected).
- `ddp_no_sync` (params `steps` k): gradient accumulation over k micro-batches with
  `model.no_sync()` around the first k-1 backward passes, so gradients are all-reduced
  once per optimizer step instead of once per micro-batch. When the model file already
  accumulates (GRAD_ACCUM_STEPS = k) it is safe (same averaged gradients, fewer
  all-reduces; tolerance 1e-4). Otherwise it introduces accumulation: the per-rank batch
  is split into k micro-batches, which changes BatchNorm statistics and the memory
  profile — `manual`, like grad_accumulation.

Patches: the model file gets the DDP_* constants (autoopt's `--nproc` worker reads them),
and `snippet(params)` gives the plain-PyTorch lines for the user's own torchrun script.
"""
from __future__ import annotations

from typing import Any, Optional

from autoopt.run.apply import DEFAULT_BUCKET_CAP_MB, ddp_kwargs, ddp_settings
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload

SETTINGS_KEYS = ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph", "no_sync")

# model-file constant -> settings key
MODULE_CONSTANTS = {
    "DDP_BUCKET_CAP_MB": "bucket_cap_mb",
    "DDP_GRADIENT_AS_BUCKET_VIEW": "gradient_as_bucket_view",
    "DDP_STATIC_GRAPH": "static_graph",
    "DDP_NO_SYNC": "no_sync",
}


def default_settings(module: Any = None) -> dict[str, Any]:
    """DDP's defaults, overridden by the model file's DDP_* constants where it sets them."""
    s: dict[str, Any] = ddp_settings()
    if module is not None:
        for const, key in MODULE_CONSTANTS.items():
            v = getattr(module, const, None)
            if v is None:
                continue
            if key == "bucket_cap_mb":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise ValueError(f"{const} = {v!r} is not a positive number of MiB")
                s[key] = float(v)
            else:
                if not isinstance(v, bool):
                    raise ValueError(f"{const} = {v!r} is not True or False")
                s[key] = v
    return s


def describe_settings(settings: dict[str, Any]) -> str:
    parts = [f"bucket_cap_mb={settings.get('bucket_cap_mb', DEFAULT_BUCKET_CAP_MB):g}"]
    for k in ("gradient_as_bucket_view", "static_graph", "no_sync"):
        if settings.get(k):
            parts.append(f"{k}=True")
    return ", ".join(parts)


class DDPTransform(Transform):
    """A transform of the DDP wrapper. `apply_ddp(settings, params)` returns a modified
    copy of a settings dict; `apply(cfg, ...)` puts it into the configuration's `ddp` (and
    changes the per-process step where the transform does: no_sync's micro-batches)."""

    setting: str = ""

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        return cfg.with_(ddp=self.apply_ddp(ddp_settings(cfg.ddp), params))

    def apply_ddp(self, settings: dict[str, Any], params: dict) -> dict[str, Any]:
        raise NotImplementedError

    def snippet(self, params: dict) -> str:
        """Plain-PyTorch lines for a user's own DDP set-up (torchrun script)."""
        raise NotImplementedError

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        for const, value, comment in self._constants(params, workload):
            editor.set_constant(const, value, comment=comment)

    def _constants(self, params: dict, workload: Optional[Workload]) -> list[tuple[str, str, str]]:
        raise NotImplementedError


class BucketSize(DDPTransform):
    name = "ddp_bucket_size"
    setting = "bucket_cap_mb"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        mb = params.get("bucket_cap_mb")
        if mb is None or isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb <= 0:
            return f"bucket_cap_mb must be a positive number of MiB, not {mb!r}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return {"bucket_cap_mb": float(params.get("bucket_cap_mb", DEFAULT_BUCKET_CAP_MB))}

    def apply_ddp(self, settings: dict[str, Any], params: dict) -> dict[str, Any]:
        return dict(settings, bucket_cap_mb=float(params["bucket_cap_mb"]))

    def snippet(self, params: dict) -> str:
        return (f"model = DistributedDataParallel(model, device_ids=[local_rank], "
                f"bucket_cap_mb={float(params['bucket_cap_mb']):g})")

    def _constants(self, params, workload):
        mb = float(params["bucket_cap_mb"])
        return [("DDP_BUCKET_CAP_MB", repr(mb),
                 f"autoopt (ddp_bucket_size): DistributedDataParallel(..., bucket_cap_mb={mb:g})")]


class GradientAsBucketView(DDPTransform):
    name = "ddp_gradient_as_bucket_view"
    setting = "gradient_as_bucket_view"

    def apply_ddp(self, settings: dict[str, Any], params: dict) -> dict[str, Any]:
        return dict(settings, gradient_as_bucket_view=True)

    def snippet(self, params: dict) -> str:
        return "model = DistributedDataParallel(model, device_ids=[local_rank], gradient_as_bucket_view=True)"

    def _constants(self, params, workload):
        return [("DDP_GRADIENT_AS_BUCKET_VIEW", "True",
                 "autoopt (ddp_gradient_as_bucket_view): DistributedDataParallel(..., gradient_as_bucket_view=True)")]


class StaticGraph(DDPTransform):
    name = "ddp_static_graph"
    setting = "static_graph"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        if workload.facts.get("workload.static_shapes") is False:
            return ("the batches change shape between steps; static_graph needs the same graph and the same "
                    "used parameters every iteration")
        return None

    def apply_ddp(self, settings: dict[str, Any], params: dict) -> dict[str, Any]:
        return dict(settings, static_graph=True)

    def snippet(self, params: dict) -> str:
        return "model = DistributedDataParallel(model, device_ids=[local_rank], static_graph=True)"

    def _constants(self, params, workload):
        return [("DDP_STATIC_GRAPH", "True",
                 "autoopt (ddp_static_graph): DistributedDataParallel(..., static_graph=True)")]


class NoSync(DDPTransform):
    name = "ddp_no_sync"
    setting = "no_sync"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        k = params.get("steps", 2)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            return f"steps must be an integer >= 2, not {k!r}"
        existing = _accum_steps(workload)
        if existing >= 2 and k != existing:
            return (f"the model file already accumulates {existing} micro-batches (GRAD_ACCUM_STEPS); "
                    f"use steps={existing}")
        if existing < 2 and workload.batch_size % k:
            return f"the per-rank batch {workload.batch_size} does not split into {k} equal micro-batches"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        existing = _accum_steps(workload)
        if existing >= 2:
            return {"steps": existing, "introduces_accumulation": False}
        return {"steps": int(params.get("steps", 2)), "introduces_accumulation": True}

    def safety_for(self, params: dict) -> str:
        return "manual" if params.get("introduces_accumulation") else "safe"

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        k = int(params.get("steps", 2))
        cfg = super().apply(cfg, params, workload)
        if params.get("introduces_accumulation"):
            if k < 2 or cfg.batch_size % k:
                raise ValueError(f"cannot split a batch of {cfg.batch_size} into {k} equal micro-batches")
            return cfg.with_(batch_size=cfg.batch_size // k, grad_accum_steps=k)
        return cfg.with_(grad_accum_steps=k)

    def apply_ddp(self, settings: dict[str, Any], params: dict) -> dict[str, Any]:
        return dict(settings, no_sync=True)

    def snippet(self, params: dict) -> str:
        k = int(params.get("steps", 2))
        return (
            f"for i, micro in enumerate(micro_batches):          # {k} micro-batches per optimizer step\n"
            f"    ctx = model.no_sync() if i < {k} - 1 else contextlib.nullcontext()\n"
            f"    with ctx:                                      # no all-reduce until the last one\n"
            f"        (forward(model, micro) / {k}).backward()\n"
            f"optimizer.step(); optimizer.zero_grad()"
        )

    def _constants(self, params, workload):
        k = int(params.get("steps", 2))
        out = []
        if params.get("introduces_accumulation"):
            bs = workload.batch_size if workload is not None else None
            if bs is None or bs % k:
                from autoopt.patching.editor import PatchError

                raise PatchError(f"the per-rank batch does not split into {k} micro-batches")
            out.append(("BATCH_SIZE", str(bs // k), f"autoopt (ddp_no_sync): micro-batch of {bs}"))
            out.append(("GRAD_ACCUM_STEPS", str(k), f"autoopt (ddp_no_sync): {k} micro-batches per optimizer step"))
        out.append(("DDP_NO_SYNC", "True",
                    "autoopt (ddp_no_sync): model.no_sync() around all but the last micro-batch"))
        return out


def _accum_steps(workload: Workload) -> int:
    try:
        return int(getattr(workload.spec.module, "GRAD_ACCUM_STEPS", 1) or 1)
    except (TypeError, ValueError):
        return 1


DDP_TRANSFORMS: dict[str, DDPTransform] = {
    t.name: t for t in (BucketSize(), GradientAsBucketView(), StaticGraph(), NoSync())
}


def get_ddp_transform(name: str) -> DDPTransform:
    try:
        return DDP_TRANSFORMS[name]
    except KeyError:
        raise KeyError(f"unknown DDP transform {name!r}; known: {', '.join(sorted(DDP_TRANSFORMS))}") from None


def apply_all(settings: dict[str, Any], items: list[tuple[str, dict]]) -> dict[str, Any]:
    """Apply several DDP transforms (name, params) to a settings dict."""
    out = dict(settings)
    for name, params in items:
        out = get_ddp_transform(name).apply_ddp(out, params)
    return out


def snippet_for(items: list[tuple[str, dict]]) -> str:
    """One DDP constructor call (and the no_sync loop when present) for the kept transforms."""
    settings = apply_all({}, items)
    kw = []
    if "bucket_cap_mb" in settings:
        kw.append(f"bucket_cap_mb={float(settings['bucket_cap_mb']):g}")
    for k in ("gradient_as_bucket_view", "static_graph"):
        if settings.get(k):
            kw.append(f"{k}=True")
    lines = [
        "# in your torchrun script (one process per GPU):",
        "torch.distributed.init_process_group(\"nccl\")   # \"gloo\" on CPUs",
        "local_rank = int(os.environ[\"LOCAL_RANK\"])",
        "model = DistributedDataParallel(model, device_ids=[local_rank]"
        + (", " + ", ".join(kw) if kw else "") + ")",
    ]
    for name, params in items:
        if name == "ddp_no_sync":
            lines.append(NoSync().snippet(params))
    return "\n".join(lines) + "\n"


__all__ = [
    "DDP_TRANSFORMS", "DDPTransform", "BucketSize", "GradientAsBucketView", "StaticGraph", "NoSync",
    "default_settings", "ddp_kwargs", "describe_settings", "get_ddp_transform", "apply_all", "snippet_for",
    "DEFAULT_BUCKET_CAP_MB",
]
