"""The DDP transforms worth measuring for a distributed workload, as search candidates.

Each is a candidate of its own (two bucket sizes are two candidates of one transform, which
the search treats as alternatives): a smaller gradient bucket (earlier all-reduce, more
overlap with backward), a larger one when the gradients exceed the current bucket,
gradient_as_bucket_view, static_graph and no_sync accumulation. What the model file already
sets, what does not apply, and what the user's flags decline (autoopt.settings.Consent; a
transform that changes training semantics needs --yes or --accept) become `skipped` variants
with the reason.
"""
from __future__ import annotations

from autoopt.results import Variant
from autoopt.search.trial import Candidate
from autoopt.settings import Consent
from autoopt.transforms.ddp import DDP_TRANSFORMS
from autoopt.types import Capabilities, ExecConfig, Finding, Status, Workload

MANUAL_REASON = ("changes training semantics (introduces gradient accumulation: the per-rank batch is split into "
                 "micro-batches); pass --yes or --accept ddp_no_sync to measure it")
DECLINED_REASON = "not selected (rejected or not in the accepted transforms)"


def _label(name: str, params: dict) -> str:
    return f"{name}={params['bucket_cap_mb']:g}" if name == "ddp_bucket_size" else name


def gradient_mb(workload: Workload) -> float:
    facts = workload.facts
    dtype_bytes = {"float16": 2, "bfloat16": 2, "float64": 8}.get(facts.get("model.param_dtype") or "", 4)
    return (facts.get("model.param_count") or 0) * dtype_bytes / 2**20


def _proposals(cfg: ExecConfig, grad_mb: float) -> list[tuple[str, dict, str]]:
    """(transform, params, reason to skip or "") for each DDP transform worth a look."""
    base = cfg.ddp or {}
    cur = float(base.get("bucket_cap_mb", 25.0))
    out = [("ddp_bucket_size", {"bucket_cap_mb": round(max(min(cur, grad_mb) / 4, 0.01), 3)}, "")]
    if grad_mb > cur:
        out.append(("ddp_bucket_size", {"bucket_cap_mb": max(4 * cur, 100.0)}, ""))
    for name, key, const in (("ddp_gradient_as_bucket_view", "gradient_as_bucket_view", "DDP_GRADIENT_AS_BUCKET_VIEW"),
                             ("ddp_static_graph", "static_graph", "DDP_STATIC_GRAPH")):
        out.append((name, {}, f"the model file already sets {const}" if base.get(key) else ""))
    if base.get("no_sync"):
        out.append(("ddp_no_sync", {}, "the model file already sets DDP_NO_SYNC"))
    else:
        accum = cfg.grad_accum_steps
        out.append(("ddp_no_sync", {"steps": accum if accum >= 2 else 2}, ""))
    return out


def ddp_candidates(workload: Workload, caps: Capabilities, cfg: ExecConfig, consent: Consent,
                   variants: list[Variant]) -> tuple[list[Candidate], float]:
    """The candidates, with every skipped one appended to `variants`; and the gradient size (MiB)."""
    grad_mb = gradient_mb(workload)
    out = []
    for name, params, skip in _proposals(cfg, grad_mb):
        t = DDP_TRANSFORMS[name]
        skip = skip or t.check(workload, caps, params) or ""
        if not skip:
            params = t.resolve_params(workload, caps, params)
            skip = _declined(consent, _label(name, params), name, t.safety_for(params))
        label = _label(name, params)
        if skip:
            variants.append(Variant(name=label, codes=[label], transforms=[{"name": name, "params": params}],
                                    accepted=False, status=Status.SKIPPED, reason=skip, safety=t.safety_for(params)))
            continue
        f = Finding(code=label, name=name.replace("_", "-"), title=t.summary, message=t.describe(params),
                    evidence={"gradient_mb": round(grad_mb, 4)}, safety=t.safety_for(params), transform=name,
                    params=params)
        out.append(Candidate(label, f, t, params))
    return out, grad_mb


def _declined(consent: Consent, label: str, name: str, safety: str) -> str:
    """Why the user's flags decline this candidate ("" when they do not)."""
    if {label.upper(), name.upper()} & {c.upper() for c in consent.reject}:
        return DECLINED_REASON
    d = consent.decide(label, name, safety)
    if d is None:
        d = consent.unattended(label, name, safety)
    if d:
        return ""
    return MANUAL_REASON if safety == "manual" else DECLINED_REASON
