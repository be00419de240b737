"""Run every analysis on loaded traces and assemble the `autoopt analyze --json` object
(minus "findings", which the rule engine adds)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from autoopt.analyze import breakdown as B
from autoopt.analyze import ranks as D
from autoopt.analyze import trace as T
from autoopt.analyze.device import device_facts, device_info
from autoopt.analyze.gpu_metrics import gpu_metrics
from autoopt.analyze.idle import idle_stats
from autoopt.analyze.kernels import kernel_stats, launch_stats
from autoopt.analyze.limits import Limits, human
from autoopt.analyze.loader import expand_paths, load_trace
from autoopt.analyze.memory import h2d_stats, peak_memory
from autoopt.analyze.operators import build_tree, op_stats, top_operators
from autoopt.analyze.steps import find_steps
from autoopt.analyze.sync import sync_stats
from autoopt.errors import TraceError

# the metrics.* facts (autoopt/facts.py) a trace can tell; the others stay None here
METRIC_KEYS = (
    "step_time_ms", "throughput_per_s", "peak_memory_mb", "memory_fraction", "mfu", "step_time_rel_spread",
    "steps", "gpu_utilization", "sm_efficiency", "achieved_occupancy", "tensor_core_kernel_ratio",
    "kernel_fraction", "memcpy_fraction", "memset_fraction", "communication_fraction", "runtime_fraction",
    "dataloader_fraction", "cpu_exec_fraction", "other_fraction", "matmul_fraction", "fp32_matmul_fraction",
    "conv_fraction", "layout_conversion_fraction", "kernels_per_step", "ops_per_step", "median_kernel_us",
    "small_kernel_fraction", "idle_fraction", "host_wait_fraction", "kernel_wait_fraction", "launch_bound",
    "sync_count_per_step", "sync_time_fraction", "host_reads_per_step", "data_dependent_ops_per_step",
    "h2d_copies_per_step",
    "pageable_h2d_fraction", "optimizer_fraction", "optimizer_kernels_per_step", "optimizer_ops_per_step",
    "comm_overlap_fraction", "rank_count", "rank_step_skew", "comm_backend", "dataparallel_ops",
    "dataloader_init_per_step", "graph_breaks", "recompilations", "nan_or_inf",
)


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if np.isfinite(x) else None


@dataclass
class _Analyses:
    """Every analysis of one trace, before they become metrics and the trace's JSON row."""

    st: Any  # steps.Steps
    dev: dict[str, Any]
    gpu: bool
    notes: list[str]
    step_ms: np.ndarray
    per_step: np.ndarray  # (steps, roles) microseconds
    mean_bd: np.ndarray  # mean microseconds per role
    devs: dict[int, dict[str, Any]]  # GPU metrics by device
    ks: dict[str, Any]
    tree: Any  # operators.OpTree
    ops: dict[str, Any]
    launch: Optional[dict[str, Any]]
    idle: dict[str, Any]
    syncs: dict[str, Any]
    h2d: dict[str, Any]
    mem: dict[str, Any]
    comm: dict[str, Any]

    def dev_mean(self, key: str) -> Optional[float]:
        """The mean of a GPU metric over the devices that have it."""
        vals = [self.devs[d][key] for d in sorted(self.devs) if self.devs[d][key] is not None]
        return float(np.mean(vals)) if vals else None


def analyze_trace(tr: T.Trace, *, top_n: int = 10, rank: int = 0) -> dict[str, Any]:
    """Every analysis of one trace (one rank)."""
    a = _run_analyses(tr, top_n)
    metrics = _metrics(tr, a)
    return _trace_row(tr, a, metrics, top_n, rank)


def _run_analyses(tr: T.Trace, top_n: int) -> _Analyses:
    st = find_steps(tr)
    dev = device_info(tr)
    gpu = dev["type"] == "cuda"
    notes = list(tr.notes) + list(st.notes)
    n = st.count
    bd = B.breakdown(tr, st)
    per_step = bd["per_step_us"]
    mean_bd = per_step.mean(axis=0) if n else np.zeros(len(B.ROLES))
    lo, hi = st.span
    gm = gpu_metrics(tr, st)
    notes += gm["notes"]
    ks = kernel_stats(tr, lo, hi, top_n)
    tree = build_tree(tr)
    ops = op_stats(tr, tree, st)
    launch = launch_stats(tr, lo, hi)
    idle = idle_stats(tr, st)
    syncs = sync_stats(tr, tree, st, top_n)
    h2d = h2d_stats(tr, st)
    mem = peak_memory(tr)
    comm = D.comm_stats(tr, st)
    if not gpu:
        notes.append("no GPU events: a CPU-only trace (GPU metrics are null; matmul/conv shares come from CPU "
                     "operator self time)")
    if dev.get("vendor") == "amd":
        notes.append("AMD ROCm trace: HIP runtime calls count as runtime, matrix-core kernels as tensor-core kernels")
    return _Analyses(st=st, dev=dev, gpu=gpu, notes=notes, step_ms=st.durations / 1e3, per_step=per_step,
                     mean_bd=mean_bd, devs=gm["devices"], ks=ks, tree=tree, ops=ops, launch=launch, idle=idle,
                     syncs=syncs, h2d=h2d, mem=mem, comm=comm)


