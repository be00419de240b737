"""The evaluator of a distributed job: every rank runs the same search (autoopt.search) with
this evaluator, which builds each configuration as a DistributedDataParallel Session on every
rank and makes every decision from numbers gathered from all ranks, so the ranks decide alike.

- Verification: each rank trains its own batches and compares losses and the parameters
  reached with its baseline reference; the job's verdict is the worst rank's.
- Measurement: fixed step counts (ranks that stopped at different steps would wait in a
  collective forever); side by side with the anchor in alternating rounds, each round's
  medians reduced to the job's (the slowest rank's) before the ratio is taken, so every rank
  computes the same ratios and takes the same number of rounds.
- A synchronous job runs at its slowest rank's pace: the job's measurement is the slowest
  rank's step time and the global samples per second (`job_measurement`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

from autoopt.results import Failure
from autoopt.run.measure import Paired, RoundPolicy, count_flops, measure, measure_against, measure_side_by_side
from autoopt.run.session import DistContext, Session, is_oom
from autoopt.run.trace import trace_session
from autoopt.run.verify import RunRecord, compare, record_run
from autoopt.search.evaluator import FinalMeasurement
from autoopt.search.trial import Outcome, Point
from autoopt.settings import MeasureSettings, ProfileSettings, SearchSettings
from autoopt.types import Capabilities, ExecConfig, Measurement, Verification, Workload


def gather(obj) -> list:
    """`obj` from every rank, in rank order (torch.distributed.all_gather_object)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def job_measurement(per_rank: list[Measurement], ranks: Optional[list[int]] = None) -> Measurement:
    """The job's measurement: the slowest rank's step time (by median), the global samples per
    step and per second, the largest peak memory and the smallest MFU."""
    ranks = ranks if ranks is not None else list(range(len(per_rank)))
    i = max(range(len(per_rank)), key=lambda k: per_rank[k].step_time_ms.median)
    slow = per_rank[i]
    samples = sum(m.samples_per_step for m in per_rank)
    peaks = [m.peak_memory_mb for m in per_rank if m.peak_memory_mb is not None]
    mfus = [m.mfu for m in per_rank if m.mfu is not None]
    return Measurement(step_time_ms=slow.step_time_ms, batch_size=slow.batch_size,
                       throughput_per_s=samples / (slow.step_time_ms.median / 1000.0),
                       peak_memory_mb=max(peaks) if peaks else None, flops_per_step=slow.flops_per_step,
                       mfu=min(mfus) if mfus else None, compile_time_s=slow.compile_time_s,
                       warmup_steps=slow.warmup_steps, samples_per_step=samples, slowest_rank=ranks[i])


def _gathered_measurement(m: Measurement, rank: int) -> tuple[Measurement, list[dict]]:
    """The job's measurement from every rank's, and the per-rank rows (with their rank)."""
    rows = gather(dict(m.to_json(), rank=rank))
    per_rank = [Measurement.from_json(r) for r in rows]
    return job_measurement(per_rank, [r["rank"] for r in rows]), rows


def _round_reducer(ta: float, tb: float) -> tuple[float, float]:
    """One alternating round's medians, the job's: the slowest rank's, for both."""
    rows = gather((ta, tb))
    return max(r[0] for r in rows), max(r[1] for r in rows)


def _worst(vers: list[Optional[dict]]) -> tuple[Verification, Optional[int]]:
    """The job's verdict: the first failing rank's, else the largest error's."""
    vs = [Verification(**v) for v in vers]
    bad = next((r for r, v in enumerate(vs) if not v.ok), None)
    if bad is not None:
        v = vs[bad]
        v.reason = f"rank {bad}: {v.reason}"
        return v, bad
    return max(vs, key=lambda v: v.max_rel_error or 0.0), None


