"""The search engine: trials of configurations, judged side by side, recorded as variants.

Every keep decision compares two configurations measured side by side, in alternating
rounds (autoopt.run.measure.measure_against): a transform alone against the baseline, a
combination against the current best, a larger batch against the best batch so far. Two
measurements taken apart differ by the machine's drift, 10-30 % on a shared machine, more
than most gains worth keeping. Where the two could not be held together (out of memory),
the candidate's own measurement is compared with the anchor's earlier one, beyond two
standard errors of the two medians and at least 3 % (autoopt.settings.APART_FLOOR).

A strategy (autoopt.search.strategies) decides which trials to run; `Search.run` runs it,
then, when the pipeline gives a `rediagnose` hook, follows the diagnosis: the rules run again
on the trace of the best configuration, and what they newly propose is tried on top of it,
until nothing new appears.

The time budget (`--time-budget`, SearchSettings.time_budget_s, counted from the start of the
run): candidates come most promising first; a trial is started only when the median trial so
far still fits before the deadline (the rest are recorded as skipped, "not measured"); an
unsettled call takes more rounds only within its share of the time left (the time left over
the trials still expected). Before the search, the baseline is measured beside itself (the
noise check): the gain this machine can resolve, said in one line.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

from autoopt.results import Decision, Failure, NoiseCheck, SearchSummary, Variant
from autoopt.run.convergence import SEEDS, default_steps
from autoopt.run.measure import Paired, noise_between, speedup
from autoopt.run.session import is_oom
from autoopt.search.batch import search_batch_size
from autoopt.search.evaluator import Evaluator
from autoopt.search.fixed import semantic
from autoopt.search.trial import Candidate, Outcome, Point
from autoopt.settings import APART_FLOOR, SearchSettings
from autoopt.transforms import apply_transforms
from autoopt.transforms.batch_size import lr_rule
from autoopt.types import Measurement, Status
from autoopt.workload.guard import user_call_of

Progress = Callable[..., None]
Rediagnose = Callable[[Point], list[Candidate]]

BATCH = "batch_size"


def _noop(*_a, **_k) -> None:
    pass


def judge(pair: Optional[Paired], anchor: Point, m: Measurement, anchor_name: str) -> Decision:
    """Whether m beats the anchor beyond the noise: by the ratio of the rounds measured side
    by side when there are some, else against the anchor's earlier measurement."""
    if pair is not None and pair.anchor is not None:
        return Decision(pair.better, pair.ratio, pair.noise, anchor_name, rounds=len(pair.round_ratios),
                        settled=pair.settled, cut_short=pair.cut_short and not pair.settled,
                        anchor_step_time_ms=pair.anchor.step_time_ms.median,
                        anchor_throughput_per_s=pair.anchor.throughput_per_s)
    ratio, _, _ = speedup(anchor.measurement, m)
    noise = noise_between(anchor.measurement, m, APART_FLOOR)
    return Decision(ratio > 1 + noise, ratio, noise, anchor_name,
                    anchor_step_time_ms=anchor.measurement.step_time_ms.median,
                    anchor_throughput_per_s=anchor.measurement.throughput_per_s)


