"""`plan.json`: the transforms autoopt kept, with their parameters — and a small API
that applies them in your own training script.

plan.json:

    {"plan_version": 1, "autoopt_version": "0.1.0", "model": "simplenet", "device": "cuda",
     "mode": "train", "baseline_batch_size": 64, "batch_size": 64, "grad_accum_steps": 1,
     "model_path": "/abs/path/simplenet.py",
     "transforms": [{"name": "amp", "params": {"dtype": "bfloat16", "grad_scaler": false}, "code": "AO101"},
                    {"name": "channels_last", "params": {}, "code": "AO201"}],
     "codes": ["AO101", "AO201"], "speedup": 2.4, "config": {...ExecConfig...}}

Usage in a training script (every call is a no-op for what the plan does not contain):

    from autoopt.plan import Plan

    plan = Plan.load("reports/simplenet-20250101-120000/plan.json")
    model = plan.prepare_model(build_model())          # .to(device), weights dtype, channels_last,
                                                        # checkpointing, torch.compile; TF32 /
                                                        # cudnn.benchmark / thread flags
    optimizer = plan.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
    loader = plan.prepare_dataloader(DataLoader(ds, batch_size=plan.batch_size, shuffle=True))
    for batch in loader:
        inputs, target = plan.prepare_batch(batch)      # to the device (non-blocking when
                                                        # pinned), channels_last 4-D inputs
        with plan.autocast():                           # forward and loss only
            loss = loss_fn(model(inputs), target)
        plan.backward(loss)                             # GradScaler for fp16; / k when accumulating
        plan.step(optimizer)                            # steps (and zero_grads) every k micro-batches

For inference, `with plan.inference(): out = model(plan.prepare_batch(x))` adds
torch.inference_mode when the plan has it.

`plan.batch_size` is the per-step (micro-)batch; `plan.effective_batch_size` the samples per
optimizer step. A plan that changes the batch size changes training: its batch_size entry
carries the learning-rate rule (`lr_rule`, autoopt.transforms.batch_size), and
`prepare_optimizer` applies it — every group's lr scaled, with its warm-up over the first
optimizer steps; `plan.caveats()` names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from autoopt import __version__
from autoopt.errors import UserError
from autoopt.types import ExecConfig

PLAN_VERSION = 1


class PlanError(UserError):
    """plan.json cannot be read or names something autoopt does not know."""


@dataclass
class Plan:
    transforms: list[dict[str, Any]]  # [{"name": ..., "params": {...}}], resolved params
    model: str = ""
    device: str = "cpu"
    mode: str = "train"
    baseline_batch_size: int = 32
    codes: list[str] = field(default_factory=list)
    speedup: Optional[float] = None
    autoopt_version: str = __version__
    model_path: str = ""
    source: str = ""  # where it was loaded from (for messages)

    def __post_init__(self):
        self._config: Optional[ExecConfig] = None
        self._scaler = None
        self._micro_steps = 0

    # -- construction / persistence ---------------------------------------------------
    @classmethod
    def from_transforms(
        cls,
        transforms,
        *,
        model: str = "",
        device: str = "cpu",
        mode: str = "train",
        baseline_batch_size: int = 32,
        codes: Optional[list[str]] = None,
        speedup: Optional[float] = None,
    ) -> "Plan":
        """From [(Transform or name, params), ...] (params resolved)."""
        items = [
            {"name": t if isinstance(t, str) else t.name, "params": dict(p or {})} for t, p in transforms
        ]
        plan = cls(items, model=model, device=device, mode=mode, baseline_batch_size=int(baseline_batch_size),
                   codes=list(codes or []), speedup=speedup)
        plan._validate()
        return plan

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"{source} is not a plan: expected a JSON object with a 'transforms' list.")
        version = data.get("plan_version", PLAN_VERSION)
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise PlanError(
                f"{source} has plan_version {version!r}, newer than this autoopt understands "
                f"({PLAN_VERSION}); upgrade autoopt or regenerate the plan."
            )
        items = data.get("transforms")
        if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
            raise PlanError(
                f"{source} has no valid 'transforms' list; each entry needs a 'name' and 'params'. "
                "Regenerate it with autoopt optimize."
            )
        plan = cls(
            [{**i, "params": dict(i.get("params") or {})} for i in items],
            model=str(data.get("model", "")),
            device=str(data.get("device", "cpu")),
            mode=str(data.get("mode", "train")),
            baseline_batch_size=int(data.get("baseline_batch_size") or data.get("batch_size") or 32),
            codes=list(data.get("codes") or [i["code"] for i in items if i.get("code")]),
            speedup=data.get("speedup"),
            autoopt_version=str(data.get("autoopt_version", "")),
            model_path=str(data.get("model_path", "")),
            source=source,
        )
        if "baseline_batch_size" not in data and data.get("batch_size"):
            # only the final batch size is given: find the baseline that leads to it
            # (gradient accumulation without an explicit effective batch splits the baseline)
            plan._validate()
            final = int(data["batch_size"])
            if plan.config.batch_size != final:
                plan.baseline_batch_size = final * plan.config.grad_accum_steps
                plan._config = None
        plan._validate()
        return plan

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PlanError(f"{path} does not exist; pass the plan.json of an autoopt report.", cause=exc) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path} cannot be read as JSON ({exc}); pass the plan.json of an autoopt report.",
                            cause=exc) from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "plan_version": PLAN_VERSION,
            "autoopt_version": self.autoopt_version or __version__,
            "model": self.model,
            "device": self.device,
            "mode": self.mode,
            "baseline_batch_size": self.baseline_batch_size,
            "batch_size": cfg.batch_size,
            "grad_accum_steps": cfg.grad_accum_steps,
            "transforms": [dict(i) for i in self.transforms],
            "codes": self.codes,
            "model_path": self.model_path,
            "speedup": self.speedup,
            "config": cfg.to_json(),
        }

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    def _validate(self) -> None:
        from autoopt.transforms import TRANSFORMS

        for item in self.transforms:
            if item["name"] not in TRANSFORMS:
                raise PlanError(
                    f"{self.source or 'the plan'} names an unknown transform {item['name']!r}; known: "
                    f"{', '.join(sorted(TRANSFORMS))}. Regenerate the plan with this autoopt version."
                )
        try:
            self._config = None
            _ = self.config
        except ValueError as exc:
            raise PlanError(f"{self.source or 'the plan'} has invalid transform parameters: {exc}", cause=exc) from exc

    # -- what the plan does -----------------------------------------------------------
    @property
    def config(self) -> ExecConfig:
        """The run configuration the plan describes (autoopt.types.ExecConfig)."""
        if self._config is None:
            from autoopt.transforms import apply_transforms

            base = ExecConfig(device=self.device_type, batch_size=self.baseline_batch_size)
            self._config = apply_transforms(base, [(i["name"], i["params"]) for i in self.transforms])
        return self._config

    @property
    def names(self) -> list[str]:
        return [i["name"] for i in self.transforms]

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def batch_size(self) -> int:
        """Samples per forward/backward (the micro-batch when accumulating)."""
        return self.config.batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.config.grad_accum_steps

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step."""
        return self.config.batch_size * self.config.grad_accum_steps

    def caveats(self) -> list[str]:
        from autoopt.transforms.batch_size import lr_caveat

        out = []
        if self.config.batch_size * self.config.grad_accum_steps != self.baseline_batch_size:
            rule = next((i["params"].get("lr_rule") for i in self.transforms if i["name"] == "batch_size"), None)
            out.append(lr_caveat(self.baseline_batch_size, self.effective_batch_size, self.mode, rule))
        if self.config.grad_accum_steps > 1:
            out.append(
                f"gradients accumulate over {self.config.grad_accum_steps} micro-batches of {self.batch_size}; "
                "BatchNorm statistics use the micro-batch"
            )
        return out

    # -- applying it (through autoopt.run.apply, the applier autoopt measured with) -----------
    def apply_globals(self) -> None:
        """Process-wide settings: float32 matmul precision (+ cuDNN TF32 on CUDA),
        cudnn.benchmark, intra-op threads. prepare_model calls it."""
        from autoopt.run import apply

        apply.write_process_settings(apply.process_settings_for(self.config, apply.read_process_settings()))

    def prepare_model(self, model, device: Optional[str] = None):
        """The model moved to the plan's device (or `device`), with the plan's weights dtype
        (inference), channels_last, activation checkpointing and torch.compile, in that order;
        process-wide settings set. Returns the model to use (a compiled wrapper when the plan
        compiles; its parameters are the original ones, so build the optimizer before or after)."""
        from autoopt.run import apply

        self.apply_globals()
        model, _ = apply.place_model(model, self.config, train=self.mode == "train", device=device or self.device)
        model, _ = apply.compile_model(model, self.config)
        return model

    def prepare_optimizer(self, optimizer):
        """The optimizer rebuilt with the plan's fused/foreach implementation (same class,
        groups, hyper-parameters and state), or unchanged."""
        from autoopt.run import apply

        return apply.prepare_optimizer(optimizer, self.config)

    def prepare_dataloader(self, loader):
        """The DataLoader rebuilt with the plan's worker / pinning / prefetch settings
        (the same batches), or unchanged. Also sets the planned intra-op thread count."""
        from autoopt.run import apply

        if not self.config.dataloader:
            return loader
        self.apply_globals()
        return apply.prepare_loader(loader, self.config)

    def prepare_batch(self, batch, device: Optional[str] = None):
        """The batch on the device (non_blocking when the plan pins memory), 4-D float
        tensors channels_last, float tensors in the weights dtype when the plan casts weights."""
        from autoopt.run import apply

        cfg = self.config
        return apply.prepare_batch(batch, cfg, train=self.mode == "train", device=device or self.device,
                                   non_blocking=apply.copies_non_blocking(cfg))

    def autocast(self):
        """torch.autocast with the plan's dtype (for forward and loss), else a no-op."""
        from autoopt.run import apply

        return apply.autocast(self.config, self.device_type)

    def inference(self):
        """For inference: torch.inference_mode when the plan has it, and autocast."""
        from autoopt.run import apply

        return apply.inference_context(self.config, self.device_type)

    @property
    def scaler(self):
        """The GradScaler for fp16 training (None when the plan needs none)."""
        if self._scaler is None and self.config.grad_scaler:
            from autoopt.run import apply

            self._scaler = apply.make_scaler(self.config, train=True, device_type=self.device_type)
        return self._scaler

    def backward(self, loss) -> None:
        """loss.backward(), divided by the accumulation steps and scaled by the GradScaler
        when the plan has them."""
        from autoopt.run import apply

        apply.backward(loss, accum_steps=self.config.grad_accum_steps, scaler=self.scaler)

    def step(self, optimizer) -> bool:
        """Call once per micro-batch after backward(). Every grad_accum_steps calls it
        steps the optimizer (through the GradScaler when there is one) and zeroes the
        gradients; returns True when it stepped."""
        from autoopt.run import apply

        self._micro_steps += 1
        if self._micro_steps % self.config.grad_accum_steps:
            return False
        apply.optimizer_step(optimizer, self.scaler)
        return True

    def describe(self) -> str:
        from autoopt.transforms import get_transform

        parts = [get_transform(i["name"]).describe(i["params"]) for i in self.transforms]
        return ", ".join(parts) if parts else "no transforms"
