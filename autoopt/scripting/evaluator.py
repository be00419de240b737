"""The evaluator of `autoopt optimize --script`: each configuration runs the user's training
script in its own process (autoopt.scripting.worker / driver), and the search
(autoopt.search) decides on what those processes report, as it does for a model file.

- baseline: the script as written, from the run's seed; its first K losses are the reference
  every variant is verified against. A second run from the same seed says whether the script
  is reproducible: when its losses differ (a script that seeds itself from the clock, data
  order or dropout from unseeded generators), the seed-to-seed spread is measured and every
  tolerance widened to 3x it, with a note saying so. Then the baseline is traced and timed,
  and its facts make the Workload the transforms and rules decide on
  (autoopt.scripting.workload).
- trial: a child for the configuration; its K losses beside the reference (the loss of each
  step within the tolerance, widening by half of itself per step: autoopt.run.verify), then
  timed beside the anchor's child in alternating rounds (anchor first in each; RoundPolicy:
  more rounds while unsettled, none past the deadline) and traced when asked. A failure (the
  child's error, its crash, a timeout, running out of memory, the script ending) is the
  Outcome's Failure, with the script's line and the end of the child's log.
- Children are kept for reuse (the anchor's, the current best's) up to MAX_ALIVE; the others
  are stopped. close() stops them all.
"""
from __future__ import annotations

import collections
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

from autoopt.errors import UserError
from autoopt.results import Failure
from autoopt.run.measure import Paired, RoundPolicy, cpu_memory_total_mb
from autoopt.run.trace import new_run_dir
from autoopt.run.verify import FP32_TOLERANCE, RunRecord, compare
from autoopt.scripting.protocol import OOM, cannot_apply
from autoopt.scripting.target import ScriptTarget
from autoopt.scripting.worker import ScriptEnded, ScriptWorker, WorkerFailed
from autoopt.scripting.workload import script_workload
from autoopt.search.evaluator import FinalMeasurement
from autoopt.search.trial import Outcome, Point
from autoopt.settings import SIDE_BY_SIDE_FLOOR, MeasureSettings, ProfileSettings, SearchSettings
from autoopt.types import Capabilities, ExecConfig, Measurement, Stats, Verification, Workload

Progress = Callable[..., None]

VERIFY_STEPS = 4
WARMUP_STEPS = 3
MAX_ALIVE = 3
REPRODUCIBLE = 1e-6  # relative loss difference under which two same-seed runs are the same


def _noop(*_a, **_k) -> None:
    pass


def _key(cfg: ExecConfig) -> str:
    return json.dumps(cfg.to_json(), sort_keys=True)


def _rel_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]


