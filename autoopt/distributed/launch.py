"""Launching a model file as a DistributedDataParallel job, and what to say when it fails.

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
(`timeout_s`). The launcher and its ranks are one process group (autoopt.procs.spawn),
stopped on every way out: done, failed, timed out, Ctrl-C, SIGTERM, SIGHUP, autoopt's exit.

Several nodes: run the same command on every node (each with its `--node-rank`); each
node's parent writes its own run directory and analyses the ranks whose traces it sees
(all of them when the log directory is on a shared filesystem). The straggler analysis is
autoopt.analyze.balance; the pipelines are autoopt.pipelines.distributed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from autoopt.errors import UserError
from autoopt.procs import spawn, stop_group
from autoopt.types import Stats

Progress = Callable[..., None]

# launcher options that set up the rendezvous themselves (then no --standalone)
_RDZV_OPTIONS = ("--standalone", "--rdzv", "--master", "--nnodes", "--node-rank", "--node_rank")
_NPROC_OPTIONS = ("--nproc-per-node", "--nproc_per_node")
_GRACE_S = 15.0  # from SIGTERM to SIGKILL when the job is stopped


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
        from autoopt.env import available_cpus

        cpus = available_cpus()
        env["OMP_NUM_THREADS"] = str(max(1, cpus // max(1, nproc)) if device != "cuda" else 1)
    return env


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
        proc = spawn(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=_env(nproc, config.get("device", "auto")))
        try:
            rc = _wait(proc, nproc, timeout_s, progress)
        except TimeoutError:
            stop_group(proc, _GRACE_S)
            raise UserError(
                f"The distributed job ({nproc} processes) did not finish within {timeout_s:.0f} s and was "
                f"stopped. {_progress_text(read_records(out), nproc)} Fix: check that every rank can reach the "
                "rendezvous (launcher options), or give it more time (timeout_s); the launcher's output "
                f"is in {stderr_p}.") from None
        finally:  # every way out (done, failed, Ctrl-C, SIGTERM, SIGHUP, an error): no rank left running
            stop_group(proc, _GRACE_S)
    return rc, read_records(out), {"stdout": _tail(stdout_p), "stderr": _tail(stderr_p), "stderr_path": str(stderr_p)}


def _wait(proc: subprocess.Popen, nproc: int, timeout_s: float, progress: Progress) -> int:
    """The launcher's exit code; TimeoutError after timeout_s."""
    t0 = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            waited = time.monotonic() - t0
            progress("distributed", f"{nproc} ranks running ({waited:.0f} s)")
            if waited > timeout_s:
                raise TimeoutError from None


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


def _keep_log(path: Optional[str], keep_dirs: Iterable[str]) -> Optional[str]:
    """The launcher's stderr copied into the first kept directory that exists (its path), else
    `path` itself."""
    if not path or not Path(path).is_file():
        return path
    for d in keep_dirs:
        if d and Path(d).is_dir():
            kept = Path(d) / "launcher.stderr"
            try:
                shutil.copyfile(path, kept)
            except OSError:
                return path
            return str(kept)
    return path


def job_failure(recs: list[dict], rc: int, logs: dict, *, nproc: int, model: str,
                keep_dirs: Iterable[str]) -> UserError:
    """The UserError for a failed job: the failing rank and its error, and what was kept (the
    launcher's output too: copied beside the traces, since the job's own folder is temporary)."""
    logs = dict(logs, stderr_path=_keep_log(logs.get("stderr_path"), keep_dirs))
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
        spread = Stats.from_json(m["step_time_ms"]).rel_spread if m.get("step_time_ms") else None
        rows.append({
            "rank": rec["rank"], "local_rank": rec.get("local_rank"), "host": rec.get("host"), "pid": rec.get("pid"),
            "device": (rec.get("device") or {}).get("name") or (rec.get("device") or {}).get("type"),
            "measured_step_time_ms": (m.get("step_time_ms") or {}).get("median"),
            "measured_step_rel_spread": spread,
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
def check_args(model_path: str, nproc: Any, device: str, steps: int) -> None:
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


def resolved_device(device: str) -> str:
    import torch

    dev = (device or "auto").lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev
