"""The one facts builder: every command that runs the rules builds their facts here.

`build_facts` lays the producers over each other, later ones winning where they know
better:

1. the trace analysis (`from_analysis`: its device facts as they are, its metrics under
   their registry names, the source lines of synchronisations where the trace has stacks);
2. the live device (`Capabilities.facts()`), known better than a trace tells it;
3. the live torch settings (`env.*`, autoopt.env.env_facts) when the run is live;
4. the workload's model.* / workload.* facts (autoopt.workload);
5. the configuration that ran (`config_facts`): a configuration with channels_last says
   workload.channels_last is true, so the rules judge what ran, not the model file;
6. the timed measurement (`measurement_facts`);
7. gradient health on the baseline's verification steps (`health_facts`, health.*);
8. facts only the caller knows (a distributed job's rank skew).

`diagnose` evaluates the rules on them and adds what the analysis knows beyond facts (the
straggler rank). Torch-free unless `live` is asked for.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from autoopt.diagnosis.rules import Rule, evaluate, load_rules
from autoopt.facts import FACTS
from autoopt.types import Capabilities, ExecConfig, Finding, Measurement

_DATA_DEPENDENT_OPS = ("nonzero", "masked_select", "unique", "repeat_interleave", "index_put", "argwhere",
                       "masked_scatter")


def from_analysis(analysis: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Rule facts from an `autoopt.analyze.analyze_paths` result: its `device_facts` as they
    are, its `metrics` under their registry names (`gpu_utilization` ->
    `metrics.gpu_utilization`), and, where the trace had stacks, the source lines of
    synchronisations (`metrics.sync_sites`) and of data-dependent operations
    (`metrics.data_dependent_sites`) as "path:line op" strings. Keys that are not registry
    facts are left out."""
    if not analysis:
        return {}
    facts: dict[str, Any] = {k: v for k, v in (analysis.get("device_facts") or {}).items() if k in FACTS}
    for k, v in (analysis.get("metrics") or {}).items():
        name = k if k in FACTS else f"metrics.{k}"
        if name in FACTS:
            facts[name] = v
    sync_sites, dd_sites = _sites(analysis)
    if sync_sites:
        facts["metrics.sync_sites"] = sync_sites
    if dd_sites:
        facts["metrics.data_dependent_sites"] = dd_sites
    return facts


def _sites(analysis: dict[str, Any]) -> tuple[list[str], list[str]]:
    sync_sites: list[str] = []
    dd_sites: list[str] = []
    for row in analysis.get("traces") or []:
        for site in ((row.get("syncs") or {}).get("sites") or []):
            src, op = site.get("source"), site.get("name") or ""
            if not src:
                continue
            text = f"{src} {op}".strip()
            if text not in sync_sites:
                sync_sites.append(text)
            if any(d in op for d in _DATA_DEPENDENT_OPS) and text not in dd_sites:
                dd_sites.append(text)
    return sync_sites, dd_sites


def config_facts(cfg: ExecConfig) -> dict[str, Any]:
    """The workload.* and env.* facts a configuration changes from the model file's."""
    out: dict[str, Any] = {"workload.batch_size": cfg.batch_size}
    if cfg.amp_dtype:
        out["workload.autocast"] = True
    if cfg.channels_last:
        out["workload.channels_last"] = True
    if cfg.compile_call_mode is not None:
        out["workload.compiled"] = True
    if cfg.optimizer_impl:
        out["workload.optimizer_impl"] = cfg.optimizer_impl
    if cfg.matmul_precision:
        out["env.matmul_precision"] = cfg.matmul_precision
    if cfg.cudnn_benchmark is not None:
        out["env.cudnn_benchmark"] = bool(cfg.cudnn_benchmark)
    loader = cfg.dataloader or {}
    for key, fact in (("num_workers", "workload.dataloader_workers"), ("pin_memory", "workload.pin_memory"),
                      ("persistent_workers", "workload.persistent_workers"), ("intra_op_threads", "env.num_threads")):
        if loader.get(key) is not None:
            out[fact] = loader[key]
    if cfg.num_threads:
        out["env.num_threads"] = cfg.num_threads
    return out


