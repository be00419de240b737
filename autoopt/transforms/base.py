"""The Transform base class: what one kind of change to a run looks like.

A transform never runs the model. It has four faces:

- `check(workload, caps, params) -> str | None`: None when it applies, else the reason it
  is skipped (a value, shown in the report);
- `resolve_params(workload, caps, params) -> dict`: the parameters with defaults filled
  (what plan.json stores);
- `apply(cfg, params, workload) -> ExecConfig`: a modified copy of the run configuration
  (autoopt.types.ExecConfig); autoopt.run.apply is the one place that turns a
  configuration into torch;
- `patch(editor, params, workload)`: its part of `patch.diff` (an
  autoopt.patching.editor.SourceEditor), or `PatchError(reason)` when the model file
  cannot express it.

Its name, safety, tolerance, order, modes and summary come from autoopt.catalog, the one
list of transforms; `tolerance_for` / `safety_for` refine them per parameter set,
`candidates` lists the parameter sets worth measuring, `caveat` what the user must know
about a kept one.
"""
from __future__ import annotations

from typing import Optional

from autoopt.catalog import TransformInfo, info
from autoopt.types import Capabilities, ExecConfig, Workload


class Transform:
    """Base class; one subclass per module in this package."""

    name: str = ""

    @property
    def info(self) -> TransformInfo:
        return info(self.name)

    @property
    def safety(self) -> str:
        return self.info.safety

    @property
    def tolerance(self) -> float:
        return self.info.tolerance

    @property
    def summary(self) -> str:
        return self.info.summary

    @property
    def modes(self) -> tuple[str, ...]:
        return self.info.modes

    @property
    def order(self) -> int:
        return self.info.order

    # -- the four faces ---------------------------------------------------------------
    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        """None when the transform applies to this workload on this device, else the reason."""
        if workload.mode not in self.modes:
            return f"{self.name} applies to {' and '.join(self.modes)} workloads; this one is {workload.mode}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        return dict(params or {})

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define patch()")

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

    def caveat(self, params: dict, mode: str = "train") -> str:
        """What a user must know about this transform when it is kept ("" when nothing)."""
        return ""

    def explain_failure(self, message: str) -> str:
        """What the model's code would need for this transform to apply, when `message` (a
        failed trial's error) is one this transform is known to cause ("" otherwise)."""
        return ""

    def describe(self, params: dict) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items()) if v is not None)
        return f"{self.name}({shown})" if shown else self.name

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Transform {self.name} safety={self.safety}>"


def fmt_dtype(dtype: str) -> str:
    """'bf16' / 'fp16' / 'half' -> the torch dtype name."""
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
