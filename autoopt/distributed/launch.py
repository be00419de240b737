"""`autoopt profile|optimize MODEL --nproc N`: a model file as a DistributedDataParallel job.

The job runs on torch.distributed's own launcher (`python -m torch.distributed.run`, the
engine behind `torchrun`), so the launcher options in `extra` (`--nnodes`,
`--rdzv-backend`, `--rdzv-endpoint`, `--node-rank`, ...) take it to several nodes exactly
as they would a torchrun job. Without rendezvous options the job is `--standalone` (one
node, a free port). Each rank runs autoopt.distributed.worker: it builds the workload, wraps
the model in DDP (NCCL on GPUs, gloo on CPUs) and measures and traces its steps; every
rank's trace goes into ONE run directory, named after the rank. The parent analyses the
ranks together (autoopt.analyze: per-rank table, stragglers, overlap, communication
share) and runs the rules.

Failures: a rank that raises ends the job. Each rank writes what stopped it; the parent
names the rank whose error came first (not the ranks that only lost their peer) in a
UserError (exit 2), and keeps the traces the other ranks wrote. Every wait is bounded
(`timeout_s`); on a timeout or Ctrl-C the whole launcher process group is stopped.

Several nodes: run the same command on every node (each with its `--node-rank`); each
node's parent writes its own run directory and analyses the ranks whose traces it sees
(all of them when the log directory is on a shared filesystem).

Straggler analysis: in a synchronous job every rank's wall-clock step equals the slowest
rank's (the others wait in the all-reduce), so the step-time skew is ~0 even with a
straggler. What differs is the time a rank spends waiting in collectives: `rank_balance`
adds each rank's busy time (median over steps of step time minus communication) and, when
the busiest and the least busy rank are clearly apart (medians at least 10 % and 1 ms
apart, and the busier rank busier in two thirds of the steps), uses their skew as
`metrics.rank_step_skew` and names the straggler (the busiest rank, which waits least).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from autoopt.errors import Interrupted, UserError

Progress = Callable[..., None]

# launcher options that set up the rendezvous themselves (then no --standalone)
_RDZV_OPTIONS = ("--standalone", "--rdzv", "--master", "--nnodes", "--node-rank", "--node_rank")
_NPROC_OPTIONS = ("--nproc-per-node", "--nproc_per_node")


def _noop(*_a, **_k) -> None:
    pass


# ---------------------------------------------------------------------------- launching
def launcher_command(nproc: int, extra: Sequence[str], config_path: str) -> list[str]:
    """`python -m torch.distributed.run [options] --module autoopt.distributed.worker CONFIG`."""
    extra = list(extra or [])
    for a in extra:
        if a.split("=", 1)[0] in _NPROC_OPTIONS:
            raise UserError(f"launcher option {a} conflicts with --nproc {nproc}. Fix: give the number of processes "
                            "per node once, with --nproc.")
    opts = ["--nproc-per-node", str(nproc)]
    if not any(a.split("=", 1)[0].startswith(_RDZV_OPTIONS) for a in extra):
        opts.append("--standalone")
    if not any(a.split("=", 1)[0] in ("--max-restarts", "--max_restarts") for a in extra):
        opts += ["--max-restarts", "0"]
    return [sys.executable, "-m", "torch.distributed.run", *opts, *extra, "--module", "autoopt.distributed.worker",
            config_path]


def _env(nproc: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1; on CPU give each rank its share of the cores instead
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cpus // max(1, nproc)) if device != "cuda" else 1)
    return env


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the launcher's process group (the launcher and every rank), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=grace_s)


def _tail(path: Path, n: int = 2500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]


def run_job(config: dict, *, nproc: int, extra: Sequence[str], timeout_s: float,
            progress: Progress = _noop) -> tuple[int, list[dict], dict[str, str]]:
    """Launch the workers with `config` and wait (bounded). Returns (launcher exit code,
    per-rank records sorted by rank, {"stdout", "stderr"} tails of the launcher's output).
    config["out_dir"] must be a fresh directory; the records are read from it."""
    out = Path(config["out_dir"])
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(config, indent=1, default=str))
    cmd = launcher_command(nproc, extra, str(cfg_path))
    stdout_p, stderr_p = out / "launcher.stdout", out / "launcher.stderr"
    with open(stdout_p, "wb") as so, open(stderr_p, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                env=_env(nproc, config.get("device", "auto")), start_new_session=True)
        t0 = time.monotonic()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    waited = time.monotonic() - t0
                    progress("distributed", f"{nproc} ranks running ({waited:.0f} s)")
                    if waited > timeout_s:
                        _stop_group(proc)
                        recs = read_records(out)
                        raise UserError(
                            f"The distributed job ({nproc} processes) did not finish within {timeout_s:.0f} s and was "
                            f"stopped. {_progress_text(recs, nproc)} Fix: check that every rank can reach the "
                            "rendezvous (launcher options), or give it more time (timeout_s); the launcher's output "
                            f"is in {stderr_p}.")
        except KeyboardInterrupt:
            _stop_group(proc)
            raise
    return rc, read_records(out), {"stdout": _tail(stdout_p), "stderr": _tail(stderr_p), "stderr_path": str(stderr_p)}


def read_records(out: Path) -> list[dict]:
    recs = []
    for p in sorted(Path(out).glob("rank*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    recs.sort(key=lambda r: r.get("rank", 0))
    return recs


def _progress_text(recs: list[dict], nproc: int) -> str:
    done = [r["rank"] for r in recs]
    if not done:
        return "No rank reported back."
    return f"Ranks that reported back: {', '.join(map(str, done))}."


def root_cause(recs: list[dict]) -> Optional[dict]:
    """The record whose error came first among the errors that are not a consequence of
    another rank's failure (a collective that lost its peer, a SIGTERM from the launcher)."""
    failed = [r for r in recs if r.get("error")]
    if not failed:
        return None
    primary = [r for r in failed if r["error"].get("kind") not in ("peer", "terminated")]
    pool = primary or failed
    return min(pool, key=lambda r: r["error"].get("time") or 0.0)


def job_failure(recs: list[dict], rc: int, logs: dict, *, nproc: int, model: str, keep_dirs: Iterable[str]) -> UserError:
    """The UserError for a failed job: the failing rank and its error, and what was kept."""
    traces = sorted({t for r in recs for t in r.get("traces_on_disk") or []})
    for d in keep_dirs:
        if d and Path(d).is_dir():
            traces = sorted(set(traces) | {str(p) for p in Path(d).rglob("*.pt.trace.json*")})
    kept = (f" The traces the ranks wrote are kept: {', '.join(Path(t).name for t in traces)} in "
            f"{', '.join(sorted({str(Path(t).parent) for t in traces}))}." if traces else
            " No rank got as far as writing its trace.")
    rc_text = f"exit status {rc}" if rc >= 0 else f"signal {-rc}"
    cause = root_cause(recs)
    if cause is None:
        missing = sorted(set(range(nproc)) - {r["rank"] for r in recs}) if recs else list(range(nproc))
        tail = " ".join(logs.get("stderr", "").split())[-900:]
        return UserError(
            f"The distributed job for {model} failed (launcher {rc_text}) before "
            f"{'rank(s) ' + ', '.join(map(str, missing)) if missing else 'the ranks'} could report an error: a "
            f"launcher option may be wrong, or a rank was killed (out of host memory?). Launcher output: "
            f"...{tail}{kept} Fix: check the launcher options and the full output in {logs.get('stderr_path')}.")
    e = cause["error"]
    who = f"rank {cause['rank']} of {cause.get('world_size', nproc)} (host {cause.get('host')}, pid {cause.get('pid')})"
    others = [r["rank"] for r in recs if r is not cause and r.get("error")]
    also = (f" Rank(s) {', '.join(map(str, others))} stopped with it." if others else "")
    if e.get("kind") == "user":
        same = all(r.get("error", {}).get("message") == e["message"] for r in recs if r.get("error"))
        prefix = "every rank reported" if same and len(recs) > 1 else f"{who} reported"
        return UserError(f"The distributed job for {model} failed: {prefix}: {e['message']}{kept}")
    where = f" at {e['where']}" if e.get("where") else ""
    if e.get("kind") == "oom":
        fix = ("the model, its gradients and optimizer state do not fit one device with DDP (every rank holds a full "
               "replica): lower --batch-size, add activation checkpointing, or shard parameters, gradients and "
               "optimizer state across the ranks with FullyShardedDataParallel "
               "(torch.distributed.fsdp.fully_shard(model) per block, then on the model).")
    elif e.get("kind") == "peer":
        fix = ("the ranks lost contact with each other (a rank died or the network failed); check the launcher "
               f"output in {logs.get('stderr_path')}.")
    else:
        fix = "correct the error in the model file (run it with --nproc 1 or plain `autoopt profile` to reproduce)."
    return UserError(
        f"The distributed job for {model} failed: {who} raised {e.get('type')}: {e.get('message')}{where}.{also}"
        f"{kept} Fix: {fix}")


# ---------------------------------------------------------------------------- analysis
def rank_balance(result: dict) -> dict:
    """Per-rank busy time (step minus communication) and the straggler, from an
    analyze_paths result of several ranks. Updates result["ranks"] and, when two ranks'
    busy times are clearly apart, result["metrics"]["rank_step_skew"]; returns the
    balance summary. Torch-free."""
    ranks = result.get("ranks") or {}
    traces = result.get("traces") or []
    if len(traces) < 2 or not ranks:
        return {}
    rows = []
    for t in traces:
        per_step = t.get("breakdown_per_step_ms") or []
        busy_steps = [max(0.0, (s.get("total") or 0.0) - (s.get("communication") or 0.0)) for s in per_step]
        st = (t.get("step_time_ms") or {}).get("mean")
        comm = (t.get("breakdown_ms") or {}).get("communication") or 0.0
        rows.append({"rank": t["rank"], "busy_steps": busy_steps,
                     "busy_ms_per_step": statistics.median(busy_steps) if busy_steps else None,
                     "wait_ms_per_step": comm if st else None})
    rows = [r for r in rows if r["busy_ms_per_step"]]
    out: dict[str, Any] = {"busy_skew": None, "straggler_rank": ranks.get("straggler_rank"), "clearly_apart": False}
    for pr in ranks.get("per_rank", []):
        match = next((r for r in rows if r["rank"] == pr["rank"]), None)
        if match:
            pr["busy_ms_per_step"] = round(match["busy_ms_per_step"], 4)
            pr["collective_wait_ms_per_step"] = (round(match["wait_ms_per_step"], 4)
                                                 if match["wait_ms_per_step"] is not None else None)
    if len(rows) >= 2:
        slow = max(rows, key=lambda r: r["busy_ms_per_step"])
        fast = min(rows, key=lambda r: r["busy_ms_per_step"])
        skew = (slow["busy_ms_per_step"] - fast["busy_ms_per_step"]) / fast["busy_ms_per_step"]
        out.update({"busy_skew": round(skew, 6), "clearly_apart": _apart(slow["busy_steps"], fast["busy_steps"])})
        apart = out["clearly_apart"]
        if apart:
            out["straggler_rank"] = slow["rank"]
            # in a synchronous job the slowest rank is the busiest one, whatever the wall clock says
            ranks["slowest_rank_wall"], ranks["fastest_rank_wall"] = ranks.get("slowest_rank"), ranks.get("fastest_rank")
            ranks["slowest_rank"], ranks["fastest_rank"] = slow["rank"], fast["rank"]
            m = result.setdefault("metrics", {})
            wall = m.get("rank_step_skew") or 0.0
            if skew > wall:
                m["rank_step_skew"] = round(skew, 6)
                result.setdefault("notes", []).append(
                    f"rank_step_skew is the skew of busy time (step minus time in collectives): rank {slow['rank']} is "
                    f"busy {slow['busy_ms_per_step']:.2f} ms per step, rank {fast['rank']} "
                    f"{fast['busy_ms_per_step']:.2f} ms and waits for it; wall-clock step times of a synchronous job "
                    f"are equal (skew {wall:.1%})")
    ranks["rank_busy_skew"] = out["busy_skew"]
    if out["straggler_rank"] is not None:
        ranks["straggler_rank"] = out["straggler_rank"]
    return out


# A straggler must be busier than the fastest rank by this much (fraction of the fastest
# rank's busy time, and at least MIN_BUSY_GAP_MS) and in most steps, not in one noisy step.
MIN_BUSY_GAP = 0.1
MIN_BUSY_GAP_MS = 1.0


def _apart(slow: list[float], fast: list[float]) -> bool:
    """The slow rank's per-step busy times are clearly above the fast rank's: the medians
    differ by the minimum gap, and the slow rank is busier in at least two thirds of the
    steps (paired by step: the ranks' steps are synchronous)."""
    n = min(len(slow), len(fast))
    if n < 2:
        return False
    ms, mf = statistics.median(slow), statistics.median(fast)
    if ms - mf <= max(MIN_BUSY_GAP * mf, MIN_BUSY_GAP_MS):
        return False
    wins = sum(1 for a, b in zip(slow[:n], fast[:n]) if a > b)
    return wins >= math.ceil(2 * n / 3)


def _findings(result: dict, facts: dict) -> list:
    from autoopt.diagnosis.rules import evaluate, load_rules

    findings = evaluate(load_rules(), facts)
    strag = (result.get("ranks") or {}).get("straggler_rank")
    for f in findings:
        if f.code == "AO804" and strag is not None:
            f.message += f" (straggler: rank {strag}, which waits least in the collectives)"
            f.evidence["straggler_rank"] = strag
    return findings


def analysis_facts(result: dict) -> dict[str, Any]:
    """Rule facts from an analysis result (autoopt.diagnosis.rules.facts_from_analysis: registry names,
    source lines of syncs where the trace has stacks)."""
    try:
        from autoopt.diagnosis.rules import facts_from_analysis
    except ImportError:  # an older rule engine: prefix the metrics ourselves
        return {k if "." in k else f"metrics.{k}": v for k, v in (result.get("metrics") or {}).items()}
    return facts_from_analysis(result)


def _facts(result: dict, rec0: dict, job: Optional[dict]) -> dict[str, Any]:
    facts: dict[str, Any] = analysis_facts(result)
    facts.update(rec0.get("facts") or {})  # the live device, torch settings and workload of rank 0
    if job:
        st = job["step_time_ms"]
        facts["metrics.step_time_ms"] = st["median"]
        facts["metrics.step_time_rel_spread"] = (st["p75"] - st["p25"]) / st["median"] if st["median"] else None
        facts["metrics.throughput_per_s"] = job["throughput_per_s"]
        facts["metrics.peak_memory_mb"] = job["peak_memory_mb"]
        facts["metrics.mfu"] = job["mfu"]
        total = (rec0.get("device") or {}).get("total_memory_mb")
        if total and job["peak_memory_mb"] is not None:
            facts["metrics.memory_fraction"] = job["peak_memory_mb"] / total
    # a job-level skew computed by rank_balance wins over any per-rank value
    if (result.get("metrics") or {}).get("rank_step_skew") is not None:
        facts["metrics.rank_step_skew"] = result["metrics"]["rank_step_skew"]
    return facts


def per_rank_table(result: dict, recs: list[dict]) -> list[dict]:
    """One row per rank: where it ran, what it measured, and what its trace shows."""
    traced = {r["rank"]: r for r in (result.get("ranks") or {}).get("per_rank", [])}
    if not traced:
        for t in result.get("traces", []):
            traced[t["rank"]] = {"rank": t["rank"], "path": t["path"],
                                 "step_time_ms": (t.get("step_time_ms") or {}).get("mean")}
    rows = []
    for rec in recs:
        m = rec.get("measurement") or {}
        t = traced.get(rec["rank"], {})
        rows.append({
            "rank": rec["rank"], "local_rank": rec.get("local_rank"), "host": rec.get("host"), "pid": rec.get("pid"),
            "device": (rec.get("device") or {}).get("name") or (rec.get("device") or {}).get("type"),
            "measured_step_time_ms": (m.get("step_time_ms") or {}).get("median"),
            "measured_step_rel_spread": (((m["step_time_ms"]["p75"] - m["step_time_ms"]["p25"]) /
                                          m["step_time_ms"]["median"]) if m.get("step_time_ms") else None),
            "throughput_per_s": m.get("throughput_per_s"),
            "peak_memory_mb": m.get("peak_memory_mb"),
            "traced_step_time_ms": t.get("step_time_ms"),
            "busy_ms_per_step": t.get("busy_ms_per_step"),
            "collective_wait_ms_per_step": t.get("collective_wait_ms_per_step"),
            "communication_fraction": t.get("communication_fraction"),
            "comm_overlap_fraction": t.get("comm_overlap_fraction"),
            "gpu_utilization": t.get("gpu_utilization"),
            "trace": t.get("path"),
        })
    return rows


# ---------------------------------------------------------------------------- checks
def _check_args(model_path: str, nproc: Any, device: str, steps: int) -> None:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UserError(f"--nproc {nproc!r} is not a positive number of processes. Fix: pass e.g. --nproc 2.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps!r}).")
    dev = (device or "auto").lower()
    if dev not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is not auto, cpu or cuda for a distributed job (each rank uses the GPU "
                        "of its LOCAL_RANK). Fix: pass --device auto, cuda or cpu.")
    import torch

    if dev == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no GPU. Fix: use --device cpu (gloo) or run on a "
                        "machine with GPUs.")
    if (dev == "cuda" or (dev == "auto" and torch.cuda.is_available())) and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} GPU(s) torch "
                        "sees on this node (DDP runs one process per GPU). Fix: pass --nproc "
                        f"{torch.cuda.device_count()} or fewer, or --device cpu.")