def cpu_share_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """env.cpus_free and env.threads_over_free, from the other work measured before the run
    (env.cpus_busy_other; none where it was not measured), the cores and the DataLoader's
    workers of these facts. A core counts as held when other work used 0.6 of it or more."""
    busy, cpus = facts.get("env.cpus_busy_other") or 0.0, facts.get("workload.cpu_count")
    if not cpus:
        return {}
    workers = int(facts.get("workload.dataloader_workers") or 0)
    free = max(1, int(cpus) - int(busy + 0.4) - workers)
    out: dict[str, Any] = {"env.cpus_free": free}
    if facts.get("env.num_threads"):
        out["env.threads_over_free"] = int(facts["env.num_threads"]) - free
    return out


def measurement_facts(m: Measurement, total_memory_mb: Optional[float] = None) -> dict[str, Any]:
    """metrics.* facts of a timed measurement."""
    out: dict[str, Any] = {
        "metrics.step_time_ms": m.step_time_ms.median,
        "metrics.step_time_rel_spread": m.step_time_ms.rel_spread,
        "metrics.throughput_per_s": m.throughput_per_s,
        "metrics.peak_memory_mb": m.peak_memory_mb,
        "metrics.mfu": m.mfu,
    }
    if total_memory_mb and m.peak_memory_mb is not None:
        out["metrics.memory_fraction"] = m.peak_memory_mb / total_memory_mb
    return out


UPDATE_RATIO_NORM = 1e-3  # the rule of thumb for ||update|| / ||weight|| per step


