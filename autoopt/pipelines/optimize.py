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
from autoopt.run.measure import (MeasureSettings, Paired, count_flops, measure, measure_against, measure_side_by_side,
                             noise_between, speedup)
from autoopt.run.trace import ProfileSettings, new_run_dir, trace_session
from autoopt.run.session import Session, is_oom
from autoopt.types import ExecConfig, Finding, Measurement, Variant, Workload
from autoopt.run.verify import RunRecord, compare, record_run

Progress = Callable[..., None]  # progress(phase: str, detail: str = "", **info)
Decide = Callable[[Finding, Any], bool]  # decide(finding, transform) -> accept?

# Measured side by side with the current best, a variant is kept when it beats it beyond the
# pair's noise (autoopt.run.measure.Paired). Where the two could not be held together, it must
# beat the best's earlier measurement by at least this much, or by two standard errors of
# the two medians if that is larger (autoopt.run.measure.noise_between).
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
    # transforms to try whether or not a rule proposes them: [("amp", {"dtype": "float16"})]
    extra_transforms: list = field(default_factory=list)
    # torch.compile modes to measure (None: every mode the transform proposes for the device)
    compile_modes: Optional[tuple] = None


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
    speedup: Optional[float] = None  # over the baseline: the side-by-side ratio times the anchor's speedup
    noise: float = 0.0  # the noise of the ratio that decided


def default_model_path() -> Path:
    here = Path(__file__).resolve().parent.parent
    for p in (here / "examples" / "simplenet.py", here.parent / "examples" / "simplenet.py"):
        if p.exists():
            return p
    raise UserError("The bundled example examples/simplenet.py is missing from this installation; "
                    "reinstall autoopt or pass a model file: autoopt optimize path/to/model.py.")


def beyond_noise(best: Measurement, new: Measurement) -> tuple[bool, float, float]:
    ratio, _, _ = speedup(best, new)
    noise = noise_between(best, new, MIN_GAIN)
    return ratio > 1 + noise, ratio, noise


def collect_facts(workload: Workload, analysis: Optional[dict], m: Optional[Measurement]) -> dict[str, Any]:
    from autoopt.env import env_facts

    from autoopt.diagnosis.rules import facts_from_analysis

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
        self.batch_tables: dict[str, list[dict]] = {}  # per searched configuration (its codes)
        self.variant_times: list[float] = []
        self.analysis: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.search_started: Optional[float] = None
        self.search_time_s: Optional[float] = None  # the search alone: solo and combined variants, batch search
        self.variants_tried = 0
        self.final: Optional[dict] = None
        self.patch_text = ""
        self.plan: dict = {}
        self.notes: list[str] = []
        self.interrupted = False

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from autoopt.env import detect_capabilities
        from autoopt.workload.build import build_workload
        from autoopt.workload.load import load_model_file

        from autoopt.transforms import get_transform

        for name, _params in self.opts.extra_transforms:  # before minutes of baseline work, not after
            try:
                get_transform(name)
            except KeyError as e:
                raise UserError(f"--try {name}: {e.args[0]}") from None
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
        self, name: str, cfg: ExecConfig, *, reference: Optional[RunRecord], tolerance: float, trace: bool,
        anchor: Optional[ExecConfig] = None,
    ) -> tuple[Optional[Measurement], Any, Optional[RunRecord], Optional[str], str, Optional[Paired]]:
        """Build, verify (against reference), measure and trace one configuration; with an
        anchor (the configuration it must beat), measured beside it in alternating rounds.
        Returns (measurement, verification, record, logdir, failure_reason, the paired
        measurement with the anchor or None)."""
        eta = self._eta()
        self.progress("variant", f"{name}: building" + (f" (~{eta:.0f} s per variant so far)" if eta else ""),
                      variant=name, eta_s=eta)
        t_variant = time.perf_counter()
        logdir = None
        try:
            with Session(self.workload, cfg) as s:
                rec = ver = None
                if reference is not None:
                    self.progress("verify", f"{name}: verifying numerics", variant=name,
                                  compiling=bool(cfg.compile_mode or cfg.cuda_graphs))
                    rec = record_run(s)
                    ver = compare(reference, rec, tolerance)
                    if not ver.ok:
                        return None, ver, rec, None, "", None
                flops = self.flops_per_sample * s.samples_per_step if self.flops_per_sample else None
                pair = None
                if anchor is not None:
                    self.progress("measure", f"{name}: measuring, in alternating rounds with "
                                  f"{'the baseline' if anchor is self.base_cfg else 'the current best'}",
                                  variant=name, compiling=bool(cfg.compile_mode or cfg.cuda_graphs
                                                               or anchor.compile_mode or anchor.cuda_graphs))
                    pair = measure_against(s, lambda: Session(self.workload, anchor), self.caps,
                                           self.opts.measure, flops_per_step=flops, anchor_flops=self._flops(anchor))
                    m = pair.measurement
                else:
                    self.progress("measure", f"{name}: measuring", variant=name,
                                  compiling=rec is None and bool(cfg.compile_mode or cfg.cuda_graphs))
                    m = measure(s, self.caps, self.opts.measure, flops_per_step=flops)
                if trace and self.opts.trace:
                    self.progress("profile", f"{name}: tracing", variant=name)
                    run = trace_session(s, new_run_dir(self.tb, name), self.opts.profile)
                    logdir = str(run.run_dir)
                self.variant_times.append(time.perf_counter() - t_variant)
                return m, ver, rec, logdir, "", pair
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing transform is a value, not a crash
            kind = "out of memory" if is_oom(e) else type(e).__name__
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            return None, None, None, logdir, f"{kind}: {msg}" if msg else kind, None

    def _flops(self, cfg: ExecConfig) -> Optional[float]:
        """FLOPs of one step of cfg (from the baseline's count per sample)."""
        if not self.flops_per_sample:
            return None
        accum = max(1, cfg.grad_accum_steps or 1) if self.workload.mode == "train" else 1
        return self.flops_per_sample * cfg.batch_size * accum

    def _judge(self, pair: Optional[Paired], best: Measurement, m: Measurement) -> tuple[bool, float, float, str]:
        """Whether m beats the anchor beyond the noise: by the ratio of the rounds measured
        side by side when there are some, else against the anchor's earlier measurement.
        Returns (better, ratio, noise, how)."""
        if pair is not None and pair.anchor is not None:
            return pair.better, pair.ratio, pair.noise, f"side by side in {len(pair.round_ratios)} rounds"
        better, ratio, noise = beyond_noise(best, m)
        return better, ratio, noise, "measured apart (the two did not fit side by side)"

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
            # Trace before timing: once the profiler has run with CUDA activities, CUPTI stays
            # subscribed in the process and slows kernel launches (pytorch/pytorch#144455), so
            # every measurement, the baseline's included, is taken after the first trace.
            logdir = None
            if self.opts.trace:
                self.progress("profile", "baseline: tracing")
                run = trace_session(s, new_run_dir(self.tb, "baseline"), self.opts.profile)
                logdir = str(run.run_dir)
            flops = count_flops(s)
            self.flops_per_sample = flops / s.samples_per_step if flops else None
            m = measure(s, self.caps, self.opts.measure, flops_per_step=flops)
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
        from autoopt.diagnosis.rules import evaluate, load_rules
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
        for name, params in self.opts.extra_transforms:
            try:
                t = get_transform(name)
            except KeyError as e:
                raise UserError(f"--try {name}: {e.args[0]}") from None
            code = f"try-{name}"
            f = Finding(code=code, name=f"user-{name}", title=f"{name} requested with --try", message=(
                f"tried because it was asked for ({t.describe(params)}), not because a rule fired"),
                evidence={}, safety=t.safety_for(params), transform=name, params=dict(params))
            self.findings.append(f)
            self.accepted[code] = True
            if t.name in seen:
                candidates = [c for c in candidates if c.transform.name != t.name]
            reason = t.check(self.workload, self.caps, params)
            if reason is not None:
                self.variants.append(Variant(name=code, codes=[code], transforms=[{"name": name, "params": params}],
                                             accepted=True, status="skipped", reason=reason))
                continue
            seen.add(t.name)
            candidates.append(Candidate(code, f, t, t.resolve_params(self.workload, self.caps, params)))
        return candidates

    # ------------------------------------------------------------------ variants
    def _expected(self, combo: list[Candidate]) -> Optional[float]:
        """The rules' predicted speedup of a combination: the product of its findings' gains
        (None when any finding has no estimate)."""
        prod = 1.0
        for c in combo:
            if c.finding.expected_speedup is None:
                return None
            prod *= c.finding.expected_speedup
        return prod

    def _eta(self) -> Optional[float]:
        """Median wall time of the variants so far: what the next one will likely take."""
        if not self.variant_times:
            return None
        t = sorted(self.variant_times)
        return t[len(t) // 2]

    def _evaluate(self, combo: list[Candidate], base_cfg: ExecConfig, best: Measurement, *,
                  anchor: ExecConfig, anchor_speedup: float = 1.0,
                  trace: bool = True, name: Optional[str] = None) -> Evaluated:
        """One combination: applied to base_cfg, verified, measured beside `anchor` (the
        configuration it must beat, whose measurement is `best` and speedup over the baseline
        `anchor_speedup`) and traced."""
        from autoopt.transforms import apply_transforms

        cfg = apply_transforms(base_cfg, [(c.transform, c.params) for c in combo], self.workload)
        name = name or "+".join(c.code for c in combo)
        tol = max(c.transform.tolerance_for(c.params) for c in combo)
        self.variants_tried += 1
        m, ver, _rec, logdir, failure, pair = self._run_config(name, cfg, reference=self.reference, tolerance=tol,
                                                               trace=trace, anchor=anchor)
        v = Variant(
            name=name, codes=[c.code for c in combo],
            transforms=[{"name": c.transform.name, "params": c.params} for c in combo],
            accepted=True, status="failed", config=cfg, measurement=m, verification=ver, logdir=logdir,
            expected_speedup=self._expected(combo),
        )
        if failure:
            v.reason = failure
        elif ver is not None and not ver.ok:
            v.status = "rejected"
            v.reason = ver.reason
        else:
            better, ratio, noise, how = self._judge(pair, best, m)
            v.speedup = ratio * anchor_speedup
            v.status = "kept" if better else "rejected"
            what = "the baseline" if anchor is self.base_cfg else "the current best"
            v.reason = (f"verified; {ratio:.2f}x {what}, {how} (noise {noise:.0%})" if better
                        else f"verified but not faster beyond noise: {ratio:.2f}x {what}, {how} (noise {noise:.0%})")
            self.variants.append(v)
            return Evaluated(v, cfg, m, speedup=v.speedup, noise=noise)
        self.variants.append(v)
        return Evaluated(v, cfg, m)

    def _solo(self, c: Candidate) -> Evaluated:
        """A transform alone against the baseline; where it has several parameter sets worth
        measuring (torch.compile's modes), each is measured and the fastest verified one wins."""
        options = c.transform.candidates(self.workload, self.caps, c.params)
        if self.opts.compile_modes and c.transform.name == "compile":
            options = [p for p in options if p.get("mode", "default") in self.opts.compile_modes] or options[:1]
        if len(options) <= 1:
            return self._evaluate([c], self.base_cfg, self.base_m, anchor=self.base_cfg)
        results = []
        for params in options:
            trial = Candidate(c.code, c.finding, c.transform, params)
            label = f"{c.code}[{','.join(f'{v}' for v in params.values())}]"
            results.append((trial, self._evaluate([trial], self.base_cfg, self.base_m, anchor=self.base_cfg,
                                                  name=label)))
        good = [(t, ev) for t, ev in results if ev.speedup is not None]
        if not good:
            return results[0][1]
        trial, ev = max(good, key=lambda te: te[1].speedup)
        c.params = trial.params
        return ev

    # Pairs known to interact: one can pay off only beside the other (channels_last helps
    # more under autocast and inside a compiled graph), so a pair is tried even when one of
    # them alone was no faster.
    SYNERGY = {frozenset(p) for p in (("amp", "channels_last"), ("compile", "channels_last"), ("amp", "compile"))}

    def _search(self, candidates: list[Candidate]) -> tuple[ExecConfig, Measurement, list[Candidate]]:
        """Every keep decision compares two configurations measured side by side, in
        alternating rounds (autoopt.run.measure.measure_against): a transform alone against the
        baseline, a combination against the current best, a larger batch against the best
        batch so far. Two measurements taken apart differ by the machine's drift, 10-30 % on a
        shared machine, more than most gains worth keeping."""
        self.search_started = time.perf_counter()
        regular = [c for c in candidates if c.transform.name != "batch_size"]
        batch = [c for c in candidates if c.transform.name == "batch_size"]
        # most promising first: the rules' predicted gain (unknown counts as a small gain)
        regular.sort(key=lambda c: -(c.finding.expected_speedup or 1.01))
        best_cfg, best_m, chosen, best_speed = self.base_cfg, self.base_m, [], 1.0
        # 1. every transform alone, against the baseline
        solo = [(c, self._solo(c)) for c in regular]
        verified = [(c, ev) for c, ev in solo if ev.speedup is not None]
        if self.opts.search == "exhaustive":
            # every combination of the verified transforms, each measured against the baseline;
            # with a batch-size finding, every verified combination also gets its own batch
            # search (a combination can pay off only at a larger batch), not only those faster
            # at the baseline's batch
            verified_cfgs = [(ev, [c]) for c, ev in verified]
            pool = [c for c, _ in verified]
            for r in range(2, len(pool) + 1):
                for combo in itertools.combinations(pool, r):
                    ev = self._evaluate(list(combo), self.base_cfg, self.base_m, anchor=self.base_cfg)
                    if ev.speedup is not None:
                        verified_cfgs.append((ev, list(combo)))
            configs = [(self.base_m, [], self.base_cfg, 1.0)]
            configs += [(ev.measurement, combo, ev.cfg, ev.speedup) for ev, combo in verified_cfgs
                        if ev.variant.status == "kept" or batch]
            if batch:
                searched = []
                for m, combo, cfg, speed in configs:
                    larger = self._batch_search(batch[0], cfg, combo, m, speed, cfg, m, speed)
                    searched.append(larger or (m, combo, cfg, speed))
                configs = searched
            best_m, chosen, best_cfg, _speed = max(configs, key=lambda t: t[3])
            self.search_time_s = time.perf_counter() - self.search_started
            return best_cfg, best_m, chosen
        # 2. greedy: start from the fastest verified single transform, add the others in order
        # of their solo speedup; skip what the measurements so far say is hopeless (no faster
        # than the baseline alone, with no known partner in the combination: without an
        # interaction, what does not help alone rarely helps beside another transform).
        verified.sort(key=lambda t: -t[1].speedup)
        for c, ev in verified:
            if not chosen:
                if ev.variant.status == "kept":
                    best_cfg, best_m, chosen, best_speed = ev.cfg, ev.measurement, [c], ev.speedup
                continue
            hopeless = ev.speedup <= 1.0
            partner = any(frozenset((c.transform.name, x.transform.name)) in self.SYNERGY for x in chosen)
            if hopeless and not partner:
                self.notes.append(f"search: skipped combining {c.code} ({c.transform.name}): "
                                  f"{ev.speedup:.2f}x alone, no known interaction with the current best")
                continue
            trial = self._evaluate(chosen + [c], self.base_cfg, best_m, anchor=best_cfg, anchor_speedup=best_speed)
            if trial.variant.status == "kept":
                best_cfg, best_m, chosen, best_speed = trial.cfg, trial.measurement, chosen + [c], trial.speedup
        if not chosen:
            # none helped alone; a known pair can still help (channels_last pays off under AMP)
            for (a, _), (b, _) in itertools.combinations(verified, 2):
                if frozenset((a.transform.name, b.transform.name)) in self.SYNERGY:
                    trial = self._evaluate([a, b], self.base_cfg, self.base_m, anchor=self.base_cfg)
                    if trial.variant.status == "kept":
                        best_cfg, best_m, chosen, best_speed = trial.cfg, trial.measurement, [a, b], trial.speedup
                        break
        for v in self.variants:
            if v.status == "kept" and v.name != "baseline" and v.codes != [c.code for c in chosen]:
                v.reason += "; superseded in the search"
        # 3. batch size last, on the most promising configuration: the kept combination, or
        # when nothing was kept, the fastest verified transform that measured no slower than
        # the baseline (a gain inside the noise at this batch can grow at a larger one); the
        # result must still beat the current best beyond the noise to be kept.
        if batch:
            start = (best_cfg, chosen, best_m, best_speed)
            if not chosen and verified and verified[0][1].speedup >= 1.0:
                c0, ev0 = verified[0]
                start = (ev0.cfg, [c0], ev0.measurement, ev0.speedup)
            larger = self._batch_search(batch[0], start[0], start[1], start[2], start[3], best_cfg, best_m, best_speed)
            if larger is not None:
                best_m, chosen, best_cfg, best_speed = larger
        self.search_time_s = time.perf_counter() - self.search_started
        return best_cfg, best_m, chosen

    def _batch_search(self, c: Candidate, cfg: ExecConfig, chosen: list[Candidate], cfg_m: Measurement,
                      cfg_speed: float, best_cfg: ExecConfig, best_m: Measurement, best_speed: float):
        """Search the batch size by throughput on `cfg` (the transforms `chosen`, measured as
        `cfg_m`, `cfg_speed` over the baseline), each larger size measured beside the best size
        so far; the size found is kept when it beats `best_cfg` (the current best, measured as
        `best_m`, `best_speed` over the baseline), measured beside it. Returns (measurement,
        chosen + batch_size, config, speedup over the baseline), or None when no larger batch
        was kept."""
        from autoopt.transforms.batch_size import search_batch_size

        budget = self.caps.total_memory_mb * self.opts.memory_budget_fraction if self.caps.total_memory_mb else None
        if budget is None:
            from autoopt.run.measure import cpu_memory_total_mb

            total = cpu_memory_total_mb()
            budget = total * self.opts.memory_budget_fraction if total else None

        def measure_cfg(trial_cfg: ExecConfig) -> Measurement:
            if trial_cfg.batch_size == cfg.batch_size:
                return cfg_m
            self.progress("batch", f"batch search: batch size {trial_cfg.batch_size}", batch_size=trial_cfg.batch_size)
            self.variants_tried += 1
            with Session(self.workload, trial_cfg) as s:
                return measure(s, self.caps, self.opts.measure, flops_per_step=self._flops(trial_cfg))

        def against(cur: ExecConfig, new: ExecConfig) -> Paired:
            self.progress("batch", f"batch search: batch size {new.batch_size}, in alternating rounds with "
                          f"{cur.batch_size} (doubling while samples/s improves)", batch_size=new.batch_size)
            self.variants_tried += 1
            with Session(self.workload, new) as s:
                return measure_against(s, lambda: Session(self.workload, cur), self.caps, self.opts.measure,
                                       flops_per_step=self._flops(new), anchor_flops=self._flops(cur))

        result = search_batch_size(cfg, measure_cfg, memory_budget_mb=budget, against=against)
        prefix = "+".join(x.code for x in chosen)
        self.batch_tables[prefix] = result.table
        chosen_bs = result.batch_size
        name = (prefix + "+" if prefix else "") + c.code
        params = dict(c.params, batch_size=chosen_bs, previous=cfg.batch_size)
        v = Variant(
            name=name, codes=[x.code for x in chosen] + [c.code],
            transforms=[{"name": x.transform.name, "params": x.params} for x in chosen]
            + [{"name": "batch_size", "params": params}],
            accepted=True, status="rejected", expected_speedup=c.finding.expected_speedup,
        )
        if not chosen_bs or chosen_bs == cfg.batch_size:
            v.reason = f"no batch size beat {cfg.batch_size} on throughput beyond noise" + (
                f" ({result.reason})" if result.reason else "")
            self.variants.append(v)
            return None
        new_cfg = c.transform.apply(cfg, params, self.workload)
        # Searched from the current best itself: each doubling it took was measured beside the
        # size before and beat it beyond the noise, so the search's chained ratio decides and
        # this run only measures and traces the result. Searched from another configuration
        # (nothing was kept; the fastest transform alone was the start): the result must beat
        # the current best, measured beside it.
        from_best = best_cfg is cfg
        m, _ver, _rec, logdir, failure, pair = self._run_config(name, new_cfg, reference=None, tolerance=0.0,
                                                                trace=True, anchor=None if from_best else best_cfg)
        v.config, v.measurement, v.logdir = new_cfg, m, logdir
        if failure or m is None:
            v.status, v.reason = "failed", failure or "no measurement"
            self.variants.append(v)
            return None
        what = "the baseline" if best_cfg is self.base_cfg else "the current best"
        if from_best:
            ratio = result.relative
            verdict = (f"{ratio:.2f}x the throughput at batch {cfg.batch_size}, each doubling measured beside the "
                       "size before and faster beyond the noise; ")
            # in an exhaustive search the start can be a combination slower than the baseline
            better = ratio * best_speed > 1.0
            if not better:
                verdict += f"still slower than the baseline ({ratio * best_speed:.2f}x); "
        else:
            better, ratio, noise, how = self._judge(pair, best_m, m)
            verdict = (f"{ratio:.2f}x the throughput of {what}, {how} (noise {noise:.0%}); " if better
                       else f"not faster than {what} beyond noise ({ratio:.2f}x, {how}, noise {noise:.0%}); ")
        v.speedup = ratio * best_speed
        caveat = c.transform.caveat(params, self.workload.mode) if hasattr(c.transform, "caveat") else ""
        v.status = "kept" if better else "rejected"
        v.reason = verdict + (
            f"numerics verified at batch {self.base_cfg.batch_size}; " if self.workload.mode == "train" else "") + caveat
        self.variants.append(v)
        if not better:
            return None
        return m, chosen + [Candidate(c.code, c.finding, c.transform, params)], new_cfg, v.speedup

    # ------------------------------------------------------------------ final
    def _final(self, best_cfg: ExecConfig, best_m: Measurement, chosen: list[Candidate]) -> None:
        from autoopt.analyze import analyze_paths

        if not chosen:
            self.final = {
                "codes": [], "transforms": [], "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0,
                "step_time_ms": self.base_m.step_time_ms.to_json(), "throughput_per_s": self.base_m.throughput_per_s,
                "peak_memory_mb": self.base_m.peak_memory_mb, "batch_size": self.base_cfg.batch_size,
                "note": "no transform was verified and faster than the baseline; the model file is best as written",
            }
            return
        # Re-measure baseline and final side by side, in alternating rounds, so the reported
        # speedup is not an artefact of the machine's speed drifting during the search.
        self.progress("final", "final: re-measuring the baseline and the final configuration side by side")
        fps = self.flops_per_sample
        logdir = None
        with Session(self.workload, self.base_cfg) as sb, Session(self.workload, best_cfg) as sf:
            base_m, m = measure_side_by_side(
                sb, sf, self.caps, self.opts.measure,
                flops_a=fps * sb.samples_per_step if fps else None, flops_b=fps * sf.samples_per_step if fps else None)
            if self.opts.trace:
                self.progress("profile", "final: tracing")
                logdir = str(trace_session(sf, new_run_dir(self.tb, "final"), self.opts.profile).run_dir)
        # each one's own peak memory comes from its separate measurement (on a CPU the side-by-side
        # process holds both models)
        base_m.peak_memory_mb = self.base_m.peak_memory_mb
        m.peak_memory_mb = best_m.peak_memory_mb
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
        from autoopt.patching.editor import build_patch
        from autoopt.plan import Plan

        pairs = [(c.transform, c.params) for c in chosen]
        if pairs:
            res = build_patch(self.spec.path, pairs, self.workload)
            self.patch_text = res.diff
            for name, reason in res.skipped:
                self.notes.append(f"patch: {name} could not be written into the file: {reason}")
        self.plan = Plan.from_dict({
            "model": self.spec.name, "model_path": str(self.spec.path), "device": self.caps.device_type,
            "mode": self.workload.mode, "baseline_batch_size": self.base_cfg.batch_size,
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
                from autoopt.diagnosis.rules import get_rule

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
                "time_s": round(self.search_time_s if self.search_time_s is not None else
                                (time.perf_counter() - self.search_started if self.search_started else 0.0), 2),
            },
            "batch_search": self._batch_table(),
            "analysis": self.analysis,
            "patch": self.patch_text,
            "plan": self.plan,
            "notes": self.notes,
            "interrupted": self.interrupted,
            "wall_time_s": round(time.perf_counter() - self.started, 2),
            "artifacts": art,
        }

    def _batch_table(self) -> Optional[list[dict]]:
        """The batch search behind the final configuration (or the last one run)."""
        if not self.batch_tables:
            return None
        final_codes = [c for c in (self.final or {}).get("codes", []) if c not in self._batch_codes()]
        return self.batch_tables.get("+".join(final_codes), list(self.batch_tables.values())[-1])

    def _batch_codes(self) -> set[str]:
        return {f.code for f in self.findings if f.transform == "batch_size"}

    def write(self) -> dict:
        from autoopt.output import report as rep
        from autoopt.output.tensorboard import write_summaries

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
            best_cfg, best_m, chosen = self._search(candidates)
            self._final(best_cfg, best_m, chosen)
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
