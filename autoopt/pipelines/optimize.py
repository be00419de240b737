"""The optimize pipeline: model file -> workload -> baseline (verified reference, trace,
measurement) -> trace analysis -> findings -> the accepted transforms -> the search
(autoopt.search: trials verified and measured side by side, the diagnosis followed) -> final
re-measurement beside the baseline -> report, plan and patch.

No printing here: progress goes through a callback, decisions about findings through another
(the CLI asks the user, or applies --yes / --accept / --reject).
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from autoopt import __version__
from autoopt.diagnosis.facts_builder import build_facts, diagnose
from autoopt.errors import Interrupted, UserError
from autoopt.pipelines.candidates import CandidateBuilder, Decide, check_try_names
from autoopt.procs import deferred_signals, signal_name, signum_of
from autoopt.results import FinalResult, Report, SearchSummary, Variant, finding_entry
from autoopt.run.measure import speedup
from autoopt.search.engine import BATCH, Search
from autoopt.search.fixed import set_fixed_batch
from autoopt.search.local import LocalEvaluator
from autoopt.search.strategies import strategy
from autoopt.search.trial import Candidate, Point
from autoopt.settings import OptimizeSettings
from autoopt.types import Status

Progress = Callable[..., None]

NO_CHANGE = "no transform was verified and faster than the baseline; the model file is best as written"

# what a run was doing, as an interrupted report says it
PHASES = {
    "load": "while loading the model file",
    "baseline": "while measuring and tracing the baseline",
    "diagnose": "while analyzing the baseline's trace and running the rules",
    "search": "during the search",
    "final": "during the final re-measurement beside the baseline",
    "patch": "while writing the patch and the plan",
    "report": "while writing the report",
}


def _noop(*_a, **_k) -> None:
    pass


def default_model_path() -> Path:
    here = Path(__file__).resolve().parent.parent
    for p in (here / "examples" / "simplenet.py", here.parent / "examples" / "simplenet.py"):
        if p.exists():
            return p
    raise UserError("The bundled example examples/simplenet.py is missing from this installation; "
                    "reinstall autoopt or pass a model file: autoopt optimize path/to/model.py.")


def new_report_dir(reports_root: str, name: str, out_dir: Optional[str], force: bool = False) -> Path:
    """--out, or a fresh reports/<name>-<timestamp> directory no other run has (created
    atomically). An --out that holds a report is refused, or with `force` cleared of it first
    (the output-directory rule: autoopt.validate)."""
    from autoopt.output.write import clear_report
    from autoopt.validate import check_dir, check_out

    if out_dir:
        out = check_out(out_dir, force)  # checked at startup too; again now, just before writing
        if force:
            clear_report(out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        root = check_dir("reports directory", reports_root)
        out = base = root / f"{name}-{stamp}"
        i = 2
        while True:
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:
                out = Path(f"{base}-{i}")
                i += 1
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def analyze_run(logdir: Optional[str]) -> Optional[dict[str, Any]]:
    """The trace analysis of one run directory (autoopt.analyze), or None without a trace."""
    if not logdir:
        return None
    from autoopt.analyze import analyze_paths

    return analyze_paths([logdir])


class OptimizeRun:
    """One optimize run. `run()` writes the report directory and returns report.json's object."""

    no_change = NO_CHANGE  # the final's note when nothing was kept

    def __init__(self, settings: OptimizeSettings, decide: Decide, progress: Progress = _noop):
        self.settings = settings
        self.decide = decide
        self.progress = progress
        self.started = time.perf_counter()
        self.variants: list[Variant] = []
        self.notes: list[str] = []
        self.analysis: dict[str, Any] = {}
        self.base: Optional[Point] = None
        self.final: Optional[FinalResult] = None
        self.search: Optional[Search] = None
        self.patch_text = ""
        self.patch_check: Optional[dict] = None
        self.plan: dict = {}
        # set by the stages; an interrupt may come before any of them
        self.phase = "load"
        self.spec = self.caps = self.workload = self.base_cfg = self.builder = None
        self.evaluator: Optional[LocalEvaluator] = None
        self.out: Optional[Path] = None
        self.candidates: Optional[list[Candidate]] = None

    # ------------------------------------------------------------------ stages
    def _setup(self) -> None:
        from autoopt.env import detect_capabilities
        from autoopt.workload.build import build_workload
        from autoopt.workload.load import load_model_file

        s = self.settings
        check_try_names(s.extra_transforms)  # before minutes of baseline work, not after
        path = s.model_path or str(default_model_path())
        self.given_path = Path(os.path.abspath(path))  # as given (a symlink stays one), before the file can chdir
        self.progress("load", f"loading {path}")
        self.spec = load_model_file(path)
        self.caps = detect_capabilities(s.device)
        self.workload = build_workload(self.spec, self.caps, batch_size=s.batch_size, seed=s.seed)
        if self.caps.device_type == "cpu":  # other work on the cores, measured while this process is idle
            from autoopt.env import cpu_busy_other
            from autoopt.workload.inspect import note_cpu_load

            note_cpu_load(self.workload, cpu_busy_other())
        self._make_out()
        self.base_cfg = self.workload.base_config().with_(
            grad_accum_steps=int(getattr(self.spec.module, "GRAD_ACCUM_STEPS", 1) or 1))
        self.evaluator = LocalEvaluator(self.workload, self.caps, measure_settings=s.measure,
                                        profile_settings=s.profile, search_settings=s.search,
                                        tb_dir=self.tb if s.trace else None, progress=self.progress)
        self.builder = CandidateBuilder(self.workload, self.caps, self.decide, self.variants)
        self.progress("budget", budget_line(s.search.time_budget_s))

    def _baseline(self) -> None:
        self.base = self.evaluator.baseline(self.base_cfg)
        self.notes += self.evaluator.notes
        self.variants.append(Variant(name="baseline", codes=[], transforms=[], accepted=True, status=Status.KEPT,
                                     reason="the model file as written", config=self.base_cfg,
                                     measurement=self.base.measurement, speedup=1.0, logdir=self.base.logdir,
                                     accuracy=self.evaluator.baseline_accuracy()))
        if self.base.logdir:
            self.progress("analyze", "analyzing the baseline trace")
        self.baseline_analysis = analyze_run(self.base.logdir)
        self.analysis["baseline"] = _first_trace(self.baseline_analysis)

    def _diagnose(self, point: Point, analysis: Optional[dict]) -> list:
        # gradient health is the baseline's (its verification steps): judged once, on the baseline
        health = self.evaluator.health if point is self.base else None
        facts = build_facts(analysis=analysis, device=self.caps, live=True, workload=self.workload.facts,
                            config=point.config, measurement=point.measurement, health=health)
        return diagnose(facts, analysis)

    def _candidates(self) -> list[Candidate]:
        found = self._diagnose(self.base, self.baseline_analysis)
        candidates = self.builder.from_findings(found)
        return self.builder.from_try(self.settings.extra_transforms, candidates)

    def rediagnose(self, best: Point) -> list[Candidate]:
        """The rules on the best configuration's trace: the candidates of findings not seen
        before (the diagnosis follows the search)."""
        if best is self.base or not best.logdir:
            return []
        self.progress("analyze", f"re-running the rules on the trace of {best.label}")
        found = self._diagnose(best, analyze_run(best.logdir))
        new = [f for f in found if f.code not in self.builder.accepted]
        for f in new:
            self.notes.append(f"{f.code} fired on the trace of {best.label} (not on the baseline's): {f.message}")
        return self.builder.from_findings(new)

    def _search(self, candidates: list[Candidate]) -> Point:
        self.search = Search(self.evaluator, self.settings.search, progress=self.progress,
                             rediagnose=self.rediagnose, variants=self.variants, run_started=self.started)
        return self.search.run(strategy(self.settings.search.strategy), candidates, self.base)

    def _final(self, best: Point) -> None:
        base_m = self.base.measurement
        if not best.chosen:
            self.final = set_fixed_batch(FinalResult([], [], 1.0, 1.0, 1.0, base_m, note=self.no_change,
                                                     accuracy=self.evaluator.baseline_accuracy()),
                                         [], self.variants, self.base_cfg.batch_size)
            return
        fm = self.evaluator.final(self.base_cfg, best)
        accuracy = self._final_accuracy(best)
        # each one's own peak memory comes from its separate measurement (on a CPU the
        # side-by-side process holds both models)
        fm.baseline.peak_memory_mb = base_m.peak_memory_mb
        fm.final.peak_memory_mb = best.measurement.peak_memory_mb
        mid, low, high = speedup(fm.baseline, fm.final)
        transforms = [c.transform_json() for c in best.chosen]
        self.variants.append(Variant(name="final", codes=best.codes, transforms=transforms, accepted=True,
                                     status=Status.KEPT, reason="re-measured side by side with the baseline",
                                     config=best.config, measurement=fm.final, speedup=mid, logdir=fm.logdir,
                                     safety=Search.safety(best.chosen),
                                     verification=self.search.verification_of(best), accuracy=accuracy))
        self.final = set_fixed_batch(FinalResult(best.codes, transforms, mid, low, high, fm.final,
                                                 baseline_remeasured=fm.baseline, accuracy=accuracy),
                                     best.chosen, self.variants, self.base_cfg.batch_size)
        if fm.logdir:
            self.analysis["final"] = _first_trace(analyze_run(fm.logdir))

    def _final_accuracy(self, best: Point):
        """The final configuration built afresh, trained like the baseline and evaluated beside
        it (the model file's evaluate()); None without one. Outside tolerance, a note says so."""
        if self.spec.evaluate is None:
            return None
        self.progress("final", "final: training the final configuration like the baseline and evaluating it")
        accuracy = self.evaluator.accuracy(best.config)
        if accuracy is not None and not accuracy.ok:
            self.notes.append(f"final: {accuracy.reason}; check the model's accuracy before applying the patch")
        return accuracy

    def _patch(self, best: Point) -> None:
        """patch.diff's text, checked (autoopt.transforms.patch), naming the model file as the user gave it."""
        from autoopt.transforms.patch import build_patch

        given = self.given_path.name  # a symlink's own name, not its target's
        res = build_patch(self.spec.path, [(c.transform, c.params) for c in best.chosen], self.workload, name=given)
        self.patch_text = res.diff
        self.patch_check = res.check_json()
        self.notes += [f"patch: {n} could not be written into the file: {r}" for n, r in res.skipped]
        if res.check_failure:
            self.notes.append(f"patch: none written: the patched model file failed its check: {res.check_failure}")
        elif res.diff and self.given_path.is_symlink():
            self.notes.append(symlink_note(self.given_path, self.spec.path))

    def _patch_and_plan(self, best: Point) -> None:
        from autoopt.plan import Plan

        if best.chosen:
            self._patch(best)
        self.plan = Plan.from_dict({
            "model": self.spec.name, "model_path": str(self.spec.path), "device": self.caps.device_type,
            "mode": self.workload.mode, "baseline_batch_size": self.base_cfg.batch_size,
            "batch_size": self.final.measurement.batch_size if self.final else self.base_cfg.batch_size,
            "transforms": [dict(c.transform_json(), code=c.code) for c in best.chosen],
            "speedup": round(self.final.speedup, 4) if self.final else None,
            "autoopt_version": __version__,
        }).to_dict()

    def _model_path(self) -> Path:
        if self.spec is not None:
            return Path(self.spec.path)
        return Path(self.settings.model_path or default_model_path())

    def _make_out(self) -> None:
        """The report directory and its tb/ (named after the model file, loaded or not)."""
        name = self.spec.name if self.spec is not None else self._model_path().stem
        self.out = new_report_dir(self.settings.reports_root, name, self.settings.out_dir,
                                  self.settings.force)
        self.tb = self.out / "tb"
        self.tb.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ the report
    def report(self, interrupted: bool = False, interruption: Optional[dict] = None) -> Report:
        """The report of what was done so far (an interrupt may come at any stage)."""
        import torch

        from autoopt.diagnosis.rules import load_rules

        docs = {r.code: r.doc for r in load_rules()}
        b = self.builder
        search = self.search
        return Report(
            model=self._model_path().stem if self.spec is None else self.spec.name,
            model_path=str(self._model_path()), device=self.caps.to_json() if self.caps else {},
            mode=self.workload.mode if self.workload else None,
            batch_size=self.base_cfg.batch_size if self.base_cfg else self.settings.batch_size,
            seed=self.settings.seed,
            created_at=_dt.datetime.now().isoformat(timespec="seconds"), autoopt_version=__version__,
            torch_version=torch.__version__, baseline=self.base.measurement if self.base else None,
            findings=[finding_entry(f, accepted=b.accepted.get(f.code, False), doc=docs.get(f.code, ""))
                      for f in (b.findings if b else [])],
            variants=self.variants, final=self.final,
            search=search.summary() if search else SearchSummary(
                self.settings.search.strategy, 0, 0.0, time_budget_s=self.settings.search.time_budget_s),
            artifacts=self.artifacts(), batch_search=self._batch_table(), analysis=self.analysis,
            patch=self.patch_text, patch_check=self.patch_check, plan=self.plan,
            notes=self.notes + (search.notes if search else []),
            interrupted=interrupted, wall_time_s=time.perf_counter() - self.started, interruption=interruption,
            health=self.evaluator.health if self.evaluator else None)

    def artifacts(self) -> dict[str, str]:
        return artifacts_of(self.out)

    def _batch_table(self) -> Optional[list[dict]]:
        """The batch search behind the final configuration (or the last one run)."""
        tables = self.search.batch_tables if self.search else {}
        if not tables:
            return None
        batch_codes = {f.code for f in self.builder.findings if f.transform == BATCH} if self.builder else set()
        final_codes = [c for c in (self.final.codes if self.final else []) if c not in batch_codes]
        return tables.get("+".join(final_codes), list(tables.values())[-1])

    def _write(self, interrupted: bool = False, interruption: Optional[dict] = None) -> dict:
        from autoopt.output.write import write_report

        return write_report(self.report(interrupted, interruption), self.out, progress=self.progress)

    # ------------------------------------------------------------------ interrupted
    def interruption(self, signum: int) -> dict[str, Any]:
        """What an interrupt left: the signal, the stage, the variants measured and what was
        planned or started but not measured."""
        measured = [v.name for v in self.variants if v.measurement is not None]
        missing = [] if self.base is not None else ["baseline"]
        if self.candidates is not None:
            tried = {code for v in self.variants for code in v.codes}
            missing += [v.name for v in self.variants if v.status == Status.SKIPPED and v.name not in missing]
            missing += [c.code for c in self.candidates if c.code not in tried]
        if self.final is None and self.phase in ("search", "final"):
            missing.append("final (the re-measurement beside the baseline)")
        return {"signal": signal_name(signum), "phase": self.phase, "measured": measured, "not_measured": missing}

    @staticmethod
    def interruption_note(i: dict[str, Any]) -> str:
        text = (f"interrupted by {i['signal']} {PHASES.get(i['phase'], i['phase'])}: measured "
                f"{', '.join(i['measured']) or 'nothing'}")
        if i["not_measured"]:
            text += f"; not measured: {', '.join(i['not_measured'])}"
        if i["phase"] in ("load", "baseline", "diagnose"):
            text += "; the rules had not yet proposed the variants to try"
        return text

    def _write_partial(self, info: dict[str, Any], note: str) -> None:
        """Write the report of a run cut short (interrupted: true, `info` as its interruption),
        with `note` added; when a renderer trips on the partial run, report.json alone. Called
        with further signals held back."""
        self.notes.append(note)
        if self.out is None:
            self._make_out()
        try:
            self._write(interrupted=True, interruption=info)
        except Exception as e:  # noqa: BLE001 - a partial run a renderer trips on: report.json alone
            from autoopt.output.write import write_json

            self.notes.append(f"the report could not be rendered: {type(e).__name__}: {e}")
            write_json(self.out / "report.json", {"model": self._model_path().stem, "interrupted": True,
                                                  "interruption": info, "notes": self.notes})

    def _stop(self, exc: BaseException) -> Interrupted:
        """Write what was done until the interrupt (further signals held back meanwhile) and
        return the Interrupted to raise."""
        with deferred_signals(reraise=False):
            signum = signum_of(exc)
            info = self.interruption(signum)
            self._write_partial(info, self.interruption_note(info))
        return Interrupted(str(self.out), signum, measured=self.base is not None)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Every stage; an interrupt (Ctrl-C, SIGTERM, SIGHUP) at any of them writes the
        report of what was done (interrupted: true) and raises Interrupted."""
        try:
            self._setup()
            self.phase = "baseline"
            self._baseline()
            self.phase = "diagnose"
            self.candidates = self._candidates()
            self.phase = "search"
            best = self._search(self.candidates)
            self.phase = "final"
            self._final(best)
            self.phase = "patch"
            self._patch_and_plan(best)
            self.phase = "report"
            with deferred_signals():  # a signal meanwhile: the report is finished, then rewritten as interrupted
                return self._write()
        except KeyboardInterrupt as e:
            raise self._stop(e) from None
        except Exception as e:
            if self.base is None or self.phase == "report":
                raise  # nothing measured yet, or the report itself failed: the error alone
            raise self._keep(e) from e

    def _keep(self, exc: Exception) -> Exception:
        """An error after the baseline (the model file failing at a later call, a bug): write
        what was measured before it (interrupted: true, with the error) and return the error to
        raise, its message naming that report."""
        from autoopt.workload.load import model_file_error

        user = exc if isinstance(exc, UserError) else model_file_error(exc)
        what = user.message if user is not None else f"{type(exc).__name__}: {exc}"
        with deferred_signals(reraise=False):
            info = self.interruption(0)
            info.update(signal=None, error=what)
            self._write_partial(info, f"stopped by an error {PHASES.get(self.phase, self.phase)}: {what}; what was "
                                "measured before it is in this report"
                                + ("" if self.final else ", the final configuration was not re-measured"))
        kept = f" What was measured before it is in {self.out / 'report.json'} (interrupted: true)."
        if user is not None:
            return type(user)(user.message + kept, cause=user.cause or exc)
        exc.add_note(kept.strip())
        return exc


def symlink_note(given: Path, target: Path) -> str:
    """How to apply a patch that names a symbolic link (the model path as the user gave it)."""
    return (f"patch: {given.name} is a symbolic link to {target}; apply patch.diff beside the link with "
            "`patch -p1 --follow-symlinks` (git apply does not write through links)")


def artifacts_of(out: Path) -> dict[str, str]:
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
            "report_json": str(out / "report.json"), "plan": str(out / "plan.json"), "patch": str(out / "patch.diff"),
            "logdir": str(out / "tb")}


def write_unmeasured(settings: OptimizeSettings, out: Path, *, model: str, model_path: str, signum: int,
                     not_measured: list[str], note: str, started: float, phase: str = "search") -> Interrupted:
    """An interrupted run whose measurements never reached this process (a distributed job's
    ranks hold theirs until the job ends): report.json and the rest say so (interrupted:
    true, nothing measured). Returns the Interrupted to raise."""
    import torch

    from autoopt.output.write import write_report

    with deferred_signals(reraise=False):
        info = {"signal": signal_name(signum), "phase": phase, "measured": [], "not_measured": not_measured}
        report = Report(
            model=model, model_path=model_path, device={}, mode=None, batch_size=settings.batch_size,
            seed=settings.seed, created_at=_dt.datetime.now().isoformat(timespec="seconds"),
            autoopt_version=__version__, torch_version=torch.__version__, baseline=None, findings=[], variants=[],
            final=None, search=SearchSummary(settings.search.strategy, 0, 0.0,
                                             time_budget_s=settings.search.time_budget_s),
            artifacts=artifacts_of(out), notes=[f"interrupted by {info['signal']} {note}"], interrupted=True,
            wall_time_s=time.perf_counter() - started, interruption=info)
        write_report(report, out)
    return Interrupted(str(out), signum, measured=False)


def budget_line(seconds: Optional[float]) -> str:
    if not seconds:
        return "time budget: none (--time-budget 0): every call is measured until it settles"
    return (f"time budget: {seconds:.0f} s for the baseline and the search (--time-budget); the final "
            "re-measurement comes after")


def _first_trace(analysis: Optional[dict]) -> Optional[dict]:
    traces = (analysis or {}).get("traces")
    return traces[0] if traces else None


def run_optimize(settings: OptimizeSettings, decide: Decide, progress: Progress = _noop) -> dict:
    return OptimizeRun(settings, decide, progress).run()


