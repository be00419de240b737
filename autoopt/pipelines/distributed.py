"""`autoopt profile|optimize MODEL --nproc N`: the parent of a DistributedDataParallel job.

The parent checks the arguments and the model file, launches the ranks
(autoopt.distributed.launch; each runs autoopt.distributed.worker), reads back what every
rank wrote, analyses every rank's trace together (per-rank table, straggler, overlap,
communication share: autoopt.analyze) and runs the rules through the one facts builder. For
optimize, rank 0's record holds the search's variants, decided side by side on every rank
exactly as in one process; the parent writes the report through the same writer
(autoopt.output.write).
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from autoopt import __version__
from autoopt.diagnosis.facts_builder import build_facts, diagnose
from autoopt.distributed.launch import (
    check_args,
    job_failure,
    launcher_command,
    per_rank_table,
    resolved_device,
    run_job,
)
from autoopt.errors import Interrupted
from autoopt.procs import deferred_signals, signal_name, signum_of
from autoopt.results import DistributedInfo, FinalResult, ProfileResult, Report, SearchSummary, Variant, finding_entry
from autoopt.settings import DistributedSettings, MeasureSettings, OptimizeSettings, ProfileSettings
from autoopt.types import Measurement

Progress = Callable[..., None]


def _noop(*_a, **_k) -> None:
    pass


def _launch(task: str, settings: OptimizeSettings, *, where: dict, model: str, keep: str,
            progress: Progress) -> tuple[list[dict], list[str]]:
    """Run the job; its per-rank records (every rank succeeded) and the launcher command."""
    d = settings.distributed
    with tempfile.TemporaryDirectory(prefix="autoopt-ddp-") as tmp:
        config = {"task": task, "out_dir": tmp, "settings": settings.to_dict(), **where}
        progress("distributed", f"launching {d.nproc} processes through torch.distributed.run")
        rc, recs, logs = run_job(config, nproc=d.nproc, extra=d.launcher_args, timeout_s=d.timeout_s,
                                 progress=progress)
        if rc != 0 or len(recs) < d.nproc or not all(r.get("ok") for r in recs):
            raise job_failure(recs, rc, logs, nproc=d.nproc, model=model, keep_dirs=[keep])
    return recs, launcher_command(d.nproc, d.launcher_args, "CONFIG.json")[1:]


def _analyze_ranks(run_dir: Path) -> dict[str, Any]:
    from autoopt.analyze import analyze_paths
    from autoopt.analyze.balance import rank_balance

    result = analyze_paths([str(run_dir)])
    result.setdefault("notes", [])
    result["rank_balance"] = rank_balance(result)
    return result


def _rank_findings(analysis: dict, rec0: dict, job: Optional[Measurement]):
    """The findings of a job: the ranks' analysis under rank 0's live facts (device, torch
    settings, workload) and the job's measurement."""
    total = (rec0.get("device") or {}).get("total_memory_mb")
    extra = None
    if job is not None and total and job.peak_memory_mb is not None:
        extra = {"metrics.memory_fraction": job.peak_memory_mb / total}
    facts = build_facts(analysis=analysis, env=rec0.get("facts") or {}, measurement=job, extra=extra)
    return diagnose(facts, analysis)


# ---------------------------------------------------------------------------- profile
def profile_distributed(
    model_path: str, *, nproc: int, device: str = "auto", batch_size: Optional[int] = None, steps: int = 3,
    logdir: Optional[str] = None, seed: int = 0, extra: Sequence[str] = (), with_stack: bool = False,
    measure_steps: int = 10, warmup_steps: int = 3, timeout_s: float = 900.0, collective_timeout_s: float = 300.0,
    progress: Progress = _noop,
) -> dict[str, Any]:
    """Profile a model file as an N-process DDP job; returns `autoopt profile --json`'s object
    (the analysis of every rank's trace, with "logdir", "findings", "model", "mode", "device",
    "nproc", "per_rank" and "measurement")."""
    from autoopt.run.trace import new_run_dir
    from autoopt.workload.load import load_model_file

    check_args(model_path, nproc, device, steps)
    spec = load_model_file(model_path)  # the contract's file-level errors, before any process starts
    settings = OptimizeSettings(
        model_path=str(spec.path), device=resolved_device(device), batch_size=batch_size, seed=seed,
        measure=MeasureSettings(warmup_steps=warmup_steps, warmup_min_s=0.0, min_steps=measure_steps,
                                max_steps=measure_steps, min_time_s=0.0, max_time_s=1e9),
        profile=ProfileSettings(active=steps, with_stack=with_stack),
        distributed=DistributedSettings(nproc=nproc, launcher_args=list(extra), timeout_s=timeout_s,
                                        collective_timeout_s=collective_timeout_s))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = new_run_dir(Path(logdir) if logdir else Path("reports") / "profiles",
                          f"{spec.name}-ddp{nproc}-{stamp}").resolve()
    recs, launcher = _launch("profile", settings, where={"run_dir": str(run_dir)}, model=str(spec.path),
                             keep=str(run_dir), progress=progress)
    progress("analyze", f"analyzing {nproc} rank traces")
    result = _analyze_ranks(run_dir)
    rec0 = recs[0]
    job = Measurement.from_json(rec0["job_measurement"]) if rec0.get("job_measurement") else None
    findings = _rank_findings(result, rec0, job)
    for r in recs:
        result["notes"] += [n for n in r.get("notes", []) if n not in result["notes"]]
    extra_keys = {"nproc": nproc, "world_size": rec0.get("world_size"), "backend": rec0.get("backend"),
                  "batch_size": rec0.get("batch_size"),
                  "global_batch_size": sum(r.get("batch_size") or 0 for r in recs), "ddp": rec0.get("ddp"),
                  "per_rank": per_rank_table(result, recs), "launcher": launcher}
    return ProfileResult(result, spec.name, str(spec.path), rec0.get("mode"), rec0.get("device"),
                         rec0.get("job_measurement"), str(run_dir), findings, extra_keys).to_json()


