"""Gradient health: what the training step's gradients and updates look like, measured on the
verification steps only (never inside a timed step).

A `HealthMonitor` hangs on a `TrainingStep` (`step.monitor`) while autoopt.run.verify runs
the verification steps. After backward and before the optimizer step it reads, per layer
(the module that owns a parameter, named as in `named_parameters()`), the gradient norm
(unscaled by the GradScaler's scale when there is one) with one `torch._foreach_norm` over
the gradients, and the count of inf/NaN gradient elements where a norm is not finite; it
keeps a copy of the weights, and after the step reads the update-to-weight ratio
||w_after - w_before|| / ||w_before|| per layer. Forward hooks read each layer's output RMS
on the first step's forward (activations that grow with depth), then are removed. Each step
costs two host reads of a few numbers per parameter and one copy of the weights, on four
steps of a run.

`summary()` turns the steps into a plain JSON-able dict (report.json's `health`); the rule
facts (`health.*`) are derived from it in autoopt.diagnosis.facts_builder.health_facts,
torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# A layer whose gradient norm is below this fraction of the largest layer's is vanishing
# (a transformer's attention query/key weights start near 1e-4 of the largest: not vanishing).
VANISHING_FRACTION = 1e-6
# A layer gradient norm at or above this (unscaled, any measured step) is exploding.
EXPLODING_NORM = 1e3
# Activations explode where a layer's output RMS is at least this, and this many times the
# first layer's (a model fed raw pixel values starts large; a normalized one stays near 1).
EXPLODING_ACTIVATION = 100.0
NAMED_LAYERS = 5  # layers named in a fact's list before "and N more"


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@dataclass
class StepHealth:
    layer_grad_norms: dict[str, float]
    nonfinite: dict[str, int]
    update_ratios: dict[str, float] = field(default_factory=dict)
    scale: Optional[float] = None
    stepped: bool = True
    activation_rms: dict[str, float] = field(default_factory=dict)


class HealthMonitor:
    """Reads gradient norms, inf/NaN counts and update ratios of a model's parameters
    around each optimizer step it is told about (`before_step`, `after_step`)."""

    def __init__(self, model: torch.nn.Module, *, scaler=None, fp16: bool = False, optimizer=None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.layers: list[str] = []
        self.layer_index: list[int] = []
        for n, _ in named:
            layer = _layer_of(n)
            if layer not in self.layers:
                self.layers.append(layer)
            self.layer_index.append(self.layers.index(layer))
        self.scaler = scaler
        self.fp16 = fp16 or any(p.dtype == torch.float16 for p in self.params)
        self.lr = _first_lr(optimizer)
        self.steps: list[StepHealth] = []
        self._before: Optional[list[torch.Tensor]] = None
        self._weight_norms: list[float] = []
        self._with_grad: list[int] = []
        # each layer's output RMS on the step's first forward through it (forward hooks)
        self._acts: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._activation_hook(name))
                       for name in self.layers if name in modules]

    def _activation_hook(self, name: str):
        def hook(_module, _inputs, output) -> None:
            if name in self._acts:
                return
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                with torch.no_grad():  # one reduction, accumulated in fp32, no copy of the activation
                    self._acts[name] = torch.linalg.vector_norm(t.detach(), dtype=torch.float32) / math.sqrt(t.numel())
        return hook

    def detach(self) -> None:
        """Remove the forward hooks (the model goes on without them)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _take_activations(self) -> dict[str, float]:
        acts, self._acts = self._acts, {}
        if not acts:
            return {}
        values = [float(x) for x in torch.stack(list(acts.values())).cpu()]  # one host read
        return dict(zip(acts, values))

    def _by_layer(self, values: list[float], which: list[int]) -> dict[str, float]:
        sq: dict[str, float] = {}
        for i, v in zip(which, values):
            name = self.layers[self.layer_index[i]]
            sq[name] = sq.get(name, 0.0) + v * v
        return {k: math.sqrt(v) for k, v in sq.items()}

    @torch.no_grad()
    def before_step(self) -> None:
        """After backward, before optimizer.step: gradient and weight norms (one host read),
        inf/NaN counts where a norm is not finite, and a copy of the weights."""
        which = [i for i, p in enumerate(self.params) if p.grad is not None]
        self._with_grad = which
        acts = self._take_activations()
        self.detach()  # activations are read on the first step only: the other steps run without hooks
        if not which:
            self.steps.append(StepHealth({}, {}, activation_rms=acts))
            return
        grads = [self.params[i].grad.detach() for i in which]
        grads = [g.float() if g.dtype != torch.float32 else g for g in grads]
        weights = [self.params[i].detach() for i in which]
        weights32 = [w.float() if w.dtype != torch.float32 else w for w in weights]
        both = [float(x) for x in torch.stack(torch._foreach_norm(grads + weights32)).cpu()]
        norms, self._weight_norms = both[:len(which)], both[len(which):]
        scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        if scale:
            norms = [n / scale for n in norms]
        nonfinite: dict[str, int] = {}
        for i, n, g in zip(which, norms, grads):
            if not math.isfinite(n):
                name = self.layers[self.layer_index[i]]
                nonfinite[name] = nonfinite.get(name, 0) + int((~torch.isfinite(g)).sum())
        self.steps.append(StepHealth(self._by_layer(norms, which), nonfinite, scale=scale, activation_rms=acts))
        try:
            self._before = [w.clone() for w in weights]
        except torch.OutOfMemoryError:  # no room for a copy of the weights: no update ratios, the step goes on
            self._before = None

    @torch.no_grad()
    def after_step(self, stepped: bool = True) -> None:
        """After optimizer.step: the update-to-weight ratio per layer (one host read)."""
        before, self._before = self._before, None
        if not self.steps:
            return
        rec = self.steps[-1]
        rec.stepped = stepped
        if not before:
            return
        after = [self.params[i].detach() for i in self._with_grad]
        torch._foreach_sub_(before, after)  # the copy becomes the step's update (its sign does not matter)
        deltas = [d.float() if d.dtype != torch.float32 else d for d in before]
        d = [float(x) for x in torch.stack(torch._foreach_norm(deltas)).cpu()]
        dl, wl = self._by_layer(d, self._with_grad), self._by_layer(self._weight_norms, self._with_grad)
        rec.update_ratios = {k: dl[k] / wl[k] for k in dl if wl.get(k) and math.isfinite(dl[k])}

    def summary(self, losses: list[float]) -> dict[str, Any]:
        return summarize(self.steps, self.layers, losses, scaler=self.scaler is not None, fp16=self.fp16, lr=self.lr)