def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _layer_facts(layers: list[dict[str, Any]], thresholds: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    first = [(r["name"], r["grad_norm"]) for r in layers if r.get("grad_norm") is not None]
    top = max((n for _, n in first), default=0.0)
    if top > 0:
        out["health.layer_grad_spread"] = min(n for _, n in first) / top
        vanishing = [name for name, n in first if n < thresholds.get("vanishing_fraction", 1e-6) * top]
        out["health.vanishing_layer_count"] = len(vanishing)
        out["health.vanishing_layers"] = _names(vanishing)
    peaks = sorted(((r["name"], r["grad_norm_max"]) for r in layers if r.get("grad_norm_max") is not None),
                   key=lambda x: -x[1])
    if peaks:
        out["health.max_layer_grad_norm"] = peaks[0][1]
        big = [f"{name} ({n:.3g})" for name, n in peaks if n >= thresholds.get("exploding_norm", 1e3)]
        out["health.exploding_layer_count"] = len(big)
        out["health.exploding_layers"] = _names(big)
    out.update(_activation_facts(layers, thresholds))
    return out


def _activation_facts(layers: list[dict[str, Any]], thresholds: dict[str, Any]) -> dict[str, Any]:
    """Where activations grow: the layers (in depth order) whose output RMS is at least the
    threshold and that many times the first layer's."""
    acts = [(r["name"], r["activation_rms"]) for r in layers if r.get("activation_rms") is not None]
    if not acts:
        return {}
    limit = thresholds.get("exploding_activation", 100.0)
    first = acts[0][1]
    grown = [(name, a) for name, a in acts if a >= limit and a >= limit * first]
    return {"health.max_activation_rms": max(a for _, a in acts), "health.first_activation_rms": first,
            "health.exploding_activation_count": len(grown),
            "health.exploding_activations": _names([f"{name} ({a:.3g})" for name, a in grown])}


def _loss_facts(losses: list[Optional[float]]) -> dict[str, Any]:
    finite = [x for x in losses if x is not None]
    if not finite or losses[0] is None:
        return {}
    out: dict[str, Any] = {"health.loss_first": finite[0], "health.loss_last": finite[-1]}
    if finite[0] > 0 and finite[-1] >= 0:
        out["health.loss_growth"] = finite[-1] / finite[0]
    return out


def health_facts(health: Optional[dict[str, Any]]) -> dict[str, Any]:
    """health.* facts from autoopt.run.health's summary (report.json's `health`)."""
    if not health or not health.get("steps"):
        return {}
    norms = [n for n in health.get("grad_norm") or [] if n is not None]
    scaler = health.get("grad_scaler")
    fp16 = bool(health.get("fp16"))
    out: dict[str, Any] = {
        "health.steps": health["steps"], "health.nonfinite_grads": health.get("nonfinite_grads", 0),
        "health.grad_scaler": scaler is not None, "health.fp16": fp16,
        "health.fp16_without_scaler": fp16 and scaler is None, "health.lr": health.get("lr"),
    }
    if norms and (health.get("grad_norm") or [None])[0] is not None:
        out["health.grad_norm"] = norms[0]
        if norms[0] > 0:
            out["health.grad_norm_growth"] = norms[-1] / norms[0]
    out.update(_layer_facts(health.get("layers") or [], health.get("thresholds") or {}))
    bad = health.get("first_nonfinite")
    if bad:
        out["health.first_nonfinite_layer"] = bad["layer"]
        out["health.first_nonfinite_step"] = bad["step"]
    if scaler is not None:
        out["health.scaler_skipped_steps"] = scaler.get("skipped_steps", 0)
        scales = [x for x in scaler.get("scale") or [] if x is not None]
        if scales:
            out["health.loss_scale"] = scales[-1]
    out.update(_loss_facts(health.get("loss") or []))
    ratio = health.get("update_ratio")
    if ratio is not None:
        out["health.update_ratio"] = ratio
        out["health.update_ratio_decades"] = abs(math.log10(max(ratio, 1e-12) / UPDATE_RATIO_NORM))
    return out


def build_facts(
    *,
    analysis: Optional[dict[str, Any]] = None,
    device: Optional[Capabilities] = None,
    live: bool = False,
    env: Optional[dict[str, Any]] = None,
    workload: Optional[dict[str, Any]] = None,
    config: Optional[ExecConfig] = None,
    measurement: Optional[Measurement] = None,
    health: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The facts the rules read, from whatever producers the caller has (see the module
    docstring for the order). `live` reads the torch settings of this process (env.*);
    `env` gives them instead (a run in another process, such as a script or a rank);
    `health` is autoopt.run.health's summary of the verification steps."""
    facts = from_analysis(analysis)
    if device is not None:
        facts.update(device.facts())
    if live:
        from autoopt.env import env_facts

        facts.update(env_facts())
    facts.update(env or {})
    facts.update({k: v for k, v in (workload or {}).items() if not k.startswith("_")})
    if config is not None:
        facts.update(config_facts(config))
    if measurement is not None:
        facts.update(measurement_facts(measurement, device.total_memory_mb if device else None))
    facts.update(health_facts(health))
    facts.update(extra or {})
    facts.update({k: v for k, v in cpu_share_facts(facts).items() if k not in (extra or {})})
    return facts


def diagnose(facts: dict[str, Any], analysis: Optional[dict[str, Any]] = None,
             rules: Optional[list[Rule]] = None) -> list[Finding]:
    """The findings of the rules on these facts, in code order. A straggler the analysis
    named (autoopt.analyze.ranks) is added to AO804's message and evidence."""
    findings = evaluate(rules if rules is not None else load_rules(), facts)
    straggler = ((analysis or {}).get("ranks") or {}).get("straggler_rank")
    if straggler is not None:
        for f in findings:
            if f.code == "AO804":
                f.message += f" (straggler: rank {straggler}, which waits least in the collectives)"
                f.evidence["straggler_rank"] = straggler
    return findings