def _resolved_device(device: str) -> str:
    import torch

    dev = (device or "auto").lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


# ---------------------------------------------------------------------------- profile
def profile_distributed(
    model_path: str,
    *,
    nproc: int,
    device: str = "auto",
    batch_size: Optional[int] = None,
    steps: int = 3,
    logdir: Optional[str] = None,
    seed: int = 0,
    extra: Sequence[str] = (),
    with_stack: bool = False,
    measure_steps: int = 10,
    warmup_steps: int = 3,
    timeout_s: float = 900.0,
    collective_timeout_s: float = 300.0,
    progress: Progress = _noop,
) -> dict[str, Any]:
    """Profile a model file as an N-process DDP job; returns `autoopt profile --json`'s object
    (the analysis of every rank's trace, with "logdir", "findings", "model", "mode",
    "device", "nproc", "per_rank" and "measurement")."""
    from autoopt.analyze import analyze_paths
    from autoopt.workload.load import load_model_file
    from autoopt.run.trace import new_run_dir

    _check_args(model_path, nproc, device, steps)
    spec = load_model_file(model_path)  # the contract's file-level errors, before any process starts
    dev = _resolved_device(device)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(logdir) if logdir else Path("reports") / "profiles"
    run_dir = new_run_dir(root, f"{spec.name}-ddp{nproc}-{stamp}").resolve()
    with tempfile.TemporaryDirectory(prefix="autoopt-ddp-") as tmp:
        config = {
            "task": "profile", "model_path": str(spec.path), "device": dev, "batch_size": batch_size, "seed": seed,
            "steps": steps, "run_dir": str(run_dir), "out_dir": tmp, "with_stack": with_stack,
            "measure_steps": measure_steps, "warmup_steps": warmup_steps,
            "collective_timeout_s": collective_timeout_s,
        }
        progress("distributed", f"launching {nproc} processes through torch.distributed.run")
        rc, recs, logs = run_job(config, nproc=nproc, extra=extra, timeout_s=timeout_s, progress=progress)
        if rc != 0 or len(recs) < nproc or not all(r.get("ok") for r in recs):
            raise job_failure(recs, rc, logs, nproc=nproc, model=str(spec.path), keep_dirs=[str(run_dir)])
        cmd = launcher_command(nproc, extra, "CONFIG.json")
    progress("analyze", f"analyzing {nproc} rank traces")
    result = analyze_paths([str(run_dir)])
    result.setdefault("notes", [])
    balance = rank_balance(result)
    rec0 = recs[0]
    job = rec0.get("job_measurement")
    facts = _facts(result, rec0, job)
    findings = _findings(result, facts)
    for r in recs:
        for n in r.get("notes", []):
            if n not in result["notes"]:
                result["notes"].append(n)
    result.update({
        "model": spec.name,
        "model_path": str(spec.path),
        "mode": rec0.get("mode"),
        "device": rec0.get("device"),
        "nproc": nproc,
        "world_size": rec0.get("world_size"),
        "backend": rec0.get("backend"),
        "batch_size": rec0.get("batch_size"),
        "global_batch_size": sum(r.get("batch_size") or 0 for r in recs),
        "ddp": rec0.get("ddp"),
        "measurement": job,
        "per_rank": per_rank_table(result, recs),
        "rank_balance": balance,
        "launcher": cmd[1:],
        "logdir": str(run_dir),
        "findings": [f.to_json() for f in findings],
    })
    return result


# ---------------------------------------------------------------------------- optimize
def optimize_distributed(
    model_path: Optional[str],
    *,
    nproc: int,
    device: str = "auto",
    batch_size: Optional[int] = None,
    seed: int = 0,
    out_dir: Optional[str] = None,
    reports_root: str = "reports",
    extra: Sequence[str] = (),
    steps: int = 3,
    transforms: Optional[Sequence[str]] = None,
    reject: Sequence[str] = (),
    accept_manual: bool = False,
    quick: bool = False,
    with_stack: bool = False,
    timeout_s: float = 1800.0,
    collective_timeout_s: float = 300.0,
    progress: Progress = _noop,
) -> dict[str, Any]:
    """Measure the model file's DDP baseline and the DDP transforms (bucket size,
    gradient_as_bucket_view, static_graph; no_sync when the file accumulates gradients or
    `accept_manual`) side by side in one N-process job, verify each against the baseline
    on every rank, combine the verified, faster ones greedily, re-measure baseline and final
    back to back, and write the report directory (report.json/.md/.html, plan.json,
    patch.diff, tb/baseline and tb/final with one trace per rank). Returns the report."""
    from autoopt import __version__
    from autoopt.analyze import analyze_paths
    from autoopt.workload.load import load_model_file
    from autoopt.pipelines.optimize import default_model_path
    from autoopt.transforms.ddp import DDP_TRANSFORMS

    path = model_path or str(default_model_path())
    _check_args(path, nproc, device, steps)
    unknown = [t for t in list(transforms or []) + list(reject or []) if t not in DDP_TRANSFORMS]
    if unknown:
        raise UserError(f"unknown DDP transform(s) {', '.join(unknown)}. Fix: use {', '.join(sorted(DDP_TRANSFORMS))}.")
    spec = load_model_file(path)
    dev = _resolved_device(device)
    started = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir:
        out = Path(out_dir)
    else:
        out = Path(reports_root) / f"{spec.name}-ddp{nproc}-{stamp}"
        i = 2
        while out.exists():
            out = Path(reports_root) / f"{spec.name}-ddp{nproc}-{stamp}-{i}"
            i += 1
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    tb = out / "tb"
    tb.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autoopt-ddp-") as tmp:
        config = {
            "task": "optimize", "model_path": str(spec.path), "device": dev, "batch_size": batch_size, "seed": seed,
            "steps": steps, "tb_dir": str(tb), "out_dir": tmp, "with_stack": with_stack,
            "measure_steps": 6 if quick else 20, "warmup_steps": 2 if quick else 5,
            "transforms": list(transforms) if transforms is not None else None, "reject": list(reject or []),
            "accept_manual": accept_manual, "collective_timeout_s": collective_timeout_s,
        }
        progress("distributed", f"launching {nproc} processes through torch.distributed.run")
        try:
            rc, recs, logs = run_job(config, nproc=nproc, extra=extra, timeout_s=timeout_s, progress=progress)
        except KeyboardInterrupt:
            raise Interrupted(str(out))
        if rc != 0 or len(recs) < nproc or not all(r.get("ok") for r in recs):
            raise job_failure(recs, rc, logs, nproc=nproc, model=str(spec.path), keep_dirs=[str(tb)])
        cmd = launcher_command(nproc, extra, "CONFIG.json")
    rec0 = recs[0]
    progress("analyze", "analyzing the baseline's rank traces")
    analysis = analyze_paths([str(tb / "baseline")])
    analysis.setdefault("notes", [])
    rank_balance(analysis)
    base = rec0["job_measurement"]
    findings = _findings(analysis, _facts(analysis, rec0, base))
    variants = [_variant_json(v) for v in rec0.get("variants", [])]
    final = rec0.get("final")
    chosen = rec0.get("chosen") or []
    patch = rec0.get("patch") or {"diff": "", "skipped": [], "snippet": ""}
    notes = list(analysis.get("notes", []))
    for r in recs:
        notes += [n for n in r.get("notes", []) if n not in notes]
    notes += [f"patch: {s['name']} could not be written into the file: {s['reason']}" for s in patch["skipped"]]
    if final is None:
        final = {"codes": [], "transforms": [], "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0,
                 "step_time_ms": base["step_time_ms"], "throughput_per_s": base["throughput_per_s"],
                 "peak_memory_mb": base["peak_memory_mb"], "batch_size": rec0.get("batch_size"),
                 "ddp": rec0.get("ddp"),
                 "note": "no DDP transform was verified and faster than the baseline; the DDP set-up is best as is"}
    plan = {
        "plan_version": 1, "autoopt_version": __version__, "model": spec.name, "model_path": str(spec.path),
        "device": (rec0.get("device") or {}).get("type", dev), "mode": rec0.get("mode"),
        "baseline_batch_size": rec0.get("batch_size"), "batch_size": final.get("batch_size"),
        "transforms": [],  # single-process transforms (none here); the DDP part follows
        "codes": [], "speedup": final.get("speedup"),
        "ddp": {"nproc": nproc, "backend": rec0.get("backend"), "settings": final.get("ddp"),
                "transforms": chosen, "snippet": patch["snippet"]},
    }
    import torch

    report = {
        "model": spec.name, "model_path": str(spec.path), "device": rec0.get("device"), "mode": rec0.get("mode"),
        "batch_size": rec0.get("batch_size"), "global_batch_size": sum(r.get("batch_size") or 0 for r in recs),
        "nproc": nproc, "world_size": rec0.get("world_size"), "backend": rec0.get("backend"), "seed": seed,
        "distributed": True,
        "created_at": _dt.datetime.now().isoformat(timespec="seconds"), "autoopt_version": __version__,
        "torch_version": torch.__version__,
        "baseline": base,
        "baseline_per_rank": rec0.get("baseline_per_rank"),
        "findings": [dict(f.to_json(), accepted=False) for f in findings],
        "variants": variants,
        "final": final,
        "search": {"strategy": "greedy", "variants_tried": sum(1 for v in variants if v["status"] != "skipped") - 1,
                   "time_s": round(time.perf_counter() - started, 2)},
        "analysis": {"baseline": analysis.get("ranks"), "baseline_metrics": analysis.get("metrics")},
        "per_rank": per_rank_table(analysis, recs),
        "patch": patch["diff"],
        "ddp_snippet": patch["snippet"],
        "plan": plan,
        "notes": notes,
        "launcher": cmd[1:],
        "interrupted": False,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "artifacts": {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
                      "report_json": str(out / "report.json"), "plan": str(out / "plan.json"),
                      "patch": str(out / "patch.diff"), "logdir": str(tb)},
    }
    _write_report(report, out)
    return report