# ---------------------------------------------------------------------------- optimize
def optimize_distributed(settings: OptimizeSettings, *, progress: Progress = _noop) -> dict[str, Any]:
    """Measure the model file's DDP baseline and the DDP transforms (bucket size,
    gradient_as_bucket_view, static_graph; no_sync when the file accumulates gradients or
    the user accepts it) with the search engine on every rank — verified against the
    baseline on every rank, kept only when faster side by side — re-measure baseline and
    final in alternating rounds, and write the report directory (report.json/.md/.html,
    plan.json, patch.diff, tb/<variant>/ with one trace per rank). Returns the report.
    Interrupted at any moment (Ctrl-C, SIGTERM, SIGHUP), the report of what came back is
    written (interrupted: true) and Interrupted raised."""
    job: dict[str, Any] = {"started": time.perf_counter()}
    try:
        return _optimize_job(settings, job, progress)
    except KeyboardInterrupt as e:
        raise _interrupted_job(settings, job, signum_of(e)) from None


def _optimize_job(settings: OptimizeSettings, job: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """optimize_distributed's stages; `job` keeps what each one got (for an interrupt)."""
    from autoopt.pipelines.optimize import budget_line, default_model_path, new_report_dir
    from autoopt.workload.load import load_model_file

    d = settings.distributed
    settings.model_path = os.path.abspath(settings.model_path or str(default_model_path()))  # a symlink stays one
    check_args(settings.model_path, d.nproc, settings.device, 1)
    job["spec"] = spec = load_model_file(settings.model_path)
    settings.device = resolved_device(settings.device)
    started, started_at = time.perf_counter(), time.time()  # the ranks count the time budget from here
    progress("budget", budget_line(settings.search.time_budget_s))
    job["out"] = out = new_report_dir(settings.reports_root, f"{spec.name}-ddp{d.nproc}", settings.out_dir,
                                      settings.force)
    tb = out / "tb"
    tb.mkdir(exist_ok=True)
    job["recs"], launcher = _launch("optimize", settings, where={"tb_dir": str(tb), "started_at": started_at},
                                    model=str(spec.path), keep=str(tb), progress=progress)
    progress("analyze", "analyzing the baseline's rank traces")
    analysis = _analyze_ranks(tb / "baseline")
    job["report"] = _report(settings, spec, job["recs"], analysis, launcher, out, started)
    from autoopt.output.write import write_report

    with deferred_signals():  # a signal meanwhile: the report is finished, then rewritten as interrupted
        return write_report(job["report"], out, progress=progress)


def _interrupted_job(settings: OptimizeSettings, job: dict[str, Any], signum: int):
    """Write what an interrupted job got to its report directory; the Interrupted to raise."""
    from autoopt.output.write import write_report
    from autoopt.pipelines.optimize import PHASES, new_report_dir, write_unmeasured

    with deferred_signals(reraise=False):
        path = Path(settings.model_path or "model.py")
        spec = job.get("spec")
        name = spec.name if spec is not None else path.stem
        out = job.get("out") or new_report_dir(settings.reports_root, f"{name}-ddp{settings.distributed.nproc}",
                                               settings.out_dir, settings.force)
        report: Optional[Report] = job.get("report")
        if report is None:  # the ranks hand their measurements back only when the job ends
            phase, where = "search", (
                f"during the {settings.distributed.nproc}-process job: the ranks report their measurements when it "
                f"ends, so none reached this report; the traces they wrote are in {out / 'tb'}")
            if not job.get("out"):
                phase, where = "load", PHASES["load"]
            elif job.get("recs"):
                phase, where = "diagnose", ("while analyzing the ranks' traces, after the job: run it again for the "
                                            f"report (the traces are in {out / 'tb'})")
            return write_unmeasured(settings, out, model=name, model_path=str(spec.path if spec else path),
                                    signum=signum, not_measured=["baseline", "every variant", "final"], note=where,
                                    started=job["started"], phase=phase)
        measured = [v.name for v in report.variants if v.measurement is not None]
        report.interrupted = True
        report.interruption = {"signal": signal_name(signum), "phase": "report", "measured": measured,
                               "not_measured": []}
        report.notes.append(f"interrupted by {signal_name(signum)} {PHASES['report']}: measured {', '.join(measured)}")
        write_report(report, out)
        return Interrupted(str(out), signum)


def _report(settings: OptimizeSettings, spec, recs: list[dict], analysis: dict, launcher: list[str], out: Path,
            started: float) -> Report:
    import torch

    rec0 = recs[0]
    base = Measurement.from_json(rec0["baseline"])
    findings = _rank_findings(analysis, rec0, base)
    variants = [Variant.from_json(v) for v in rec0.get("variants", [])]
    final_json = rec0["final"]
    final = FinalResult.from_json(final_json, Measurement.from_json(final_json["measurement"]))
    patch = rec0.get("patch") or {"diff": "", "skipped": [], "snippet": ""}
    notes = list(analysis.get("notes", []))
    for r in recs:
        notes += [n for n in r.get("notes", []) if n not in notes]
    notes += [f"patch: {s['name']} could not be written into the file: {s['reason']}" for s in patch["skipped"]]
    if patch.get("check") and not patch["check"]["ok"]:
        notes.append(f"patch: none written: the patched model file failed its check: {patch['check']['reason']}")
    elif patch["diff"] and settings.model_path and Path(settings.model_path).is_symlink():
        from autoopt.pipelines.optimize import symlink_note

        notes.append(symlink_note(Path(settings.model_path), spec.path))
    notes += rec0.get("search_notes") or []
    if spec.evaluate is not None:
        notes.append("accuracy: the model file's evaluate(model) is not run in a distributed job (--nproc); run "
                     "without --nproc to compare its metrics between the baseline and the variants")
    plan = {"plan_version": 1, "autoopt_version": __version__, "model": spec.name, "model_path": str(spec.path),
            "device": (rec0.get("device") or {}).get("type", settings.device), "mode": rec0.get("mode"),
            "baseline_batch_size": rec0.get("batch_size"), "batch_size": final.measurement.batch_size,
            "transforms": [],  # single-process transforms (none here); the DDP part follows
            "codes": [], "speedup": round(final.speedup, 4),
            "ddp": {"nproc": settings.distributed.nproc, "backend": rec0.get("backend"), "settings": final.ddp,
                    "transforms": rec0.get("chosen") or [], "snippet": patch["snippet"]}}
    search = rec0.get("search") or {}
    art = {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
           "report_json": str(out / "report.json"), "plan": str(out / "plan.json"), "patch": str(out / "patch.diff"),
           "logdir": str(out / "tb")}
    return Report(
        model=spec.name, model_path=str(spec.path), device=rec0.get("device") or {}, mode=rec0.get("mode"),
        batch_size=rec0.get("batch_size"), seed=settings.seed,
        created_at=_dt.datetime.now().isoformat(timespec="seconds"), autoopt_version=__version__,
        torch_version=torch.__version__, baseline=base,
        findings=[finding_entry(f, accepted=False) for f in findings], variants=variants, final=final,
        search=SearchSummary.from_json(settings.search.strategy, search),
        artifacts=art, analysis={"baseline": analysis.get("ranks"), "baseline_metrics": analysis.get("metrics")},
        patch=patch["diff"], patch_check=patch.get("check"), plan=plan, notes=notes,
        wall_time_s=time.perf_counter() - started,
        distributed=DistributedInfo(
            nproc=settings.distributed.nproc, world_size=rec0.get("world_size"), backend=rec0.get("backend"),
            global_batch_size=sum(r.get("batch_size") or 0 for r in recs),
            baseline_per_rank=rec0.get("baseline_per_rank") or [], per_rank=per_rank_table(analysis, recs),
            ddp_snippet=patch["snippet"], launcher=launcher))