class Search:
    """One search over the candidates of a workload; its variants are the report's."""

    def __init__(self, evaluator: Evaluator, settings: SearchSettings, *, progress: Progress = _noop,
                 rediagnose: Optional[Rediagnose] = None, variants: Optional[list[Variant]] = None,
                 run_started: Optional[float] = None, clock: Callable[[], float] = time.perf_counter):
        self.ev = evaluator
        self.clock = clock  # time.perf_counter; a test passes its own
        self.settings = settings
        self.progress = progress
        self.rediagnose = rediagnose
        self.variants: list[Variant] = variants if variants is not None else []  # shared with the pipeline
        self.notes: list[str] = []
        self.batch_tables: dict[str, list[dict]] = {}  # per searched configuration (its codes)
        self.variants_tried = 0
        self.started: Optional[float] = None
        self.time_s: Optional[float] = None
        self.base: Optional[Point] = None
        budget = settings.time_budget_s
        start = run_started if run_started is not None else clock()
        self.deadline: Optional[float] = start + budget if budget else None
        self.budget_spent = False
        self.pending = 1  # trials still expected (strategies say, via expect): shares out the time left
        self.trial_times: list[float] = []
        self.unmeasured: list[str] = []
        self.noise: Optional[NoiseCheck] = None

    # ------------------------------------------------------------------ running
    def run(self, strategy, candidates: list[Candidate], base: Point) -> Point:
        """The strategy's best configuration, then the diagnosis followed from it."""
        self.base = base
        self.started = self.clock()
        try:
            self.check_noise()
            best = strategy.run(self, candidates, base)
            if self.rediagnose is not None and self.settings.follow_diagnosis:
                best = self.follow(best)
            self.mark_superseded(best)
            return best
        finally:
            self.time_s = self.clock() - self.started

    def elapsed(self) -> float:
        if self.time_s is not None:
            return self.time_s
        return self.clock() - self.started if self.started else 0.0

    def anchor_name(self, anchor: Point) -> str:
        return "the baseline" if anchor is self.base else "the current best"

    # ------------------------------------------------------------------ the time budget
    def expect(self, trials: int) -> None:
        """The strategy's estimate of the trials still to come (shares out the time left)."""
        self.pending = max(1, trials)

    def out_of_time(self) -> bool:
        """True when the median trial so far would not end before the deadline (the same
        answer on every rank of a job)."""
        if self.deadline is None:
            return False
        need = statistics.median(self.trial_times) if self.trial_times else 0.0
        spent = self.ev.agree(self.clock() + need > self.deadline)
        self.budget_spent = self.budget_spent or spent
        return spent

    def round_deadline(self) -> Optional[float]:
        """Until when the next call may add rounds: its share of the time left."""
        if self.deadline is None:
            return None
        now = self.clock()
        return now + max(0.0, self.deadline - now) / self.pending

    def _timed_trial(self, name: str, cfg, **kw):
        t0 = self.clock()
        out = self.ev.trial(name, cfg, deadline=self.round_deadline(), **kw)
        self.trial_times.append(self.clock() - t0)
        self.pending = max(1, self.pending - 1)
        return out

    def _not_measured(self, name: str, codes: list[str], transforms: list[dict], combo: list[Candidate]) -> Variant:
        self.unmeasured.append(name)
        v = Variant(name=name, codes=codes, transforms=transforms, accepted=True, status=Status.SKIPPED,
                    reason=f"not measured: the time budget ({self.settings.time_budget_s:.0f} s, --time-budget) "
                           "was spent before its turn", expected_speedup=self.expected(combo),
                    safety=self.safety(combo))
        self.variants.append(v)
        return v

    def check_noise(self) -> None:
        """The baseline beside itself (fixed rounds): the gain this machine can resolve now."""
        if not self.settings.noise_check or self.out_of_time():
            return
        self.progress("measure", "noise check: the baseline beside itself, in alternating rounds")
        cfg = self.base.config
        try:
            pair = self.ev.measure_pair(cfg, cfg, extend=False)
        except Exception as e:  # noqa: BLE001 - two baselines may not fit; the search goes on
            if not is_oom(e):
                raise
            self.notes.append("noise check: two copies of the baseline did not fit in memory; skipped")
            return
        if pair.anchor is None or len(pair.round_ratios) < 2:
            return
        self.noise = NoiseCheck(pair.ratio, pair.half_width, len(pair.round_ratios), pair.floor)
        self.progress("noise", self.noise.line())

    def summary(self) -> SearchSummary:
        """The report's "search": cost, budget, what it left unmeasured or unsettled, the noise."""
        unsettled = []
        for v in self.variants:
            d = v.decision
            if d is not None and not d.settled:
                low, high = d.interval
                unsettled.append({"variant": v.name, "ratio": round(d.ratio, 4), "low": round(low, 4),
                                  "high": round(high, 4), "rounds": d.rounds, "anchor": d.anchor,
                                  "why": d.unsettled_why})
        return SearchSummary(self.settings.strategy, self.variants_tried, self.elapsed(),
                             time_budget_s=self.settings.time_budget_s, budget_spent=self.budget_spent,
                             unmeasured=list(self.unmeasured), unsettled=unsettled, noise=self.noise)

    # ------------------------------------------------------------------ trials
    def evaluate(self, combo: list[Candidate], anchor: Point, *,
                 name: Optional[str] = None) -> tuple[Variant, Optional[Point]]:
        """One combination: applied to the baseline's configuration, verified, measured beside
        `anchor` and traced. Returns its variant and, when it was verified and measured, the
        point it reached (kept or not: a solo's point is what greedy orders by)."""
        cfg = apply_transforms(self.base.config, [(c.transform, c.params) for c in combo], self.ev.workload)
        name = name or "+".join(c.code for c in combo)
        if self.out_of_time():
            return self._not_measured(name, [c.code for c in combo], [c.transform_json() for c in combo], combo), None
        tol = max(c.transform.tolerance_for(c.params) for c in combo)
        self.variants_tried += 1
        out = self._timed_trial(name, cfg, tolerance=tol, anchor=anchor)
        v = Variant(name=name, codes=[c.code for c in combo], transforms=[c.transform_json() for c in combo],
                    accepted=True, status=Status.FAILED, config=cfg, measurement=out.measurement,
                    verification=out.verification, logdir=out.logdir, expected_speedup=self.expected(combo),
                    safety=self.safety(combo), failure=out.failure, accuracy=out.accuracy)
        point = self._judge_variant(v, out, anchor, combo)
        self.variants.append(v)
        return v, point

    def _judge_variant(self, v: Variant, out: Outcome, anchor: Point, combo: list[Candidate]) -> Optional[Point]:
        if out.failure is not None:
            v.reason = out.failure.summary + "".join(c.transform.explain_failure(out.failure.message) for c in combo)
            return None
        if not out.verified:
            v.status, v.reason = Status.REJECTED, out.verification.reason
            return None
        if out.accuracy is not None and not out.accuracy.ok:  # numerics agree, the model file's metric does not
            v.status, v.reason = Status.REJECTED, out.accuracy.reason
            return None
        d = judge(out.pair, anchor, out.measurement, self.anchor_name(anchor))
        v.decision, v.speedup = d, d.ratio * anchor.speedup
        v.status = Status.KEPT if d.better else Status.REJECTED
        v.reason = (f"verified; {d.ratio:.2f}x {d.anchor}, {d.how} (noise {d.noise:.0%})" if d.better else
                    f"verified but not faster beyond noise: {d.ratio:.2f}x {d.anchor}, {d.how} (noise {d.noise:.0%})")
        if not d.settled:
            low, high = d.interval
            v.reason += f"; too close to call ({low:.2f}x-{high:.2f}x: {d.unsettled_why})"
        if d.better and any(semantic(c) for c in combo):
            before = apply_transforms(self.base.config, [(c.transform, c.params) for c in combo if not semantic(c)],
                                      self.ev.workload)
            if not self._converges(v, before, v.config):
                return None
        return Point(v.config, list(combo), out.measurement, v.speedup, out.logdir)

    def solo(self, c: Candidate) -> tuple[Variant, Optional[Point]]:
        """A transform alone against the baseline; where it has several parameter sets worth
        measuring, each is measured and the fastest verified one wins (and becomes c.params)."""
        options = c.all_options
        modes = self.settings.compile_modes
        if modes and c.transform.name == "compile":
            options = [p for p in options if p.get("mode", "default") in modes] or options[:1]
        if len(options) <= 1:
            return self.evaluate([c], self.base)
        results = []
        for params in options:
            trial = c.with_params(params)
            label = f"{c.code}[{','.join(f'{v}' for v in params.values())}]"
            results.append((trial, *self.evaluate([trial], self.base, name=label)))
        good = [r for r in results if r[2] is not None]
        if not good:
            return results[0][1], None
        trial, v, point = max(good, key=lambda r: r[2].speedup)
        c.params = trial.params
        point.chosen = [c]
        return v, point

    def extend(self, best: Point, c: Candidate, options: Optional[list[dict]] = None) -> Optional[Point]:
        """best + c, measured beside best (with c.params, or each of `options`); the fastest
        kept one, or None."""
        options = options or [c.params]
        kept = []
        for params in options:
            trial = c.with_params(params)
            name = "+".join(best.codes + [c.code]) + (f"[{','.join(map(str, params.values()))}]"
                                                      if len(options) > 1 else "")
            v, point = self.evaluate(best.chosen + [trial], best, name=name)
            if v.status == Status.KEPT:
                kept.append((trial, point))
        if not kept:
            return None
        trial, point = max(kept, key=lambda tp: tp[1].speedup)
        c.params = trial.params
        point.chosen = best.chosen + [c]
        return point

    # ------------------------------------------------------------------ batch size
    def batch(self, c: Candidate, start: Point, best: Point) -> Optional[Point]:
        """The batch size searched by throughput on `start`, each larger size measured beside
        the best size so far; the size found is kept when it beats `best` (measured beside it
        when start is not best). Returns the new point, or None when no larger batch was kept."""
        name = "+".join(start.codes + [c.code])
        if self.out_of_time():
            self._not_measured(name, start.codes + [c.code],
                               [x.transform_json() for x in start.chosen] + [c.transform_json()], start.chosen + [c])
            return None
        try:
            result = search_batch_size(
                start.config, self._measure_batch(start), against=self._batch_pair,
                memory_budget_mb=self.ev.memory_budget_mb(self.settings.memory_budget_fraction),
                max_batch=self.settings.max_batch, stop=self.out_of_time)
        except Exception as e:  # noqa: BLE001 - the model file failing at another batch size fails this variant
            if user_call_of(e) is None:
                raise  # autoopt's own error stays loud
            result = None
            failure = Failure.of(e, oom=is_oom(e))
        params = dict(c.params, batch_size=result.batch_size if result else None, previous=start.config.batch_size)
        rule = lr_rule(params)
        if rule is not None:
            params["lr_rule"] = rule
        v = Variant(name=name, codes=start.codes + [c.code],
                    transforms=[x.transform_json() for x in start.chosen] + [{"name": BATCH, "params": params}],
                    accepted=True, status=Status.REJECTED, expected_speedup=c.finding.expected_speedup,
                    safety=self.safety(start.chosen + [c]), lr_rule=rule)
        self.variants.append(v)
        if result is None:
            v.status, v.failure = Status.FAILED, failure
            v.reason = f"the batch size search failed: {failure.summary}"
            return None
        self.batch_tables[start.label] = result.table
        if not result.batch_size or result.batch_size == start.config.batch_size:
            v.reason = f"no batch size beat {start.config.batch_size} on throughput beyond noise" + (
                f" ({result.reason})" if result.reason else "")
            return None
        cfg = c.transform.apply(start.config, params, self.ev.workload)
        # Searched from the current best itself, each doubling was measured beside the size before
        # and beat it beyond the noise: the search's chained ratio decides, this trial only
        # measures and traces the result. From another configuration (nothing was kept; the
        # fastest transform alone was the start), the result must beat the current best beside it.
        from_best = start is best
        if from_best and self.out_of_time():  # the search's own measurement of the size stands
            out = Outcome(measurement=result.measurement)
        else:
            out = self._timed_trial(name, cfg, tolerance=0.0, anchor=None if from_best else best, verify=False)
        v.config, v.measurement, v.logdir, v.failure = cfg, out.measurement, out.logdir, out.failure
        if out.failure is not None or out.measurement is None:
            v.status, v.reason = Status.FAILED, out.failure.summary if out.failure else "no measurement"
            return None
        better = self._batch_verdict(v, c, params, result.relative, start, best, out, from_best)
        if not better or not self._converges(v, start.config, cfg):
            return None
        return Point(cfg, start.chosen + [c.with_params(params)], out.measurement, v.speedup, out.logdir)

    def _measure_batch(self, start: Point):
        def measure(cfg):
            if cfg.batch_size == start.config.batch_size:
                return start.measurement
            self.progress("batch", f"batch search: batch size {cfg.batch_size}", batch_size=cfg.batch_size)
            self.variants_tried += 1
            return self.ev.measure_alone(cfg)
        return measure

    def _batch_pair(self, cur, new) -> Paired:
        self.progress("batch", f"batch search: batch size {new.batch_size}, in alternating rounds with "
                      f"{cur.batch_size} (doubling while samples/s improves)", batch_size=new.batch_size)
        self.variants_tried += 1
        t0 = self.clock()
        pair = self.ev.measure_pair(cur, new, deadline=self.round_deadline())
        self.trial_times.append(self.clock() - t0)
        return pair

    def _converges(self, v: Variant, before, cfg) -> bool:
        """An accepted change of training is kept only when `cfg` trains like `before` (the same
        configuration without the change): autoopt.run.convergence, its result on v.convergence.
        True when the check is off (--convergence-steps 0), not run, or passed."""
        if self.ev.workload.mode != "train":
            return True
        steps = self.settings.convergence_steps
        if steps is None:
            step_s = self.base.measurement.step_time_ms.median / 1000 if self.base.measurement else None
            steps = default_steps(step_s, self.settings.time_budget_s)
        if steps == 0:
            return True
        self.progress("convergence", f"convergence check: {steps} optimizer steps of {v.name} beside the "
                                     f"configuration without the change, {SEEDS} seeds")
        res = self.ev.convergence(before, cfg, steps)
        if res is None:
            return True
        v.convergence = res
        if not res["ok"]:
            v.status = Status.REJECTED
            v.reason = f"rejected by the convergence check: {res['reason']}; {v.reason}"
        else:
            v.reason += f"; convergence check passed: {res['reason']}"
        return bool(res["ok"])

    def _batch_verdict(self, v: Variant, c: Candidate, params: dict, relative: float, start: Point, best: Point,
                       out: Outcome, from_best: bool) -> bool:
        if from_best:
            ratio = relative
            verdict = (f"{ratio:.2f}x the throughput at batch {start.config.batch_size}, each doubling measured "
                       "beside the size before and faster beyond the noise; ")
            better = ratio * best.speedup > 1.0  # an exhaustive start can be slower than the baseline
            if not better:
                verdict += f"still slower than the baseline ({ratio * best.speedup:.2f}x); "
        else:
            d = judge(out.pair, best, out.measurement, self.anchor_name(best))
            v.decision, ratio, better = d, d.ratio, d.better
            verdict = (f"{ratio:.2f}x the throughput of {d.anchor}, {d.how} (noise {d.noise:.0%}); " if better
                       else f"not faster than {d.anchor} beyond noise ({ratio:.2f}x, {d.how}, noise {d.noise:.0%}); ")
        v.speedup = ratio * best.speedup
        v.status = Status.KEPT if better else Status.REJECTED
        train = self.ev.workload.mode == "train"
        verified = f"numerics verified at batch {self.base.config.batch_size}; " if train else ""
        v.reason = verdict + verified + c.transform.caveat(params, self.ev.workload.mode)
        return better

    # ------------------------------------------------------------------ diagnosis that follows the search
    def follow(self, best: Point) -> Point:
        """Re-run the rules on the best configuration's trace; try what they newly propose on
        top of it (a larger batch last), until no new finding appears."""
        for _ in range(self.settings.max_diagnosis_rounds):
            if self.out_of_time():
                self.notes.append("search: the diagnosis was not followed further: the time budget was spent")
                break
            fresh = self.rediagnose(best)
            if not fresh:
                break
            for c in [x for x in fresh if x.transform.name != BATCH]:
                best = self.extend(best, c, c.all_options) or best
            batch = [x for x in fresh if x.transform.name == BATCH]
            if batch and not any(x.transform.name == BATCH for x in best.chosen):
                best = self.batch(batch[0], best, best) or best
        return best

    # ------------------------------------------------------------------ bookkeeping
    def mark_superseded(self, best: Point) -> None:
        for v in self.variants:
            if v.status == Status.KEPT and v.name != "baseline" and v.codes != best.codes:
                v.reason += "; superseded in the search"

    def verification_of(self, best: Point):
        """The verification behind a point: its own trial's, or, for a larger batch (measured,
        not re-verified), that of the configuration the batch search started from."""
        codes = best.codes
        while codes:
            for v in reversed(self.variants):
                if v.codes == codes and v.verification is not None and v.verification.ok:
                    return v.verification
            codes = codes[:-1]
        return None

    @staticmethod
    def expected(combo: list[Candidate]) -> Optional[float]:
        """The rules' predicted speedup of a combination: the product of its findings' gains
        (None when any finding has no estimate)."""
        prod = 1.0
        for c in combo:
            if c.finding.expected_speedup is None:
                return None
            prod *= c.finding.expected_speedup
        return prod

    @staticmethod
    def safety(combo: list[Candidate]) -> str:
        levels = [str(c.transform.safety_for(c.params)) for c in combo]
        for level in ("manual", "unsafe"):
            if level in levels:
                return level
        return "safe"