def _variant_json(v: dict) -> dict:
    """A worker variant in report.json's variant shape (DESIGN: optimize keys)."""
    m = v.get("measurement") or {}
    return {
        "name": v["name"], "codes": v.get("codes", []), "transforms": v.get("transforms", []),
        "accepted": v.get("accepted", False), "status": v["status"], "reason": v.get("reason", ""),
        "step_time_ms": m.get("step_time_ms"), "batch_size": m.get("batch_size"),
        "throughput_per_s": m.get("throughput_per_s"), "speedup": v.get("speedup"),
        "max_abs_error": v.get("max_abs_error"), "max_rel_error": v.get("max_rel_error"),
        "tolerance": v.get("tolerance"), "peak_memory_mb": m.get("peak_memory_mb"), "mfu": m.get("mfu"),
        "compile_time_s": None, "logdir": None, "ddp": v.get("ddp"), "safety": v.get("safety"),
    }


def _write_report(report: dict, out: Path) -> None:
    from autoopt.output import report as rep

    (out / "plan.json").write_text(json.dumps(report["plan"], indent=2) + "\n")
    (out / "patch.diff").write_text(report["patch"])
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    try:
        rep.write_markdown(report, out / "report.md")
        rep.write_html(report, out / "report.html")
    except Exception as e:  # noqa: BLE001 - the JSON report stands; say why the others are plain
        report["notes"].append(f"report.md/html written in the plain distributed layout ({type(e).__name__}: {e})")
        (out / "report.md").write_text(_plain_markdown(report))
        (out / "report.html").write_text("<pre>" + _plain_markdown(report).replace("&", "&amp;").replace("<", "&lt;")
                                         + "</pre>\n")
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    with open(out / "report.md", "a") as f:
        f.write(_ddp_section(report))


def _ddp_section(report: dict) -> str:
    lines = ["", "## Distributed (DDP)", "",
             f"{report['nproc']} processes per node, backend {report.get('backend')}, world size "
             f"{report.get('world_size')}, per-rank batch {report.get('batch_size')} (global "
             f"{report.get('global_batch_size')}). Step times are the slowest rank's.", "",
             "| rank | host | measured step (ms) | busy (ms/step) | collective wait (ms/step) |",
             "|---|---|---|---|---|"]
    for r in report.get("per_rank", []):
        def f(x):
            return "-" if x is None else f"{x:.2f}"
        lines.append(f"| {r['rank']} | {r.get('host')} | {f(r.get('measured_step_time_ms'))} | "
                     f"{f(r.get('busy_ms_per_step'))} | {f(r.get('collective_wait_ms_per_step'))} |")
    if report.get("ddp_snippet"):
        lines += ["", "For your own torchrun script:", "", "```python", report["ddp_snippet"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _plain_markdown(report: dict) -> str:
    lines = [f"# autoopt: {report['model']} on {report['nproc']} processes ({report.get('backend')})", "",
             "| variant | status | step (ms) | speedup | max rel error | reason |", "|---|---|---|---|---|---|"]
    for v in report["variants"]:
        st = (v.get("step_time_ms") or {}).get("median")
        sp, err = v.get("speedup"), v.get("max_rel_error")
        lines.append(f"| {v['name']} | {v['status']} | {'-' if st is None else format(st, '.2f')} | "
                     f"{'-' if sp is None else format(sp, '.2f') + 'x'} | "
                     f"{'-' if err is None else format(err, '.2e')} | {v.get('reason', '')} |")
    return "\n".join(lines) + "\n"
