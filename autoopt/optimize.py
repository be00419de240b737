"""The optimize pipeline: baseline -> findings -> accepted transforms -> verified, measured
variants -> search -> final re-measurement -> report, plan and patch.

No printing here: progress goes through a callback, decisions about findings through
another (the CLI asks the user, or applies --yes / --accept / --reject).
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from autoopt import __version__
from autoopt.errors import Interrupted, UserError
from autoopt.measure import MeasureSettings, count_flops, measure, speedup
from autoopt.profile import ProfileSettings, new_run_dir, trace_session
from autoopt.runner import Session, is_oom
from autoopt.types import ExecConfig, Finding, Measurement, Variant, Workload
from autoopt.verify import RunRecord, compare, record_run

Progress = Callable[..., None]  # progress(phase: str, detail: str = "", **info)
Decide = Callable[[Finding, Any], bool]  # decide(finding, transform) -> accept?

# A variant must beat the current best by at least this much, or by the measured noise of
# the two measurements if that is larger, to be kept.
MIN_GAIN = 0.03


def _noop(*_a, **_k) -> None:
    pass


@dataclass
class OptimizeOptions:
    model_path: Optional[str]
    device: str = "auto"
    batch_size: Optional[int] = None
    seed: int = 0
    out_dir: Optional[str] = None
    reports_root: str = "reports"
    search: str = "greedy"  # greedy | exhaustive
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    trace: bool = True
    memory_budget_fraction: float = 0.9


@dataclass
class Candidate:
    code: str
    finding: Finding
    transform: Any
    params: dict


@dataclass
class Evaluated:
    variant: Variant
    cfg: ExecConfig
    measurement: Optional[Measurement]


def default_model_path() -> Path:
    here = Path(__file__).resolve().parent
    for p in (here / "examples" / "simplenet.py", here.parent / "examples" / "simplenet.py"):
        if p.exists():
            return p
    raise UserError("The bundled example examples/simplenet.py is missing from this installation; "
                    "reinstall autoopt or pass a model file: autoopt optimize path/to/model.py.")


def beyond_noise(best: Measurement, new: Measurement) -> tuple[bool, float, float]:
    ratio, _, _ = speedup(best, new)
    noise = max(MIN_GAIN, (best.step_time_ms.rel_spread + new.step_time_ms.rel_spread) / 2)
    return ratio > 1 + noise, ratio, noise


def collect_facts(workload: Workload, analysis: Optional[dict], m: Optional[Measurement]) -> dict[str, Any]:
    from autoopt.env import env_facts

    from autoopt.rules import facts_from_analysis

    facts: dict[str, Any] = facts_from_analysis(analysis) if analysis else {}
    # the live device is known better than the trace tells it
    facts.update(workload.caps.facts())
    facts.update(env_facts())
    facts.update(workload.facts)
    if m is not None:
        facts["metrics.step_time_ms"] = m.step_time_ms.median
        facts["metrics.step_time_rel_spread"] = m.step_time_ms.rel_spread
        facts["metrics.throughput_per_s"] = m.throughput_per_s
        facts["metrics.peak_memory_mb"] = m.peak_memory_mb
        facts["metrics.mfu"] = m.mfu
        total = workload.caps.total_memory_mb
        if total and m.peak_memory_mb is not None:
            facts["metrics.memory_fraction"] = m.peak_memory_mb / total
    return facts


class Optimizer:
    """One optimize run. `run()` returns the report dict (also written as report.json)."""

    def __init__(self, opts: OptimizeOptions, decide: Decide, progress: Progress = _noop):
        self.opts = opts
        self.decide = decide
        self.progress = progress
        self.variants: list[Variant] = []
        self.findings: list[Finding] = []
        self.accepted: dict[str, bool] = {}
        self.batch_table: Optional[list[dict]] = None
        self.analysis: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.search_started: Optional[float] = None
        self.variants_tried = 0
        self.final: Optional[dict] = None
        self.kept_steps: list[tuple[Candidate, dict]] = []  # in the order they were adopted
        self.patch_text = ""
        self.plan: dict = {}
        self.notes: list[str] = []
        self.interrupted = False

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from autoopt.env import detect_capabilities
        from autoopt.load import build_workload, load_model_file

        path = self.opts.model_path or str(default_model_path())
        self.progress("load", f"loading {path}")
        self.spec = load_model_file(path)
        self.caps = detect_capabilities(self.opts.device)
        self.workload = build_workload(self.spec, self.caps, batch_size=self.opts.batch_size, seed=self.opts.seed)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if self.opts.out_dir:
            out = Path(self.opts.out_dir)
        else:
            out = Path(self.opts.reports_root) / f"{self.spec.name}-{stamp}"
            i = 2
            while out.exists():
                out = Path(self.opts.reports_root) / f"{self.spec.name}-{stamp}-{i}"
                i += 1
        out.mkdir(parents=True, exist_ok=True)
        self.out = out.resolve()
        self.tb = self.out / "tb"
        self.tb.mkdir(exist_ok=True)
        self.base_cfg = self.workload.base_config().with_(
            grad_accum_steps=int(getattr(self.spec.module, "GRAD_ACCUM_STEPS", 1) or 1)
        )

    # ------------------------------------------------------------------ one configuration
    def _run_config(
        self, name: str, cfg: ExecConfig, *, reference: Optional[RunRecord], tolerance: float, trace: bool
    ) -> tuple[Optional[Measurement], Any, Optional[RunRecord], Optional[str], str]:
        """Build, verify (against reference), measure and trace one configuration.
        Returns (measurement, verification, record, logdir, failure_reason)."""
        self.progress("variant", f"{name}: building", variant=name)
        logdir = None
        try:
            with Session(self.workload, cfg) as s:
                rec = ver = None
                if reference is not None:
                    self.progress("verify", f"{name}: verifying numerics", variant=name)
                    rec = record_run(s)
                    ver = compare(reference, rec, tolerance)
                    if not ver.ok:
                        return None, ver, rec, None, ""
                self.progress("measure", f"{name}: measuring", variant=name)
                flops = self.flops_per_sample * s.samples_per_step if self.flops_per_sample else None
                m = measure(s, self.caps, self.opts.measure, flops_per_step=flops)
                if trace and self.opts.trace:
                    self.progress("profile", f"{name}: tracing", variant=name)
                    run = trace_session(s, new_run_dir(self.tb, name), self.opts.profile)
                    logdir = str(run.run_dir)
                return m, ver, rec, logdir, ""
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing transform is a value, not a crash
            kind = "out of memory" if is_oom(e) else type(e).__name__
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            return None, None, None, logdir, f"{kind}: {msg}" if msg else kind

    # ------------------------------------------------------------------ baseline
    def _baseline(self) -> None:
        from autoopt.analyze import analyze_paths

        cfg = self.base_cfg
        self.progress("baseline", "baseline: verifying and measuring")
        with Session(self.workload, cfg) as s:
            self.reference = record_run(s)
            if any(x != x or x in (float("inf"), float("-inf")) for x in self.reference.losses):
                raise UserError(
                    f"{self.spec.path}: the baseline itself produces inf/NaN losses "
                    f"({self.reference.losses}); fix the model file (learning rate, loss, data) before optimizing it."
                )
            flops = count_flops(s)
            self.flops_per_sample = flops / s.samples_per_step if flops else None
            m = measure(s, self.caps, self.opts.measure, flops_per_step=flops)
            logdir = None
            if self.opts.trace:
                self.progress("profile", "baseline: tracing")
                run = trace_session(s, new_run_dir(self.tb, "baseline"), self.opts.profile)
                logdir = str(run.run_dir)
        self.base_m = m
        v = Variant(
            name="baseline", codes=[], transforms=[], accepted=True, status="kept",
            reason="the model file as written", config=cfg, measurement=m, speedup=1.0, logdir=logdir,
        )
        self.variants.append(v)
        if logdir:
            self.progress("analyze", "analyzing the baseline trace")
            res = analyze_paths([logdir])
            self.analysis["baseline"] = res["traces"][0] if res.get("traces") else None
            self.baseline_analysis = res
        else:
            self.baseline_analysis = None

    # ------------------------------------------------------------------ findings
    def _findings(self) -> list[Candidate]:
        from autoopt.rules import evaluate, load_rules
        from autoopt.transforms import get_transform

        facts = collect_facts(self.workload, self.baseline_analysis, self.base_m)
        self.facts = facts
        self.findings = evaluate(load_rules(), facts)
        candidates: list[Candidate] = []
        seen: set[str] = set()
        for f in self.findings:
            t = get_transform(f.transform) if f.transform else None
            ok = self.decide(f, t)
            self.accepted[f.code] = ok
            if not t:
                continue
            if not ok:
                self.variants.append(Variant(
                    name=f.code, codes=[f.code], transforms=[{"name": t.name, "params": f.params}], accepted=False,
                    status="skipped", reason="not accepted",
                ))
                continue
            if t.name in seen:
                self.variants.append(Variant(
                    name=f.code, codes=[f.code], transforms=[{"name": t.name, "params": f.params}], accepted=True,
                    status="skipped", reason=f"transform {t.name} already proposed by another finding",
                ))
                continue
            reason = t.check(self.workload, self.caps, f.params)
            params = t.resolve_params(self.workload, self.caps, f.params) if reason is None else f.params
            if reason is not None:
                self.variants.append(Variant(
                    name=f.code, codes=[f.code], transforms=[{"name": t.name, "params": params}], accepted=True,
                    status="skipped", reason=reason,
                ))
                continue
            seen.add(t.name)
            candidates.append(Candidate(f.code, f, t, params))
        return candidates

    # ------------------------------------------------------------------ variants
    def _evaluate(self, combo: list[Candidate], base_cfg: ExecConfig, best: Measurement, *, trace: bool = True) -> Evaluated:
        cfg = base_cfg
        for c in combo:
            cfg = c.transform.apply(cfg, c.params, self.workload)
        name = "+".join(c.code for c in combo)
        tol = max(c.transform.tolerance for c in combo)
        self.variants_tried += 1
        m, ver, _rec, logdir, failure = self._run_config(name, cfg, reference=self.reference, tolerance=tol, trace=trace)
        v = Variant(
            name=name, codes=[c.code for c in combo],
            transforms=[{"name": c.transform.name, "params": c.params} for c in combo],
            accepted=True, status="failed", config=cfg, measurement=m, verification=ver, logdir=logdir,
        )
        if failure:
            v.reason = failure
        elif ver is not None and not ver.ok:
            v.status = "rejected"
            v.reason = ver.reason
        else:
            v.speedup = speedup(self.base_m, m)[0]
            better, ratio, noise = beyond_noise(best, m)
            v.status = "kept" if better else "rejected"
            v.reason = (
                f"verified; {ratio:.2f}x the current best (noise {noise:.0%})"
                if better else f"verified but not faster beyond noise: {ratio:.2f}x the current best (noise {noise:.0%})"
            )
        self.variants.append(v)
        return Evaluated(v, cfg, m)

    def _search(self, candidates: list[Candidate]) -> tuple[ExecConfig, Measurement, list[Candidate]]:
        self.search_started = time.perf_counter()
        regular = [c for c in candidates if c.transform.name not in ("batch_size",)]
        batch = [c for c in candidates if c.transform.name == "batch_size"]
        best_cfg, best_m, chosen = self.base_cfg, self.base_m, []
        # 1. every transform alone, against the baseline
        solo: list[tuple[Candidate, Evaluated]] = []
        for c in regular:
            ev = self._evaluate([c], self.base_cfg, self.base_m)
            solo.append((c, ev))
        usable = [(c, ev) for c, ev in solo if ev.measurement is not None]
        if self.opts.search == "exhaustive":
            results = [(ev.measurement, [c], ev.cfg) for c, ev in usable if ev.variant.status == "kept"]
            for r in range(2, len(usable) + 1):
                for combo in itertools.combinations([c for c, _ in usable], r):
                    ev = self._evaluate(list(combo), self.base_cfg, self.base_m)
                    if ev.variant.status == "kept":
                        results.append((ev.measurement, list(combo), ev.cfg))
            if results:
                best_m, chosen, best_cfg = max(results, key=lambda t: t[0].throughput_per_s)
        else:
            # 2. greedy: start from the best single transform, add the others in order of their
            # solo speedup, keeping each only when verified and faster beyond the noise.
            usable.sort(key=lambda t: -(t[1].variant.speedup or 0))
            for c, ev in usable:
                if not chosen:
                    if ev.variant.status == "kept":
                        best_cfg, best_m, chosen = ev.cfg, ev.measurement, [c]
                    continue
                trial = self._evaluate(chosen + [c], self.base_cfg, best_m)
                if trial.variant.status == "kept":
                    best_cfg, best_m, chosen = trial.cfg, trial.measurement, chosen + [c]
            if not chosen:
                # none helped alone; a pair can still help (channels_last pays off under AMP)
                pool = [c for c, ev in usable if ev.variant.status != "failed"]
                if len(pool) >= 2:
                    trial = self._evaluate(pool[:2], self.base_cfg, self.base_m)
                    if trial.variant.status == "kept":
                        best_cfg, best_m, chosen = trial.cfg, trial.measurement, pool[:2]
        for v in self.variants:
            if v.status == "kept" and v.name != "baseline" and v.codes != [c.code for c in chosen]:
                v.reason += "; superseded in the search"
        # 3. batch size last, on the best configuration found
        if batch:
            best_cfg, best_m, chosen = self._batch_search(batch[0], best_cfg, best_m, chosen)
        return best_cfg, best_m, chosen

    def _batch_search(self, c: Candidate, cfg: ExecConfig, best_m: Measurement, chosen: list[Candidate]):
        from autoopt.transforms.batch_size import search_batch_size

        budget = self.caps.total_memory_mb * self.opts.memory_budget_fraction if self.caps.total_memory_mb else None
        if budget is None:
            from autoopt.measure import cpu_memory_total_mb

            total = cpu_memory_total_mb()
            budget = total * self.opts.memory_budget_fraction if total else None

        def measure_cfg(trial_cfg: ExecConfig) -> Measurement:
            self.progress("batch", f"batch search: batch size {trial_cfg.batch_size}", batch_size=trial_cfg.batch_size)
            if trial_cfg.batch_size == cfg.batch_size:
                return best_m
            self.variants_tried += 1
            with Session(self.workload, trial_cfg) as s:
                flops = self.flops_per_sample * s.samples_per_step if self.flops_per_sample else None
                return measure(s, self.caps, self.opts.measure, flops_per_step=flops)

        result = search_batch_size(cfg, measure_cfg, memory_budget_mb=budget, noise=best_m.step_time_ms.rel_spread)
        self.batch_table = result.table
        chosen_bs = result.batch_size
        name = "+".join([x.code for x in chosen] + [c.code])
        params = dict(c.params, batch_size=chosen_bs)
        v = Variant(
            name=name, codes=[x.code for x in chosen] + [c.code],
            transforms=[{"name": x.transform.name, "params": x.params} for x in chosen]
            + [{"name": "batch_size", "params": params}],
            accepted=True, status="rejected",
        )
        if chosen_bs == cfg.batch_size:
            v.reason = f"no batch size beat {cfg.batch_size} on throughput beyond noise"
            self.variants.append(v)
            return cfg, best_m, chosen
        new_cfg = c.transform.apply(cfg, params, self.workload)
        m, ver, _rec, logdir, failure = self._run_config(name, new_cfg, reference=None, tolerance=0.0, trace=True)
        v.config, v.measurement, v.logdir = new_cfg, m, logdir
        if failure or m is None:
            v.status, v.reason = "failed", failure or "no measurement"
            self.variants.append(v)
            return cfg, best_m, chosen
        v.speedup = speedup(self.base_m, m)[0]
        better, ratio, noise = beyond_noise(best_m, m)
        caveat = (
            f"batch {cfg.batch_size} -> {chosen_bs}: changes training semantics — scale the learning rate "
            f"(linear rule: x{chosen_bs / cfg.batch_size:g}) and warm it up; numerics verified at batch {cfg.batch_size}"
            if self.workload.mode == "train" else f"batch {cfg.batch_size} -> {chosen_bs}: changes latency per request"
        )
        v.status = "kept" if better else "rejected"
        v.reason = (f"{ratio:.2f}x throughput of the current best (noise {noise:.0%}); " if better
                    else f"not faster beyond noise ({ratio:.2f}x); ") + caveat
        self.variants.append(v)
        c.params = params
        if better:
            return new_cfg, m, chosen + [c]
        return cfg, best_m, chosen

    # ------------------------------------------------------------------ final
    def _final(self, best_cfg: ExecConfig, chosen: list[Candidate]) -> None:
        from autoopt.analyze import analyze_paths

        if not chosen:
            self.final = {
                "codes": [], "transforms": [], "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0,
                "step_time_ms": self.base_m.step_time_ms.to_json(), "throughput_per_s": self.base_m.throughput_per_s,
                "peak_memory_mb": self.base_m.peak_memory_mb, "batch_size": self.base_cfg.batch_size,
                "note": "no transform was verified and faster than the baseline; the model file is best as written",
            }
            return
        # Re-measure baseline and final back to back, so the reported speedup is not an
        # artefact of the machine's load drifting during the search.
        self.progress("final", "final: re-measuring the baseline and the final configuration side by side")
        with Session(self.workload, self.base_cfg) as s:
            base_m = measure(s, self.caps, self.opts.measure,
                             flops_per_step=self.flops_per_sample * s.samples_per_step if self.flops_per_sample else None)
        m, _ver, _rec, logdir, failure = self._run_config("final", best_cfg, reference=None, tolerance=0.0, trace=True)
        if m is None:
            raise RuntimeError(f"the final configuration could not be re-measured: {failure}")
        mid, low, high = speedup(base_m, m)
        v = Variant(
            name="final", codes=[c.code for c in chosen],
            transforms=[{"name": c.transform.name, "params": c.params} for c in chosen],
            accepted=True, status="kept", reason="re-measured side by side with the baseline",
            config=best_cfg, measurement=m, speedup=mid, logdir=logdir,
        )
        self.variants.append(v)
        self.final = {
            "codes": v.codes, "transforms": v.transforms, "speedup": round(mid, 4),
            "speedup_low": round(low, 4), "speedup_high": round(high, 4),
            "step_time_ms": m.step_time_ms.to_json(), "throughput_per_s": round(m.throughput_per_s, 3),
            "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 2),
            "batch_size": m.batch_size, "mfu": m.mfu,
            "baseline_remeasured": base_m.to_json(),
        }
        if logdir:
            res = analyze_paths([logdir])
            self.analysis["final"] = res["traces"][0] if res.get("traces") else None

    def _patch_and_plan(self, chosen: list[Candidate]) -> None:
        from autoopt.patch import build_patch
        from autoopt.plan import Plan

        pairs = [(c.transform, c.params) for c in chosen]
        if pairs:
            res = build_patch(self.spec.path, pairs, self.workload)
            self.patch_text = res.diff
            for name, reason in res.skipped:
                self.notes.append(f"patch: {name} could not be written into the file: {reason}")
        self.plan = Plan.from_dict({
            "model": self.spec.name, "model_path": str(self.spec.path), "device": self.caps.device_type,
            "batch_size": self.final["batch_size"] if self.final else self.base_cfg.batch_size,
            "transforms": [{"name": c.transform.name, "params": c.params, "code": c.code} for c in chosen],
            "autoopt_version": __version__,
        }).to_dict()

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        import torch

        wl = getattr(self, "workload", None)
        base_m = getattr(self, "base_m", None)
        art = {
            "report_md": str(self.out / "report.md"), "report_html": str(self.out / "report.html"),
            "report_json": str(self.out / "report.json"), "plan": str(self.out / "plan.json"),
            "patch": str(self.out / "patch.diff"), "logdir": str(self.tb),
        }
        findings = []
        for f in self.findings:
            d = f.to_json()
            d["accepted"] = self.accepted.get(f.code, False)
            try:
                from autoopt.rules import get_rule

                d["doc"] = get_rule(f.code).doc
            except Exception:
                d["doc"] = ""
            findings.append(d)
        return {
            "model": self.spec.name, "model_path": str(self.spec.path),
            "device": self.caps.to_json(), "mode": wl.mode if wl else None,
            "batch_size": self.base_cfg.batch_size if wl else None, "seed": self.opts.seed,
            "created_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "autoopt_version": __version__, "torch_version": torch.__version__,
            "baseline": base_m.to_json() if base_m else None,
            "findings": findings,
            "variants": [v.to_json() for v in self.variants],
            "final": self.final,
            "search": {
                "strategy": self.opts.search, "variants_tried": self.variants_tried,
                "time_s": round(time.perf_counter() - self.search_started, 2) if self.search_started else 0.0,
            },
            "batch_search": self.batch_table,
            "analysis": self.analysis,
            "patch": self.patch_text,
            "plan": self.plan,
            "notes": self.notes,
            "interrupted": self.interrupted,
            "wall_time_s": round(time.perf_counter() - self.started, 2),
            "artifacts": art,
        }

    def write(self) -> dict:
        from autoopt import report as rep
        from autoopt.tbsummary import write_summaries

        r = self.report()
        (self.out / "plan.json").write_text(json.dumps(self.plan, indent=2) + "\n")
        (self.out / "patch.diff").write_text(self.patch_text)
        (self.out / "report.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
        self.progress("report", f"writing the report to {self.out}")
        rep.write_markdown(r, self.out / "report.md")
        rep.write_html(r, self.out / "report.html")
        try:
            write_summaries(r, self.tb)
        except Exception as e:  # the report stands without the TensorBoard summaries
            self.notes.append(f"TensorBoard summaries not written: {type(e).__name__}: {e}")
            r["notes"] = self.notes
            (self.out / "report.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
        return r

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self._setup()
        try:
            self._baseline()
            candidates = self._findings()
            best_cfg, _best_m, chosen = self._search(candidates)
            self._final(best_cfg, chosen)
            self._patch_and_plan(chosen)
        except KeyboardInterrupt:
            self.interrupted = True
            self.notes.append("interrupted (Ctrl-C): the report holds what was measured until then")
            if hasattr(self, "base_m"):
                self.write()
            raise Interrupted(str(self.out))
        return self.write()


def run_optimize(opts: OptimizeOptions, decide: Decide, progress: Progress = _noop) -> dict:
    return Optimizer(opts, decide, progress).run()