def _first_lr(optimizer) -> Optional[float]:
    try:
        lr = optimizer.param_groups[0]["lr"]
        return float(lr)
    except Exception:  # noqa: BLE001 - no optimizer, or a tensor / scheduler-managed lr
        return None


def _median(xs: list[float]) -> Optional[float]:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _clean(x: Optional[float]) -> Optional[float]:
    """A JSON-safe number (inf/NaN -> None), rounded to 6 significant digits."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def _layer_rows(steps: list[StepHealth], layers: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in layers:
        norms = [s.layer_grad_norms[name] for s in steps if name in s.layer_grad_norms]
        if not norms:
            continue
        finite = [n for n in norms if math.isfinite(n)]
        ratios = [s.update_ratios[name] for s in steps if s.stepped and name in s.update_ratios]
        rows.append({"name": name, "grad_norm": _clean(norms[0]),
                     "grad_norm_last": _clean(finite[-1] if finite else None),
                     "grad_norm_max": _clean(max(finite) if finite else None),
                     "update_ratio": _clean(_median(ratios)),
                     "nonfinite": sum(s.nonfinite.get(name, 0) for s in steps),
                     "activation_rms": _clean(steps[0].activation_rms.get(name)) if steps else None})
    return rows


def summarize(steps: list[StepHealth], layers: list[str], losses: list[float], *, scaler: bool, fp16: bool,
              lr: Optional[float] = None) -> dict[str, Any]:
    """report.json's `health`: per-step totals, per-layer rows (in registration order, input
    side first), the first inf/NaN gradient, the GradScaler's scales and skipped steps."""
    totals = [math.sqrt(sum(v * v for v in s.layer_grad_norms.values())) for s in steps]
    first_bad = next(((i + 1, next(iter(s.nonfinite))) for i, s in enumerate(steps) if s.nonfinite), None)
    ratios = [r for s in steps if s.stepped for r in s.update_ratios.values()]
    return {
        "steps": len(steps),
        "loss": [_clean(x) for x in losses],
        "grad_norm": [_clean(x) for x in totals],
        "layers": _layer_rows(steps, layers),
        "nonfinite_grads": sum(sum(s.nonfinite.values()) for s in steps),
        "first_nonfinite": {"step": first_bad[0], "layer": first_bad[1]} if first_bad else None,
        "update_ratio": _clean(_median(ratios)),
        "lr": _clean(lr),
        "fp16": fp16,
        "grad_scaler": {"scale": [s.scale for s in steps], "skipped_steps": sum(not s.stepped for s in steps)}
        if scaler else None,
        "thresholds": {"vanishing_fraction": VANISHING_FRACTION, "exploding_norm": EXPLODING_NORM,
                       "exploding_activation": EXPLODING_ACTIVATION},
    }


def growth_text(summary: dict[str, Any]) -> str:
    """Why a run went inf/NaN, from a health summary: which layer, which step, how fast the
    gradient norm grew before. Empty when the summary shows no inf/NaN gradient."""
    bad = summary.get("first_nonfinite")
    norms = summary.get("grad_norm") or []
    if not bad:
        return ""
    step = bad["step"]
    text = f"the gradients first became inf/NaN at verification step {step}, in layer '{bad['layer']}'"
    finite = [n for n in norms[:step - 1] if n]
    if len(finite) >= 2 and finite[0] > 0:
        per_step = (finite[-1] / finite[0]) ** (1 / (len(finite) - 1))
        text += (f"; the total gradient norm grew from {finite[0]:.3g} to {finite[-1]:.3g} over steps 1-{len(finite)}"
                 f" (x{per_step:.3g} per step)")
    elif finite:
        text += f"; the total gradient norm was {finite[0]:.3g} at step 1"
    big = sorted((r for r in summary.get("layers") or [] if r.get("grad_norm_max")),
                 key=lambda r: -r["grad_norm_max"])[:3]
    if big:
        text += "; largest finite layer gradient norms: " + ", ".join(
            f"'{r['name']}' {r['grad_norm_max']:.3g}" for r in big)
    return text
