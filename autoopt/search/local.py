"""The evaluator of one process: each configuration is a Session (autoopt.run.session) built,
verified against the baseline's reference run, measured beside the configuration it must
beat and traced into its own TensorBoard run directory."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

from autoopt.errors import UserError
from autoopt.results import Failure
from autoopt.run.accuracy import compare_metrics, evaluate_session
from autoopt.run.health import growth_text
from autoopt.run.measure import (
    Paired,
    RoundPolicy,
    count_flops,
    cpu_memory_total_mb,
    measure,
    measure_against,
    measure_side_by_side,
)
from autoopt.run.session import Session, is_oom
from autoopt.run.trace import new_run_dir, trace_session
from autoopt.run.verify import RunRecord, compare, record_run
from autoopt.search.evaluator import FinalMeasurement
from autoopt.search.trial import Outcome, Point
from autoopt.settings import MeasureSettings, ProfileSettings, SearchSettings
from autoopt.types import AccuracyCheck, Capabilities, ExecConfig, Measurement, Workload

Progress = Callable[..., None]


def _noop(*_a, **_k) -> None:
    pass


def _compiles(*cfgs: ExecConfig) -> bool:
    return any(c.compile_call_mode is not None for c in cfgs)


def baseline_nonfinite_message(path: str, rec: RunRecord) -> str:
    """The exit-2 paragraph for a baseline whose loss went inf/NaN: why, from its gradient
    health (which layer, which step, how fast the gradient norm grew), and what to change."""
    why = growth_text(rec.health or {})
    return (f"{path}: the baseline itself produces inf/NaN losses ({rec.losses})"
            + (f": {why}" if why else "")
            + ". Fix the model file before optimizing it: a smaller learning rate, gradient clipping "
            "(torch.nn.utils.clip_grad_norm_), normalised inputs and targets, or a numerically stable loss "
            "(see `autoopt explain AO003` and AO005).")


class LocalEvaluator:
    """Evaluates configurations of `workload` in this process."""

    def __init__(self, workload: Workload, caps: Capabilities, *, measure_settings: MeasureSettings,
                 profile_settings: ProfileSettings, search_settings: SearchSettings, tb_dir: Optional[Path],
                 progress: Progress = _noop):
        self.workload = workload
        self.caps = caps
        self.measure_settings = measure_settings
        self.profile_settings = profile_settings
        self.search_settings = search_settings
        self.tb_dir = tb_dir  # None: no traces
        self.progress = progress
        self.reference: Optional[RunRecord] = None
        self.reference_metrics: Optional[dict[str, float]] = None  # the baseline's evaluate(), when the file has one
        self.health: Optional[dict] = None  # gradient health of the baseline's verification steps
        self.base_cfg: Optional[ExecConfig] = None
        self.flops_per_sample: Optional[float] = None
        self.variant_times: list[float] = []
        self.notes: list[str] = []  # for the report: what the baseline's measurement could not do

    # ------------------------------------------------------------------ helpers
    def flops(self, cfg: ExecConfig) -> Optional[float]:
        """FLOPs of one step of cfg (from the baseline's count per sample)."""
        if not self.flops_per_sample:
            return None
        accum = max(1, cfg.grad_accum_steps or 1) if self.workload.mode == "train" else 1
        return self.flops_per_sample * cfg.batch_size * accum

    def _trace(self, s: Session, name: str) -> Optional[str]:
        if self.tb_dir is None:
            return None
        self.progress("profile", f"{name}: tracing", variant=name)
        return str(trace_session(s, new_run_dir(self.tb_dir, name), self.profile_settings).run_dir)

    def eta(self) -> Optional[float]:
        """Median wall time of the configurations so far: what the next one will likely take."""
        if not self.variant_times:
            return None
        t = sorted(self.variant_times)
        return t[len(t) // 2]

    # ------------------------------------------------------------------ the interface
    def baseline(self, cfg: ExecConfig) -> Point:
        self.base_cfg = cfg
        self.progress("baseline", "baseline: verifying and measuring")
        with Session(self.workload, cfg) as s:
            self.reference = record_run(s, health=True)
            self.health = self.reference.health
            if any(not math.isfinite(x) for x in self.reference.losses):
                raise UserError(baseline_nonfinite_message(str(self.workload.spec.path), self.reference))
            if self.workload.spec.evaluate is not None:
                self.progress("baseline", "baseline: evaluate(model) after the verification steps")
                self.reference_metrics = evaluate_session(s)
            # Trace before timing: once the profiler has run with CUDA activities, CUPTI stays
            # subscribed in the process and slows kernel launches (pytorch/pytorch#144455), so
            # every measurement, the baseline's included, is taken after the first trace.
            logdir = self._trace(s, "baseline") if self.tb_dir is not None else None
            flops = count_flops(s, self.notes)
            self.flops_per_sample = flops / s.samples_per_step if flops else None
            m = measure(s, self.caps, self.measure_settings, flops_per_step=flops)
        return Point(cfg, [], m, 1.0, logdir)

    def agree(self, flag: bool) -> bool:
        return flag

    def trial(self, name: str, cfg: ExecConfig, *, tolerance: float, anchor: Optional[Point],
              verify: bool = True, trace: bool = True, deadline: Optional[float] = None) -> Outcome:
        eta = self.eta()
        self.progress("variant", f"{name}: building" + (f" (~{eta:.0f} s per variant so far)" if eta else ""),
                      variant=name, eta_s=eta)
        t0 = time.perf_counter()
        out = Outcome()
        try:
            with Session(self.workload, cfg) as s:
                if verify and self.reference is not None:
                    self.progress("verify", f"{name}: verifying numerics", variant=name, compiling=_compiles(cfg))
                    out.verification = compare(self.reference, record_run(s), tolerance)
                    if not out.verification.ok:
                        return out
                    out.accuracy = self._accuracy(s, name)
                    if out.accuracy is not None and not out.accuracy.ok:
                        return out
                self._measure(s, name, cfg, anchor, out, compiled_before=out.verification is not None,
                              deadline=deadline)
                if trace:
                    out.logdir = self._trace(s, name)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing transform is a value, not a crash
            out.failure = Failure.of(e, oom=is_oom(e))
            return out
        self.variant_times.append(time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ accuracy (the model file's evaluate)
    @property
    def accuracy_steps(self) -> int:
        return len(self.reference.losses) if self.reference is not None else 0

    def _accuracy(self, s: Session, name: str) -> Optional[AccuracyCheck]:
        """A session's evaluate() metrics beside the baseline's (it was trained by record_run
        like the baseline); None when the model file has no evaluate()."""
        if self.reference_metrics is None:
            return None
        self.progress("verify", f"{name}: evaluate(model) beside the baseline's", variant=name)
        return compare_metrics(self.reference_metrics, evaluate_session(s), self.search_settings.accuracy_tolerance,
                               self.accuracy_steps)

    def baseline_accuracy(self) -> Optional[AccuracyCheck]:
        """The baseline's evaluate() metrics (beside themselves); None without evaluate()."""
        if self.reference_metrics is None:
            return None
        m = self.reference_metrics
        return compare_metrics(m, m, self.search_settings.accuracy_tolerance, self.accuracy_steps)

    def accuracy(self, cfg: ExecConfig) -> Optional[AccuracyCheck]:
        """A configuration built afresh, trained the baseline's verification steps (record_run)
        and evaluated beside the baseline; None without evaluate()."""
        if self.reference_metrics is None:
            return None
        with Session(self.workload, cfg, build_loader=False) as s:  # record_run makes its own batches
            record_run(s)  # the same steps as the baseline's reference run
            return self._accuracy(s, "final")

    def _measure(self, s: Session, name: str, cfg: ExecConfig, anchor: Optional[Point], out: Outcome, *,
                 compiled_before: bool, deadline: Optional[float]) -> None:
        flops = self.flops(cfg)
        if anchor is None:
            self.progress("measure", f"{name}: measuring", variant=name,
                          compiling=not compiled_before and _compiles(cfg))
            out.measurement = measure(s, self.caps, self.measure_settings, flops_per_step=flops)
            return
        what = "the baseline" if anchor.config == self.base_cfg else "the current best"
        self.progress("measure", f"{name}: measuring, in alternating rounds with {what}", variant=name,
                      compiling=_compiles(cfg, anchor.config))
        out.pair = self._against(s, anchor.config, flops, deadline)
        out.measurement = out.pair.measurement

    def _against(self, s: Session, anchor: ExecConfig, flops: Optional[float], deadline: Optional[float],
                 extend: bool = True) -> Paired:
        ss = self.search_settings
        policy = RoundPolicy(rounds=ss.rounds, max_rounds=ss.max_rounds if extend else ss.rounds, deadline=deadline)
        return measure_against(s, lambda: Session(self.workload, anchor), self.caps, self.measure_settings,
                               flops_per_step=flops, anchor_flops=self.flops(anchor), policy=policy)

    def measure_alone(self, cfg: ExecConfig) -> Measurement:
        with Session(self.workload, cfg) as s:
            return measure(s, self.caps, self.measure_settings, flops_per_step=self.flops(cfg))

    def measure_pair(self, anchor: ExecConfig, cfg: ExecConfig, *, deadline: Optional[float] = None,
                     extend: bool = True) -> Paired:
        with Session(self.workload, cfg) as s:
            return self._against(s, anchor, self.flops(cfg), deadline, extend)

    def convergence(self, before: ExecConfig, cfg: ExecConfig, steps: int) -> Optional[dict]:
        """The convergence check of a change of training (autoopt.run.convergence)."""
        from autoopt.run.convergence import check_convergence

        return check_convergence(self.workload, before, cfg, steps)

    def memory_budget_mb(self, fraction: float) -> Optional[float]:
        total = self.caps.total_memory_mb or (cpu_memory_total_mb() if self.caps.device_type == "cpu" else None)
        return total * fraction if total else None

    def final(self, baseline: ExecConfig, best: Point) -> FinalMeasurement:
        """Baseline and best in alternating rounds, so the reported speedup is not an artefact
        of the machine's speed drifting during the search; then the best is traced."""
        self.progress("final", "final: re-measuring the baseline and the final configuration side by side")
        with Session(self.workload, baseline) as sb, Session(self.workload, best.config) as sf:
            base_m, m = measure_side_by_side(sb, sf, self.caps, self.measure_settings,
                                             flops_a=self.flops(baseline), flops_b=self.flops(best.config))
            logdir = self._trace(sf, "final") if self.tb_dir is not None else None
        return FinalMeasurement(base_m, m, logdir)
