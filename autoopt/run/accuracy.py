"""Accuracy, when the model file can say what it is: its optional evaluate(model) -> {name: float}.

The baseline and a variant are trained alike before they are evaluated: verification
(autoopt.run.verify.record_run) runs the same optimizer steps on the same seeded batches from
the same initial weights for both, so their evaluate() metrics differ only by what the
variant's transforms change. evaluate(model) then gets the session's model as the
configuration placed it (device, dtype, memory format; torch.compile's wrapper aside), in eval
mode, without gradients and under the configuration's autocast, with torch seeded alike; the
model's train/eval mode is put back after.

A metric is better higher unless its name says `loss`. A variant is outside tolerance when a
metric gets worse than the baseline's by more than tolerance x max(|baseline|, 1) (1 % of it
by default, and at least 0.01 for a metric within [-1, 1], such as an accuracy in 0..1), or
is missing or not finite.
"""
from __future__ import annotations

import math

import torch

from autoopt.run import apply
from autoopt.run.session import Session
from autoopt.types import AccuracyCheck, higher_is_better
from autoopt.workload import contract
from autoopt.workload.guard import UserCall
from autoopt.workload.load import check_metrics, display_path, user_code

DEFAULT_TOLERANCE = 0.01
# evaluate() runs with torch seeded from the run's seed plus this, for the baseline and every variant
EVAL_SEED_OFFSET = 2000


def evaluate_session(s: Session) -> dict[str, float]:
    """The model file's evaluate(model) on this session's model, checked (a ModelFileError
    when it returns anything but {name: number}); an exception it raises leaves marked as the
    model file's (autoopt.workload.guard)."""
    spec = s.spec
    model = s.eager_model
    was_training = model.training
    s.activate()
    torch.manual_seed(s.workload.seed + EVAL_SEED_OFFSET)
    model.eval()
    hook = _inputs_in_weights_dtype(model, s)
    try:
        with torch.no_grad(), apply.inference_context(s.cfg), UserCall(spec.path, "evaluate"), user_code():
            result = spec.evaluate(model)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return check_metrics(result, display_path(spec.path))


def _inputs_in_weights_dtype(model: torch.nn.Module, s: Session):
    """Inference with reduced-precision weights (the inference_mode transform's weights_dtype)
    casts the floating inputs to the weights' dtype (autoopt.run.apply.prepare_batch; the patch
    does it in forward): the same is done here to what evaluate() passes the model, through a
    forward pre-hook removed after. None when the configuration keeps fp32 weights."""
    if not s.cfg.weights_dtype or s.train:
        return None
    dt = apply.DTYPES[s.cfg.weights_dtype]

    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt) if t.is_floating_point() else t

    def cast(_module, args, kwargs):
        return contract.map_tensors(tuple(args), to), contract.map_tensors(dict(kwargs), to)

    return model.register_forward_pre_hook(cast, with_kwargs=True)


def _problem(metric: str, base: float, var, allowed: float) -> str:
    if var is None:
        return f"{metric} missing (baseline {base:.6g})"
    if not math.isfinite(var):
        return f"{metric} {var} (baseline {base:.6g})"
    worse = (base - var) if higher_is_better(metric) else (var - base)
    if worse <= allowed:
        return ""
    return (f"{metric} {var:.6g} vs baseline {base:.6g} (difference {var - base:+.4g}, allowed "
            f"{'-' if higher_is_better(metric) else '+'}{allowed:.4g})")


def compare_metrics(base: dict[str, float], var: dict[str, float], tolerance: float, steps: int) -> AccuracyCheck:
    """The variant's metrics judged against the baseline's (module docstring)."""
    check = AccuracyCheck(dict(base), dict(var), tolerance, steps=steps)
    problems = [p for k, b in base.items() if (p := _problem(k, b, var.get(k), check.allowed(k)))]
    if problems:
        check.ok = False
        trained = f"after {steps} training steps from the same seed, " if steps else ""
        check.reason = (f"accuracy outside tolerance: {'; '.join(problems)} (evaluate(model) {trained}tolerance "
                        f"{tolerance:g} x max(|baseline|, 1), --accuracy-tolerance)")
    return check