class ScriptEvaluator:
    """Evaluates configurations of a training script, one child process each."""

    def __init__(self, target: ScriptTarget, caps: Capabilities, *, measure_settings: MeasureSettings,
                 profile_settings: ProfileSettings, search_settings: SearchSettings, tb_dir: Optional[Path],
                 log_dir: Path, seed: int = 0, progress: Progress = _noop, verify_steps: int = VERIFY_STEPS,
                 warmup_steps: int = WARMUP_STEPS, framework_knobs: bool = True, max_alive: int = MAX_ALIVE,
                 ready_timeout_s: Optional[float] = None, nproc: int = 1):
        self.target = target
        self.caps = caps
        self.measure_settings = measure_settings
        self.profile_settings = profile_settings
        self.search_settings = search_settings
        self.tb_dir = tb_dir
        self.log_dir = Path(log_dir)
        self.seed = seed
        self.progress = progress
        self.verify_steps = verify_steps
        self.warmup_steps = warmup_steps
        self.framework_knobs = framework_knobs
        self.max_alive = max(2, max_alive)
        self.ready_timeout_s = ready_timeout_s
        self.nproc = max(1, int(nproc))  # torchrun-style scripts: ranks per job (each its own batches)
        self.workload: Optional[Workload] = None
        self.facts: dict = {}
        self.sites: dict = {}
        self.notes: list[str] = []
        self.seed_spread: Optional[float] = None
        self.reproducible = True
        self.framework: Optional[str] = None
        self.reference_losses: list[float] = []
        self.health = None
        self.base_cfg: Optional[ExecConfig] = None
        self.batch_size: Optional[int] = None
        self.applied: dict[str, list[str]] = {}  # configuration name -> fields its child applied
        self.variant_times: list[float] = []
        self._alive: "collections.OrderedDict[str, ScriptWorker]" = collections.OrderedDict()
        self._names: dict[str, int] = {}
        self._baseline_ready_s: Optional[float] = None  # the baseline's start to "ready"

    # ------------------------------------------------------------------ children
    def _log_name(self, name: str) -> str:
        safe = "".join(c if c.isalnum() or c in "._+-" else "_" for c in name) or "run"
        n = self._names.get(safe, 0) + 1
        self._names[safe] = n
        return safe if n == 1 else f"{safe}-{n}"

    def _spawn(self, cfg: ExecConfig, name: str, *, target: Optional[ScriptTarget] = None,
               warmup: Optional[int] = None) -> ScriptWorker:
        """A started child (not yet ready)."""
        kw = {} if self.ready_timeout_s is None else {"ready_timeout_s": self.ready_timeout_s}
        if self.ready_timeout_s is None and self._baseline_ready_s is not None:
            # a variant that takes far longer than the baseline to reach its first steps hangs
            kw["ready_timeout_s"] = max(300.0, 5.0 * self._baseline_ready_s)
        w = ScriptWorker(target or self.target, cfg, name=self._log_name(name), seed=self.seed,
                         verify_steps=self.verify_steps, warmup_steps=self.warmup_steps if warmup is None else warmup,
                         log_dir=self.log_dir, framework_knobs=self.framework_knobs, nproc=self.nproc, **kw)
        try:
            return w.start()
        except BaseException:
            w.kill()
            raise

    def _ready(self, w: ScriptWorker, name: str) -> ScriptWorker:
        """A started child once it has sent "ready" (killed when it fails)."""
        try:
            w.wait_ready()
        except BaseException:
            w.kill()
            raise
        self.applied[name] = list((w.ready or {}).get("applied") or [])
        return w

    def _new_worker(self, cfg: ExecConfig, name: str, *, target: Optional[ScriptTarget] = None,
                    warmup: Optional[int] = None) -> ScriptWorker:
        return self._ready(self._spawn(cfg, name, target=target, warmup=warmup), name)

    def _worker(self, cfg: ExecConfig, name: str, keep: tuple[str, ...] = (), slot: str = "") -> ScriptWorker:
        """A ready child for cfg: one kept alive, else a new one (the least recently used
        others stopped beyond MAX_ALIVE, never those in `keep`). `slot` tells apart two
        children of one configuration (the baseline beside itself)."""
        key = _key(cfg) + slot
        w = self._alive.get(key)
        if w is not None and w.alive():
            self._alive.move_to_end(key)
            return w
        if w is not None:
            self._drop(key)
        self._make_room({key, *keep})
        w = self._new_worker(cfg, name)
        self._alive[key] = w
        return w

    def _make_room(self, keep: set[str]) -> None:
        while len(self._alive) >= self.max_alive:
            victim = next((k for k in self._alive if k not in keep), None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, key: str) -> None:
        w = self._alive.pop(key, None)
        if w is not None:
            w.stop()

    def close(self) -> None:
        """Stop every child."""
        while self._alive:
            _, w = self._alive.popitem()
            w.kill()

    def __enter__(self) -> "ScriptEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ timing
    def _steps_for(self, w: ScriptWorker, s: MeasureSettings) -> int:
        """Steps for a measurement under settings `s`: the minimum count, more to fill the
        minimum time at the child's step time, at most the maximum."""
        step_ms = w.step_ms or 1.0
        want = max(s.min_steps, math.ceil(s.min_time_s * 1000.0 / max(step_ms, 1e-3)))
        by_time = max(3, int(s.max_time_s * 1000.0 / max(step_ms, 1e-3)))
        return max(1, min(want, s.max_steps, by_time))

    def _times(self, cfg: ExecConfig, name: str, steps: int, keep: tuple[str, ...] = (),
               slot: str = "") -> tuple[list[float], Optional[float]]:
        """`steps` timed steps of cfg's child; a child whose script ended is replaced once."""
        w = self._worker(cfg, name, keep, slot)
        try:
            return w.measure(steps)
        except ScriptEnded:
            self._alive.pop(_key(cfg) + slot, None)
            w = self._worker(cfg, name, keep, slot)
            return w.measure(steps)

    def _measurement(self, times: list[float], peak: Optional[float], warmup: int) -> Measurement:
        bs = self.batch_size or 1
        samples = bs * self.nproc  # a job's step: every rank's batch, at the slowest rank's pace
        st = Stats.of(times)
        return Measurement(step_time_ms=st, batch_size=bs, throughput_per_s=samples / (st.median / 1000.0),
                           peak_memory_mb=peak, warmup_steps=warmup, samples_per_step=samples)

    def _alone(self, cfg: ExecConfig, name: str) -> Measurement:
        w = self._worker(cfg, name)
        times, peak = self._times(cfg, name, self._steps_for(w, self.measure_settings))
        return self._measurement(times, peak, self.warmup_steps)

    def _against(self, anchor: ExecConfig, cfg: ExecConfig, name: str, *, deadline: Optional[float],
                 extend: bool = True) -> Paired:
        """cfg beside anchor in alternating rounds, the anchor first in each."""
        ss = self.search_settings
        policy = RoundPolicy(rounds=ss.rounds, max_rounds=ss.max_rounds if extend else ss.rounds, deadline=deadline)
        slot = "#copy" if _key(anchor) == _key(cfg) else ""  # the baseline beside itself: a second child
        keep = (_key(anchor), _key(cfg) + slot)
        wa = self._worker(anchor, "anchor", keep)
        wc = self._worker(cfg, name, keep, slot)
        share = self.measure_settings.round_share(policy.rounds)
        na, nc = self._steps_for(wa, share), self._steps_for(wc, share)
        sa: list[float] = []
        sc: list[float] = []
        peaks: list[Optional[float]] = []
        ratios: list[float] = []

        def one_round() -> None:
            ta, _ = self._times(anchor, "anchor", na, keep)
            tc, peak = self._times(cfg, name, nc, keep, slot)
            sa.extend(ta)
            sc.extend(tc)
            peaks.append(peak)
            ratios.append(_median(ta) / _median(tc))

        started = time.perf_counter()
        for _ in range(policy.rounds):
            one_round()
        while policy.more(ratios, started):
            for _ in range(3):
                one_round()
        known = [p for p in peaks if p is not None]
        return Paired(self._measurement(sa, None, self.warmup_steps),
                      self._measurement(sc, max(known) if known else None, self.warmup_steps),
                      ratios, SIDE_BY_SIDE_FLOOR, cut_short=policy.cut_short)

    def _trace(self, cfg: ExecConfig, name: str) -> Optional[str]:
        if self.tb_dir is None:
            return None
        self.progress("profile", f"{name}: tracing", variant=name)
        run_dir = new_run_dir(self.tb_dir, name)
        ps = self.profile_settings
        w = self._worker(cfg, name)
        w.trace(run_dir, self.target.path.stem, max(1, ps.wait + ps.warmup), max(1, ps.active),
                record_shapes=ps.record_shapes, profile_memory=ps.profile_memory, with_stack=ps.with_stack)
        return str(run_dir)

    # ------------------------------------------------------------------ the baseline
    def _baseline_error(self, e: BaseException) -> UserError:
        shown = self.target.shown
        if isinstance(e, ScriptEnded) and e.steps == 0:
            return UserError(
                f"The script {shown} ended without stepping a torch.optim optimizer, so autoopt saw no training "
                f"step to verify or time. Fix: optimize a script whose loop calls optimizer.step() on a "
                f"torch.optim optimizer (profile it as a whole with autoopt profile --script {shown}).", cause=e)
        if isinstance(e, ScriptEnded):
            need = self.verify_steps + self.warmup_steps + self.measure_settings.min_steps
            return UserError(
                f"The script {shown} ended on its own after {e.steps} optimizer step(s); autoopt needs at least "
                f"{need} ({self.verify_steps} verification, {self.warmup_steps} warm-up and "
                f"{self.measure_settings.min_steps} timed steps) and stops it itself after those. Fix: pass "
                f"arguments that make it train longer (more epochs or steps) after --, e.g. "
                f"autoopt optimize --script {shown} -- --epochs 100.", cause=e)
        assert isinstance(e, WorkerFailed)
        where = f" at {e.where}" if e.where else ""
        name = f"{e.exc_type}: " if e.exc_type else ""
        log = f" The end of its output: {e.log[-600:]}" if e.log and not e.where else ""
        return UserError(
            f"The script {shown} failed on its own{where} while autoopt ran it as written (its baseline): "
            f"{name}{e.message}.{log} Fix: make `{self.target.command}` run on its own first; the whole output "
            f"is in {self.log_dir}.", cause=e)

    def baseline(self, cfg: ExecConfig) -> Point:
        self.progress("baseline", f"baseline: running {self.target.shown} as written, twice from one seed (is it "
                      "reproducible?)")
        # On a GPU both start together (their imports and set-up overlap; neither is timed
        # meanwhile). On a CPU the second starts when the first waits: both would compute on the
        # same cores at once, each with all its intra-op threads, and spinning OpenMP threads
        # made the pair several times slower than one after the other (29 s against 12 s for
        # sophia-opt's nanoGPT-style script on 2 cores).
        together = self.caps.device_type == "cuda"
        t0 = time.perf_counter()
        w = self._spawn(cfg, "baseline")
        again = None
        try:
            if together:
                again = self._spawn(cfg, "baseline-same-seed", warmup=0)
            self._ready(w, "baseline")
        except (WorkerFailed, ScriptEnded) as e:
            _kill(w, again)
            raise self._baseline_error(e) from e
        except BaseException:
            _kill(w, again)
            raise
        self._baseline_ready_s = time.perf_counter() - t0
        ready = w.ready or {}
        self.facts = dict(ready.get("facts") or {})
        self.sites = dict(ready.get("sites") or {})
        self.framework = ready.get("framework")
        self.notes.extend(ready.get("notes") or [])
        self.reference_losses = [float(x) for x in ready.get("losses") or []]
        self.batch_size = ready.get("batch_size") or self.facts.get("workload.batch_size")
        base = cfg.with_(batch_size=int(self.batch_size)) if self.batch_size else cfg
        self.base_cfg = base
        self._alive[_key(base)] = w
        self._check_losses()
        if again is None:
            again = self._spawn(cfg, "baseline-same-seed", warmup=0)
        self._reproducibility(again)
        try:
            logdir = self._trace(base, "baseline")
            m = self._alone(base, "baseline")
        except (WorkerFailed, ScriptEnded) as e:
            raise self._baseline_error(e) from e
        self.workload = script_workload(self.target, self.caps, self.facts, seed=self.seed)
        return Point(base, [], m, 1.0, logdir)

    def _check_losses(self) -> None:
        losses = self.reference_losses
        if any(not math.isfinite(x) for x in losses):
            raise UserError(f"The script {self.target.shown} produces inf/NaN losses as written ({losses}). Fix the "
                            "script before optimizing it: a smaller learning rate, gradient clipping, normalised "
                            "inputs (see `autoopt explain AO003` and AO005).")
        if len(losses) < self.verify_steps:
            self.notes.append(f"the script's loss was seen on {len(losses)} of its first {self.verify_steps} steps "
                              "(a scalar tensor it calls backward() on): variants are verified on those only")

    def _reproducibility(self, w: ScriptWorker) -> None:
        """The second baseline from the same seed (`w`, started): its losses equal the first's,
        or the spread between them widens every tolerance."""
        try:
            self._ready(w, "baseline-same-seed")
        except (WorkerFailed, ScriptEnded) as e:
            raise self._baseline_error(e) from e
        again = [float(x) for x in (w.ready or {}).get("losses") or []]
        w.stop()
        diffs = _rel_diffs(self.reference_losses, again)
        spread = max(diffs) if diffs else 0.0
        if spread <= REPRODUCIBLE:
            self.reproducible, self.seed_spread = True, None
            return
        self.reproducible, self.seed_spread = False, spread
        self.notes.append(
            f"the script is not reproducible from a fixed seed: two runs of it as written, both seeded with "
            f"{self.seed}, differ by up to {spread:.2e} relative in their first {len(diffs)} losses (it seeds itself, "
            f"or draws data order or dropout from generators autoopt does not seed); every variant's tolerance is "
            f"widened to at least 3x that spread ({3 * spread:.2e})")

    def tolerance(self, tolerance: float) -> float:
        """A transform's tolerance, widened to 3x the seed-to-seed spread of a script that is
        not reproducible."""
        tol = max(tolerance, FP32_TOLERANCE)
        return max(tol, 3.0 * self.seed_spread) if self.seed_spread else tol

    def verify(self, losses: list[float], tolerance: float) -> Verification:
        """A variant's losses beside the reference (autoopt.run.verify.compare)."""
        if not self.reference_losses:
            return Verification(False, None, None, tolerance, "the script's loss was never seen (no scalar tensor "
                                "it calls backward() on), so a variant cannot be verified against the baseline")
        n = min(len(losses), len(self.reference_losses))
        if n < len(self.reference_losses):
            return Verification(False, None, None, tolerance,
                                f"the variant's loss was seen on {n} of the baseline's {len(self.reference_losses)} "
                                "steps", losses_baseline=self.reference_losses, losses_variant=list(losses))
        return compare(RunRecord(outputs=[], losses=self.reference_losses), RunRecord(outputs=[], losses=losses[:n]),
                       self.tolerance(tolerance))

    # ------------------------------------------------------------------ the interface
    def agree(self, flag: bool) -> bool:
        return flag

    def eta(self) -> Optional[float]:
        if not self.variant_times:
            return None
        t = sorted(self.variant_times)
        return t[len(t) // 2]

    def _failure(self, e: BaseException) -> Failure:
        if isinstance(e, ScriptEnded):
            return Failure("script ended", f"the script ended on its own after {e.steps} optimizer step(s) while "
                           "this configuration ran (pass arguments that make it train longer)")
        if isinstance(e, WorkerFailed):
            where = f" (at {e.where})" if e.where else ""
            if not e.where and e.log:  # no line of the script to name: what the child printed last
                where = " — its output ends: " + " ".join(e.log[-300:].split())
            kind = "out of memory" if e.kind == OOM else (e.exc_type or e.kind)
            log = f"\n--- the end of its log ---\n{e.log}" if e.log else ""
            return Failure(kind, f"{e.message}{where}", (e.traceback or "") + log)
        return Failure.of(e)

    def trial(self, name: str, cfg: ExecConfig, *, tolerance: float, anchor: Optional[Point],
              verify: bool = True, trace: bool = True, deadline: Optional[float] = None) -> Outcome:
        out = Outcome()
        reasons = cannot_apply(cfg, batch_size=self.batch_size)
        if reasons:
            out.failure = Failure("cannot be applied to a script", "; ".join(reasons))
            return out
        eta = self.eta()
        so_far = f" (~{eta:.0f} s per variant so far)" if eta else ""
        self.progress("variant", f"{name}: starting the script{so_far}", variant=name, eta_s=eta)
        t0 = time.perf_counter()
        try:
            w = self._worker(cfg, name, (_key(anchor.config),) if anchor is not None else ())
            if verify:
                self.progress("verify", f"{name}: verifying numerics", variant=name)
                out.verification = self.verify([float(x) for x in (w.ready or {}).get("losses") or []], tolerance)
                if not out.verification.ok:
                    self._drop(_key(cfg))
                    return out
            if anchor is None:
                self.progress("measure", f"{name}: measuring", variant=name)
                out.measurement = self._alone(cfg, name)
            else:
                what = "the baseline" if anchor.config == self.base_cfg else "the current best"
                self.progress("measure", f"{name}: measuring, in alternating rounds with {what}", variant=name)
                out.pair = self._against(anchor.config, cfg, name, deadline=deadline)
                out.measurement = out.pair.measurement
            if trace:
                out.logdir = self._trace(cfg, name)
        except (WorkerFailed, ScriptEnded) as e:  # a failing configuration is a value, not a crash
            self._drop(_key(cfg))
            out.failure = self._failure(e)
            return out
        self.variant_times.append(time.perf_counter() - t0)
        return out

    def measure_alone(self, cfg: ExecConfig) -> Measurement:
        try:
            return self._alone(cfg, "measure")
        except (WorkerFailed, ScriptEnded) as e:
            raise RuntimeError(self._failure(e).summary) from e

    def measure_pair(self, anchor: ExecConfig, cfg: ExecConfig, *, deadline: Optional[float] = None,
                     extend: bool = True) -> Paired:
        try:
            return self._against(anchor, cfg, "measure", deadline=deadline, extend=extend)
        except (WorkerFailed, ScriptEnded) as e:
            raise RuntimeError(self._failure(e).summary) from e

    def convergence(self, before: ExecConfig, cfg: ExecConfig, steps: int) -> Optional[dict]:
        """None: changes of training (batch size) are not applied to scripts."""
        return None

    def memory_budget_mb(self, fraction: float) -> Optional[float]:
        total = self.caps.total_memory_mb or (cpu_memory_total_mb() if self.caps.device_type == "cpu" else None)
        return total * fraction if total else None

    def baseline_accuracy(self):
        """None: a script has no evaluate(model) autoopt could call."""
        return None

    def accuracy(self, cfg: ExecConfig):
        """None: a script has no evaluate(model) autoopt could call."""
        return None

    def final(self, baseline: ExecConfig, best: Point) -> FinalMeasurement:
        """Baseline and best re-measured in alternating rounds, then the best traced."""
        self.progress("final", "final: re-measuring the baseline and the final configuration side by side")
        pair = self._against(baseline, best.config, "final", deadline=None, extend=False)
        logdir = self._trace(best.config, "final") if self.tb_dir is not None else None
        return FinalMeasurement(pair.anchor, pair.measurement, logdir)

    # ------------------------------------------------------------------ the patched script
    def run_patched(self, patched_path: Path, cfg: ExecConfig) -> list[float]:
        """The patched script's first K losses, run with the baseline configuration (its own
        edits carry the kept configuration); WorkerFailed / ScriptEnded when it fails."""
        target = ScriptTarget(path=Path(patched_path).resolve(), args=list(self.target.args), cwd=self.target.cwd,
                              shown=str(patched_path), path0=self.target.path.parent)  # its imports: the script's
        base = self.base_cfg or cfg
        plain = ExecConfig(device=base.device, batch_size=base.batch_size)
        w = self._new_worker(plain, "patched", target=target, warmup=0)
        try:
            return [float(x) for x in (w.ready or {}).get("losses") or []]
        finally:
            w.stop()


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _kill(*workers: Optional[ScriptWorker]) -> None:
    for w in workers:
        if w is not None:
            w.kill()
