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
7. facts only the caller knows (a distributed job's rank skew).

`diagnose` evaluates the rules on them and adds what the analysis knows beyond facts (the
straggler rank). Torch-free unless `live` is asked for.
"""
from __future__ import annotations

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


def build_facts(
    *,
    analysis: Optional[dict[str, Any]] = None,
    device: Optional[Capabilities] = None,
    live: bool = False,
    env: Optional[dict[str, Any]] = None,
    workload: Optional[dict[str, Any]] = None,
    config: Optional[ExecConfig] = None,
    measurement: Optional[Measurement] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The facts the rules read, from whatever producers the caller has (see the module
    docstring for the order). `live` reads the torch settings of this process (env.*);
    `env` gives them instead (a run in another process, such as a script or a rank)."""
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
