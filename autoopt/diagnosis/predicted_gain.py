"""Predicted gain of a finding: what its transform can at most save, from the facts.

A rule states its model in the front matter as a `gain` table; every model is an upper
bound built from measured shares of the step, never a guess from outside the facts:

- `{ shares = [...], complements = [...], removable = r }`: the transform attacks the part
  of the step given by the product of the `shares` facts (fractions 0..1) times the product
  of `1 - x` for the `complements` facts, and removes at most the fraction `r` of it. E.g.
  bf16 autocast on a GPU: kernel share of the step x matmul share of kernel time x fp32
  share of matmul time x 0.75 (bf16 tensor-core GEMMs at least 4x faster than fp32).
  saved = that product; speedup = 1 / (1 - saved); predicted step = step x (1 - saved).
- `{ model = "batch_size", memory_budget = 0.9 }`: a larger batch raises throughput at
  most by filling the idle GPU (1 / gpu_utilization) and at most by the factor memory
  allows (budget / memory_fraction, as if memory grew linearly with the batch). The
  speedup is in samples per second; the predicted step time is per the original batch's
  samples.
- `{ model = "launch_overhead", gap_us = 2.0, complements = [...] }`: replaying a captured
  CUDA graph removes the time the GPU waits for the host (the host-wait share of the step,
  times `1 - x` for the complements), but each kernel of the graph still costs about
  `gap_us` microseconds of launch gap on the device: saved = step x share - kernels per
  step x gap (never below zero).
- `{ model = "rank_skew" }`: every rank waits for the slowest at each collective; balanced
  ranks run at most at the fastest rank's pace: saved = skew / (1 + skew).
- `{}`: no estimate (the transform trades time for memory, or no fact measures what it
  saves); the finding carries None rather than an invented number.

A required fact that is missing or None, or a share outside 0..1, gives (None, None).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from autoopt.facts import FACTS

MODELS = ("shares", "batch_size", "rank_skew", "launch_overhead")
SPEC_HELP = (
    'write gain = { shares = ["metrics.x_fraction", ...], removable = 0.5 } (optionally complements = [...]), '
    'or gain = { model = "batch_size", memory_budget = 0.9 }, or gain = { model = "rank_skew" }, or leave gain out'
)
STEP_FACT = "metrics.step_time_ms"
_MODEL_FACTS = {
    "batch_size": ["metrics.gpu_utilization", "metrics.memory_fraction"],
    "rank_skew": ["metrics.rank_step_skew"],
    "launch_overhead": ["metrics.host_wait_fraction", "metrics.kernels_per_step", "metrics.step_time_ms"],
}


def _model(spec: dict[str, Any]) -> Optional[str]:
    if not spec:
        return None
    return spec.get("model", "shares")


def _number_in(v: Any, low: float, high: float, *, open_low: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return (low < v if open_low else low <= v) and v <= high


def _only(spec: dict, allowed: set[str]) -> None:
    extra = set(spec) - allowed
    if extra:
        raise ValueError(f"unknown keys {', '.join(sorted(extra))}")


def _validate_shares(spec: dict) -> None:
    _only(spec, {"model", "shares", "complements", "removable"})
    shares = spec.get("shares")
    if not isinstance(shares, list) or not shares:
        raise ValueError("shares must be a non-empty list of fraction facts")
    comps = spec.get("complements", [])
    if not isinstance(comps, list):
        raise ValueError("complements must be a list of fraction facts")
    for name in shares + comps:
        if not isinstance(name, str) or name not in FACTS:
            raise ValueError(f"{name!r} is not a documented fact")
        if FACTS[name][0] != "number":
            raise ValueError(f"{name} is not a number fact")
    if not _number_in(spec.get("removable"), 0, 1, open_low=True):
        raise ValueError("removable must be a number in (0, 1]: the largest fraction of the targeted time the "
                         "transform removes")


def _validate_batch_size(spec: dict) -> None:
    _only(spec, {"model", "memory_budget"})
    if not _number_in(spec.get("memory_budget", 0.9), 0, 1, open_low=True):
        raise ValueError("memory_budget must be a number in (0, 1]")


def _validate_launch_overhead(spec: dict) -> None:
    _only(spec, {"model", "gap_us", "complements"})
    if not _number_in(spec.get("gap_us", 2.0), 0, 100):
        raise ValueError("gap_us must be a number of microseconds in [0, 100]")
    comps = spec.get("complements", [])
    if not isinstance(comps, list) or any(not isinstance(n, str) or n not in FACTS for n in comps):
        raise ValueError("complements must be a list of documented fraction facts")


_VALIDATORS = {"shares": _validate_shares, "batch_size": _validate_batch_size,
               "launch_overhead": _validate_launch_overhead,
               "rank_skew": lambda spec: _only(spec, {"model"})}


def validate(spec: Any) -> None:
    """Raise ValueError describing what is wrong with a gain spec."""
    if not isinstance(spec, dict):
        raise ValueError("gain must be a table")
    if not spec:
        return
    model = _model(spec)
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {', '.join(MODELS)}")
    _VALIDATORS[model](spec)


def fact_names(spec: dict[str, Any]) -> list[str]:
    """The facts a gain spec reads (they join the finding's evidence)."""
    model = _model(spec)
    if model is None:
        return []
    if model == "shares":
        names = list(spec.get("shares", [])) + list(spec.get("complements", []))
    else:
        names = list(_MODEL_FACTS[model]) + list(spec.get("complements", []))
    return list(dict.fromkeys(names + [STEP_FACT]))


def _num(facts: dict[str, Any], name: str) -> Optional[float]:
    v = facts.get(name)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return None
    return v


def _fraction(facts: dict[str, Any], name: str) -> Optional[float]:
    v = _num(facts, name)
    if v is None or not 0.0 <= v <= 1.0:
        return None
    return v


def _scaled(facts: dict[str, Any], value: float, names: list[str], *, complement: bool) -> Optional[float]:
    """value times each named fraction (or 1 - it), None when one is unknown."""
    for name in names:
        f = _fraction(facts, name)
        if f is None:
            return None
        value *= (1.0 - f) if complement else f
    return value


def _predict_shares(spec: dict, facts: dict, step: Optional[float]):
    saved = _scaled(facts, float(spec["removable"]), spec["shares"], complement=False)
    saved = None if saved is None else _scaled(facts, saved, spec.get("complements", []), complement=True)
    if saved is None or saved >= 1.0:
        return None, None
    return 1.0 / (1.0 - saved), (step * (1.0 - saved) if step is not None else None)


def _predict_batch_size(spec: dict, facts: dict, step: Optional[float]):
    util = _fraction(facts, "metrics.gpu_utilization")
    mem = _fraction(facts, "metrics.memory_fraction")
    if util is None or mem is None or util <= 0 or mem <= 0:
        return None, None
    speedup = max(1.0, min(1.0 / util, float(spec.get("memory_budget", 0.9)) / mem))
    return speedup, (step / speedup if step is not None else None)


def _predict_launch_overhead(spec: dict, facts: dict, step: Optional[float]):
    share = _fraction(facts, "metrics.host_wait_fraction")
    kernels = _num(facts, "metrics.kernels_per_step")
    if share is None or kernels is None or step is None:
        return None, None
    share = _scaled(facts, share, spec.get("complements", []), complement=True)
    if share is None:
        return None, None
    saved_ms = max(0.0, step * share - kernels * float(spec.get("gap_us", 2.0)) / 1000.0)
    saved_ms = min(saved_ms, step * 0.999)
    return step / (step - saved_ms), step - saved_ms


def _predict_rank_skew(spec: dict, facts: dict, step: Optional[float]):
    skew = _num(facts, "metrics.rank_step_skew")
    if skew is None or skew < 0:
        return None, None
    saved = skew / (1.0 + skew)
    return 1.0 + skew, (step * (1.0 - saved) if step is not None else None)


_PREDICTORS = {"shares": _predict_shares, "batch_size": _predict_batch_size,
               "launch_overhead": _predict_launch_overhead, "rank_skew": _predict_rank_skew}


def predict(spec: dict[str, Any], facts: dict[str, Any]) -> tuple[Optional[float], Optional[float]]:
    """(expected_speedup, predicted_step_time_ms) for a finding, or None where the facts do
    not allow an estimate. The speedup is a ratio >= 1 (an upper bound); the step time is
    None whenever metrics.step_time_ms is unknown."""
    model = _model(spec)
    if model is None:
        return None, None
    step = _num(facts, STEP_FACT)
    if step is not None and step <= 0:
        step = None
    return _PREDICTORS[model](spec, facts, step)