class DistributedEvaluator:
    """Evaluates configurations on every rank of the job this process belongs to."""

    def __init__(self, workload: Workload, caps: Capabilities, *, rank: int, measure_settings: MeasureSettings,
                 profile_settings: ProfileSettings, search_settings: SearchSettings, tb_dir: Optional[Path],
                 device_ids: Optional[list[int]] = None, before_step: Optional[Callable[[], None]] = None,
                 trace_variants: bool = False):
        self.workload = workload
        self.caps = caps
        self.rank = rank
        self.measure_settings = measure_settings.fixed(search_settings.rounds)
        self.profile_settings = profile_settings
        self.search_settings = search_settings
        self.tb_dir = tb_dir
        self.trace_variants = trace_variants
        self.dist = DistContext(rank=rank, device_ids=device_ids, before_step=before_step)
        self.reference: Optional[RunRecord] = None
        self.base_cfg: Optional[ExecConfig] = None
        self.flops_per_sample: Optional[float] = None
        self.baseline_per_rank: list[dict] = []
        self.traces: list[str] = []

    def session(self, cfg: ExecConfig) -> Session:
        return Session(self.workload, cfg, dist=self.dist)

    def flops(self, cfg: ExecConfig) -> Optional[float]:
        if not self.flops_per_sample:
            return None
        return self.flops_per_sample * cfg.batch_size * max(1, cfg.grad_accum_steps or 1)

    def trace(self, s: Session, name: str) -> Optional[str]:
        """This rank's trace into the job's run directory tb/<name> (one file per rank)."""
        if self.tb_dir is None:
            return None
        run = trace_session(s, self.tb_dir / name, self.profile_settings, worker_name=f"rank{self.rank}")
        self.traces += [str(p) for p in run.trace_files if p.name.startswith(f"rank{self.rank}.")]
        return str(run.run_dir)

    # ------------------------------------------------------------------ the interface
    def baseline(self, cfg: ExecConfig) -> Point:
        self.base_cfg = cfg
        with self.session(cfg) as s:
            self.reference = record_run(s, keep_params=True)
            logdir = self.trace(s, "baseline")  # before timing: see autoopt.search.local
            flops = count_flops(s)
            self.flops_per_sample = flops / s.samples_per_step if flops else None
            m = measure(s, self.caps, self.measure_settings, flops_per_step=flops)
        job, self.baseline_per_rank = _gathered_measurement(m, self.rank)
        return Point(cfg, [], job, 1.0, logdir)

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer on every rank (clocks differ a little: one rank's deadline decides)."""
        return bool(gather(flag)[0])

    def trial(self, name: str, cfg: ExecConfig, *, tolerance: float, anchor: Optional[Point],
              verify: bool = True, trace: bool = True, deadline: Optional[float] = None) -> Outcome:
        # Every rank makes the same collective calls whatever fails locally: the verdicts are
        # gathered once after verification and once after measurement.
        local: dict[str, Any] = {"failure": None, "verification": None}
        out = Outcome()
        m = None
        with contextlib.ExitStack() as stack:
            s = self._verify(stack, cfg, verify, tolerance, local)
            if self._all_verified(local, out):
                try:
                    m = self._measure(s, cfg, anchor, out, deadline)
                    if trace and self.trace_variants:
                        out.logdir = self.trace(s, name)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # a failing transform is a value: every rank reports it
                    local["failure"] = Failure.of(e, oom=is_oom(e)).to_json()
            return self._job_outcome(local, m, out)

    def _verify(self, stack: contextlib.ExitStack, cfg: ExecConfig, verify: bool, tolerance: float,
                local: dict) -> Optional[Session]:
        """Build the configuration's session (kept open on `stack`) and verify it on this rank."""
        try:
            s = stack.enter_context(self.session(cfg))
            if verify:
                local["verification"] = compare(self.reference, record_run(s, keep_params=True), tolerance).__dict__
            return s
        except KeyboardInterrupt:
            raise
        except Exception as e:
            local["failure"] = Failure.of(e, oom=is_oom(e)).to_json()
            return None

    def _all_verified(self, local: dict, out: Outcome) -> bool:
        """Gather the ranks' verdicts; True when every rank verified (or nothing was checked)."""
        everyone = gather(local)
        if any(x["failure"] for x in everyone):
            return False
        if all(x["verification"] is None for x in everyone):
            return True
        out.verification, _ = _worst([x["verification"] for x in everyone])
        return out.verification.ok

    def _measure(self, s: Session, cfg: ExecConfig, anchor: Optional[Point], out: Outcome,
                 deadline: Optional[float]) -> Measurement:
        if anchor is None:
            return measure(s, self.caps, self.measure_settings, flops_per_step=self.flops(cfg))
        out.pair = self._against(s, anchor.config, self.flops(cfg), deadline)
        return out.pair.measurement

    def _against(self, s: Session, anchor: ExecConfig, flops: Optional[float], deadline: Optional[float],
                 extend: bool = True) -> Paired:
        ss = self.search_settings
        policy = RoundPolicy(rounds=ss.rounds, max_rounds=ss.max_rounds if extend else ss.rounds, deadline=deadline,
                             reduce=_round_reducer, agree=self.agree)
        return measure_against(s, lambda: self.session(anchor), self.caps, self.measure_settings,
                               flops_per_step=flops, anchor_flops=self.flops(anchor), policy=policy)

    def _job_outcome(self, local: dict, m: Optional[Measurement], out: Outcome) -> Outcome:
        """Every rank's failures and measurement, gathered: the same outcome on every rank."""
        everyone = gather({"failure": local["failure"], "measurement": m.to_json() if m else None,
                           "rank": self.rank})
        failed = [(r, x["failure"]) for r, x in enumerate(everyone) if x["failure"]]
        if failed:
            first = Failure.from_json(failed[0][1])
            msg = "; ".join(f"rank {r}: {f['kind']}: {f['message'][:300]}" for r, f in failed)
            out.failure = Failure(first.kind, msg, first.traceback)
            return out
        rows = [x["measurement"] for x in everyone]
        if all(r is not None for r in rows):
            per_rank = [Measurement.from_json(r) for r in rows]
            out.measurement = job_measurement(per_rank, [x["rank"] for x in everyone])
            if out.pair is not None:
                anchor_m = out.pair.anchor
                out.pair = Paired(anchor_m, out.measurement, out.pair.round_ratios, out.pair.floor,
                                  cut_short=out.pair.cut_short)
        return out

    def measure_alone(self, cfg: ExecConfig) -> Measurement:
        with self.session(cfg) as s:
            m = measure(s, self.caps, self.measure_settings, flops_per_step=self.flops(cfg))
        return _gathered_measurement(m, self.rank)[0]

    def measure_pair(self, anchor: ExecConfig, cfg: ExecConfig, *, deadline: Optional[float] = None,
                     extend: bool = True) -> Paired:
        with self.session(cfg) as s:
            pair = self._against(s, anchor, self.flops(cfg), deadline, extend)
        job = _gathered_measurement(pair.measurement, self.rank)[0]
        return Paired(pair.anchor, job, pair.round_ratios, pair.floor, cut_short=pair.cut_short)

    def convergence(self, before: ExecConfig, cfg: ExecConfig, steps: int) -> Optional[dict]:
        """Not run in a distributed job (None): its ranks would each train the runs."""
        return None

    def memory_budget_mb(self, fraction: float) -> Optional[float]:
        return self.caps.total_memory_mb * fraction if self.caps.total_memory_mb else None

    def final(self, baseline: ExecConfig, best: Point) -> FinalMeasurement:
        with self.session(baseline) as sb, self.session(best.config) as sf:
            base_m, m = measure_side_by_side(sb, sf, self.caps, self.measure_settings,
                                             flops_a=self.flops(baseline), flops_b=self.flops(best.config))
            logdir = self.trace(sf, "final")
        return FinalMeasurement(_gathered_measurement(base_m, self.rank)[0],
                                _gathered_measurement(m, self.rank)[0], logdir)