def _metrics(tr: T.Trace, a: _Analyses) -> dict[str, Any]:
    """The metrics.* facts of one trace, every METRIC_KEYS key in order (None where unknown)."""
    metrics: dict[str, Any] = {k: None for k in METRIC_KEYS}
    metrics.update(_step_and_device_metrics(a))
    metrics.update(_time_share_metrics(tr, a))
    metrics.update(_operator_metrics(a))
    return {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _step_and_device_metrics(a: _Analyses) -> dict[str, Any]:
    n, gpu, dev, mem, step_ms = a.st.count, a.gpu, a.dev, a.mem, a.step_ms
    q = np.percentile(step_ms, [25, 75]) if n >= 2 else None
    return {
        "step_time_ms": float(np.median(step_ms)) if n else None,
        "peak_memory_mb": mem["peak_memory_mb"],
        "memory_fraction": (mem["peak_memory_mb"] / dev["memory_mb"]) if gpu and mem["peak_memory_mb"] is not None
        and dev.get("memory_mb") else None,
        "step_time_rel_spread": float((q[1] - q[0]) / np.median(step_ms)) if q is not None and np.median(step_ms) > 0
        else None,
        "steps": n if a.st.from_spans else 0,
        "gpu_utilization": a.dev_mean("gpu_utilization") if gpu else None,
        "sm_efficiency": a.dev_mean("sm_efficiency") if gpu else None,
        "achieved_occupancy": a.dev_mean("achieved_occupancy") if gpu else None,
        "tensor_core_kernel_ratio": a.ks["tensor_core_kernel_ratio"],
    }


def _time_share_metrics(tr: T.Trace, a: _Analyses) -> dict[str, Any]:
    st, n, gpu, ks, ops, idle, launch = a.st, a.st.count, a.gpu, a.ks, a.ops, a.idle, a.launch
    durs = st.durations
    kin = tr.idx(T.KERNEL)
    kernels_per_step = float(np.sum(st.index_of(tr.ts[kin]) >= 0)) / n if gpu and n else None
    fr = {role: (a.mean_bd[i] / durs.mean() if n and durs.mean() > 0 else None) for i, role in enumerate(B.ROLES)}
    return {
        **{f"{role}_fraction": fr[role] for role in B.ROLES},
        "matmul_fraction": ks["matmul_fraction"] if gpu else ops["cpu_matmul_fraction"],
        "conv_fraction": ks["conv_fraction"] if gpu else ops["cpu_conv_fraction"],
        "fp32_matmul_fraction": ks["fp32_matmul_fraction"] if gpu else ops["cpu_fp32_matmul_fraction"],
        "layout_conversion_fraction": ks["layout_conversion_fraction"],
        "kernels_per_step": kernels_per_step,
        "ops_per_step": ops["ops_per_step"],
        "median_kernel_us": ks["median_kernel_us"],
        "small_kernel_fraction": ks["small_kernel_fraction"],
        "idle_fraction": idle["idle_fraction"],
        "host_wait_fraction": idle["host_wait_fraction"],
        "kernel_wait_fraction": idle["kernel_wait_fraction"],
        "launch_bound": launch["launch_bound"] if launch else None,
    }


def _operator_metrics(a: _Analyses) -> dict[str, Any]:
    syncs, ops, h2d, comm = a.syncs, a.ops, a.h2d, a.comm
    return {
        "sync_count_per_step": syncs["sync_count_per_step"],
        "sync_time_fraction": syncs["sync_time_fraction"],
        "host_reads_per_step": syncs["host_reads_per_step"],
        "data_dependent_ops_per_step": ops["data_dependent_ops_per_step"],
        "h2d_copies_per_step": h2d["h2d_copies_per_step"],
        "pageable_h2d_fraction": h2d["pageable_h2d_fraction"],
        "optimizer_fraction": ops["optimizer_fraction"],
        "optimizer_kernels_per_step": ops["optimizer_kernels_per_step"] if a.gpu else None,
        "optimizer_ops_per_step": ops["optimizer_ops_per_step"],
        "comm_overlap_fraction": comm["comm_overlap_fraction"],
        "rank_count": 1,
        "rank_step_skew": None,
        "comm_backend": comm["backend"],
        "dataparallel_ops": ops["dataparallel_ops"],
        "dataloader_init_per_step": ops["dataloader_init_per_step"],
        "graph_breaks": ops["graph_breaks"],
        "recompilations": ops["recompilations"],
    }


def _trace_row(tr: T.Trace, a: _Analyses, metrics: dict[str, Any], top_n: int, rank: int) -> dict[str, Any]:
    """The trace's entry in `analyze --json`'s "traces"."""
    st, n, ks, step_ms, per_step, durs = a.st, a.st.count, a.ks, a.step_ms, a.per_step, a.st.durations
    dev_ids = sorted(a.devs)
    return {
        "path": tr.path,
        "rank": rank,
        "device": a.dev,
        "steps": n if st.from_spans else 0,
        "step_names": st.names,
        "steps_from_spans": st.from_spans,
        "step_time_ms": {"mean": _r(step_ms.mean(), 3), "median": _r(np.median(step_ms), 3),
                         "min": _r(step_ms.min(), 3), "max": _r(step_ms.max(), 3)} if n else None,
        "step_times_ms": [_r(x, 3) for x in step_ms],
        "gpu_utilization": _r(metrics["gpu_utilization"], 6),
        "breakdown_ms": {role: _r(a.mean_bd[i] / 1e3, 4) for i, role in enumerate(B.ROLES)},
        "breakdown_per_step_ms": [{"step": st.names[j], "total": _r(durs[j] / 1e3, 4),
                                   **{role: _r(per_step[j, i] / 1e3, 4) for i, role in enumerate(B.ROLES)}}
                                  for j in range(n)],
        "tensor_core_kernel_ratio": _r(ks["tensor_core_kernel_ratio"], 6),  # autoopt.analyze.kernels' detection
        "tensor_core_kernel_ratio_tb": _r(ks["tensor_core_kernel_ratio_tb"], 6),  # torch-tb-profiler's name list
        "matmul_precision": ({k: _r(v, 6) for k, v in ks["matmul_precision"].items()}
                             if ks["matmul_precision"] else None),  # shares of matmul/conv kernel time
        "sm_efficiency": _r(metrics["sm_efficiency"], 6),
        "achieved_occupancy": _r(metrics["achieved_occupancy"], 6),
        "gpu_metrics_by_device": {str(d): {k: _r(v, 6) for k, v in a.devs[d].items()} for d in dev_ids},
        "top_kernels": ks["top_kernels"],
        "top_operators": top_operators(tr, a.tree, top_n, by_device=a.gpu),
        "kernel_launch": a.launch,
        "idle": {k: (_r(v, 6) if not isinstance(v, list) else v) for k, v in a.idle.items()},
        "syncs": a.syncs,
        "h2d": {k: _r(v, 6) for k, v in a.h2d.items()},
        "memory": a.mem,
        "communication": {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in a.comm.items()},
        "metrics": metrics,
        "events": tr.n,
        "size_mb": round(tr.size_bytes / 1e6, 3),
        "notes": a.notes,
    }


def _aggregate(rows: list[dict]) -> dict[str, Any]:
    if len(rows) == 1:
        return dict(rows[0]["metrics"])
    out: dict[str, Any] = {}
    for k in METRIC_KEYS:
        vals = [r["metrics"][k] for r in rows if r["metrics"][k] is not None]
        if not vals:
            out[k] = None
        elif isinstance(vals[0], bool):
            out[k] = any(vals)
        elif isinstance(vals[0], str):
            out[k] = next((v for v in vals if v), "")
        elif k in ("step_time_ms", "peak_memory_mb", "memory_fraction"):
            out[k] = max(vals)  # the slowest / fullest rank bounds the job
        else:
            out[k] = round(float(np.mean(vals)), 6)
    return out


def _one_job(rows: list[dict], evidence: list[tuple[str, Optional[int]]]) -> bool:
    """Whether several traces are the ranks of one job: each names its rank (distributedInfo or
    a rank/worker file name, not just its place in the list), the ranks are distinct, and the
    world sizes the traces record agree."""
    if any(how == "order" for how, _ in evidence):
        return False
    if len({r["rank"] for r in rows}) < len(rows):
        return False
    sizes = {ws for _, ws in evidence if ws is not None}
    return len(sizes) <= 1


def _world_size(tr) -> Optional[int]:
    info = tr.meta.get("distributedInfo")
    ws = info.get("world_size") if isinstance(info, dict) else None
    return ws if isinstance(ws, int) and not isinstance(ws, bool) else None


NON_FINITE_NOTE = "{n} non-finite number(s) (NaN or Infinity, from the trace's values) shown as null"


def finite(obj: Any) -> tuple[Any, int]:
    """obj (the analysis' dicts, lists and numbers) with every NaN / Infinity replaced by None,
    and how many were replaced: JSON has no non-finite numbers."""
    if isinstance(obj, (float, np.floating)):
        return (obj, 0) if np.isfinite(obj) else (None, 1)
    if isinstance(obj, dict):
        out, n = {}, 0
        for k, v in obj.items():
            out[k], m = finite(v)
            n += m
        return out, n
    if isinstance(obj, (list, tuple)):
        items = [finite(v) for v in obj]
        return [v for v, _ in items], sum(m for _, m in items)
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    return obj, 0


def with_finite_numbers(result: dict[str, Any]) -> dict[str, Any]:
    """An analysis result (analyze_paths', perhaps with findings added) without non-finite numbers:
    each trace row's and the result's own are replaced by null, with a note where it happened."""
    rows = []
    for row in result.get("traces") or []:
        row, n = finite(row)
        if n:
            row["notes"] = list(row.get("notes") or []) + [NON_FINITE_NOTE.format(n=n)]
        rows.append(row)
    rest, n = finite({k: v for k, v in result.items() if k != "traces"})
    if n:
        rest["notes"] = list(rest.get("notes") or []) + [NON_FINITE_NOTE.format(n=n)]
    return {"traces": rows, **rest} if "traces" in result else rest


def analyze_paths(paths: list[Union[str, Path]], *, top_n: int = 10,
                  limits: Optional[Limits] = None) -> dict[str, Any]:
    """Analyse traces: one trace, the ranks of one job (analysed together: per-rank table,
    skew, overlap), or traces of separate runs (`"runs": "separate"`: each is its own
    analysis in `traces`, nothing is compared as ranks; `split_runs` gives them one by one).
    Each file loads within `limits` (default: sized to this machine's memory). numpy's warnings
    about a trace's odd values (NaN, Infinity, empty selections) are silenced: the result has no
    non-finite numbers (null instead, with a note)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = _analyze_paths(paths, top_n, limits or Limits.default())
    return with_finite_numbers(result)


def _analyze_paths(paths: list[Union[str, Path]], top_n: int, limits: Limits) -> dict[str, Any]:
    files = expand_paths(list(paths))
    rows, evidence = [], []
    for j, f in enumerate(files):
        try:
            tr = load_trace(f, limits=limits)
            rank, how = D.rank_of(tr, j)
            evidence.append((how, _world_size(tr)))
            rows.append(analyze_trace(tr, top_n=top_n, rank=rank))
        except MemoryError:
            tr = None
            raise TraceError(f"{f}: analysing it ran out of memory, within the limits of {limits.events:,} events "
                             f"and {human(limits.trace_bytes)} of JSON (--max-events, --max-trace-bytes). Lower them "
                             "(README, 'Limits on untrusted traces'), or analyse it on a machine with more memory.") \
                from None
        del tr
    dev = next((r["device"] for r in rows if r["device"]["type"] == "cuda"), rows[0]["device"])
    if len(rows) > 1 and not _one_job(rows, evidence):
        note = (f"{len(rows)} traces of separate runs (no distinct rank in distributedInfo or the file names, or "
                "different world sizes): each is analysed on its own; none is compared with another as a rank")
        return {"traces": rows, "ranks": {}, "metrics": {}, "device_facts": device_facts(dev), "notes": [note],
                "runs": "separate"}
    result = {"traces": rows, "ranks": {}, "metrics": _aggregate(rows), "device_facts": device_facts(dev),
              "notes": []}
    if len(rows) > 1:
        ranks = D.ranks_summary(rows)
        metrics = result["metrics"]
        metrics["rank_count"] = ranks["rank_count"]
        metrics["rank_step_skew"] = _r(ranks["rank_step_skew"], 6)
        metrics["comm_overlap_fraction"] = _r(ranks["comm_overlap_fraction"], 6)
        result.update(ranks=ranks, runs="ranks")
    return result


def split_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trace of a separate-runs result as an analysis of its own (the shape analyze_paths
    gives for one trace)."""
    return [{"traces": [row], "ranks": {}, "metrics": dict(row["metrics"]), "device_facts": device_facts(row["device"]),
             "notes": []} for row in result.get("traces") or []]
