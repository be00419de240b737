"""The evaluator interface: how the search has a configuration built, verified, measured and
traced, without knowing where it runs. One process (autoopt.search.local.LocalEvaluator) and
every rank of a distributed job (autoopt.distributed.evaluator.DistributedEvaluator) implement
it; the strategies and their keep decisions are the same on both."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from autoopt.run.measure import Paired
from autoopt.search.trial import Outcome, Point
from autoopt.types import Capabilities, ExecConfig, Measurement, Workload


@dataclass
class FinalMeasurement:
    """Baseline and final configuration re-measured in alternating rounds."""

    baseline: Measurement
    final: Measurement
    logdir: Optional[str] = None


class Evaluator(Protocol):
    workload: Workload
    caps: Capabilities

    def baseline(self, cfg: ExecConfig) -> Point:
        """Build the model file as written: record the reference run every variant is verified
        against, trace it, count its FLOPs and measure it."""

    def agree(self, flag: bool) -> bool:
        """One answer for the whole job (a distributed job: rank 0's), so that every rank takes
        the same path; in one process, `flag` itself."""

    def trial(self, name: str, cfg: ExecConfig, *, tolerance: float, anchor: Optional[Point],
              verify: bool = True, trace: bool = True, deadline: Optional[float] = None) -> Outcome:
        """One configuration: verified against the reference (when `verify`), measured beside
        `anchor` in alternating rounds (alone when None), traced (when `trace`). Rounds beyond
        the first ones (an unsettled call) end before `deadline` (time.perf_counter()). A
        failure is returned as a value."""

    def measure_alone(self, cfg: ExecConfig) -> Measurement:
        """One configuration timed on its own (may raise out of memory)."""

    def measure_pair(self, anchor: ExecConfig, cfg: ExecConfig, *, deadline: Optional[float] = None,
                     extend: bool = True) -> Paired:
        """`cfg` measured beside `anchor` in alternating rounds (may raise out of memory); more
        rounds while unsettled when `extend`, none that would end after `deadline`."""

    def convergence(self, before: ExecConfig, cfg: ExecConfig, steps: int) -> Optional[dict]:
        """`cfg` (a change of training) trained beside `before` for `steps` optimizer steps
        (autoopt.run.convergence): report.json's variant "convergence", or None when not run."""

    def memory_budget_mb(self, fraction: float) -> Optional[float]:
        """The memory a configuration may use: `fraction` of the device's (or host's)."""

    def final(self, baseline: ExecConfig, best: Point) -> FinalMeasurement:
        """Baseline and best re-measured side by side, and the best traced."""
