"""Every setting of a run, in one object of plain data, and the thresholds that decide.

`OptimizeSettings` is what `autoopt optimize` runs with: the CLI builds it from its flags,
the single-process pipeline reads it, and a distributed job hands it to every rank as JSON
(`to_dict` / `from_dict`), so both paths run with the same numbers. `--quick` means
`MeasureSettings.quick()` on both.

The decision thresholds live here, once:
- SIDE_BY_SIDE_FLOOR: a gain measured side by side (alternating rounds with the
  configuration it must beat) must still be at least 2 %;
- APART_FLOOR: two measurements taken apart must differ by two standard errors of their
  medians, and at least 3 % (a shared machine drifts between them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SIDE_BY_SIDE_FLOOR = 0.02
APART_FLOOR = 0.03
DEFAULT_TIME_BUDGET_S = 600.0


@dataclass
class MeasureSettings:
    """Timed steps: warm-up first, then steps until both a minimum count and a minimum time
    are reached (or a maximum of either). Equal min and max steps with no time limits give a
    fixed number of steps, which a distributed job needs (ranks must step alike)."""

    warmup_steps: int = 3
    warmup_min_s: float = 0.3
    min_steps: int = 10
    max_steps: int = 200
    min_time_s: float = 1.5
    max_time_s: float = 20.0

    @classmethod
    def quick(cls) -> "MeasureSettings":
        """For smoke tests (--quick): few steps; the numbers are real but noisy."""
        return cls(warmup_steps=2, warmup_min_s=0.0, min_steps=5, max_steps=20, min_time_s=0.2, max_time_s=5.0)

    @property
    def fixed_count(self) -> bool:
        return self.min_steps == self.max_steps and self.min_time_s == 0 and self.warmup_min_s == 0

    def fixed(self, rounds: int = 6) -> "MeasureSettings":
        """These settings as a fixed number of steps (for the ranks of a distributed job): the
        warm-up count, and steps enough for `rounds` alternating rounds of at least two steps
        (settings that are already a fixed count stay as they are)."""
        if self.fixed_count:
            return self
        steps = max(self.min_steps, 2 * rounds)
        return MeasureSettings(warmup_steps=self.warmup_steps, warmup_min_s=0.0, min_steps=steps, max_steps=steps,
                               min_time_s=0.0, max_time_s=1e9)

    def round_share(self, rounds: int) -> "MeasureSettings":
        """One round's share of a measurement taken in `rounds` alternating rounds (no warm-up)."""
        return MeasureSettings(warmup_steps=0, warmup_min_s=0.0, min_steps=max(1, self.min_steps // rounds),
                               max_steps=max(1, self.max_steps // rounds), min_time_s=self.min_time_s / rounds,
                               max_time_s=self.max_time_s / rounds)


@dataclass
class ProfileSettings:
    """torch.profiler's schedule and what it records."""

    wait: int = 1
    warmup: int = 2
    active: int = 3
    record_shapes: bool = True
    profile_memory: bool = True
    with_stack: bool = False  # stacks point findings at source lines; they make traces larger


@dataclass
class SearchSettings:
    """How the search spends its measurements."""

    strategy: str = "greedy"  # greedy | exhaustive
    rounds: int = 6  # alternating rounds of a side-by-side decision
    max_rounds: int = 18  # while a decision is unsettled, three more rounds at a time, up to this
    memory_budget_fraction: float = 0.9  # the batch search stays under this share of the device's memory
    max_batch: int = 4096
    compile_modes: Optional[tuple[str, ...]] = None  # torch.compile modes to measure (None: what the device merits)
    follow_diagnosis: bool = True  # re-run the rules on each new best configuration's trace
    max_diagnosis_rounds: int = 3
    # seconds from the start of the run to the end of the search (the final re-measurement
    # comes after); None: no limit. Trials that would not finish in time are not started.
    time_budget_s: Optional[float] = DEFAULT_TIME_BUDGET_S
    noise_check: bool = True  # the baseline beside itself, before the search: what gain can be resolved
    # how far a model file's evaluate() metric may get worse than the baseline's: this x max(|baseline|, 1)
    accuracy_tolerance: float = 0.01
    # optimizer steps of the convergence check of an accepted change of training
    # (autoopt.run.convergence); None: sized to the step time and the budget; 0: no check
    convergence_steps: Optional[int] = None


@dataclass
class Consent:
    """Which findings may be applied: --yes, --accept CODES, --reject CODES. Codes are rule
    codes or transform names, upper-cased. `--yes` accepts `safe` and `unsafe` transforms
    (numerics verified within tolerance), never a `manual` one that changes training (batch
    size, gradient accumulation): that is applied only when named (`--accept AO402` or
    `--accept batch_size`) or accepted at the prompt. Without a terminal and without --yes /
    --accept, only `safe` transforms are applied."""

    yes: bool = False
    accept: list[str] = field(default_factory=list)
    reject: list[str] = field(default_factory=list)

    def named(self, code: str, transform: str) -> bool:
        """Whether --accept names this finding (by rule code or transform name)."""
        return bool({code.upper(), transform.upper()} & {c.upper() for c in self.accept})

    def decide(self, code: str, transform: str, safety: str) -> Optional[bool]:
        """True / False when the flags decide, None when a person should be asked."""
        names = {code.upper(), transform.upper()}
        if names & {c.upper() for c in self.reject}:
            return False
        if self.named(code, transform):
            return True
        if self.yes:
            return str(safety) != "manual"  # --yes never changes training unasked
        if self.accept:
            return False
        return None

    def unattended(self, code: str, transform: str, safety: str) -> bool:
        """The decision with nobody to ask: the flags', else only what keeps numerics and
        training semantics."""
        d = self.decide(code, transform, safety)
        return d if d is not None else str(safety) == "safe"


def manual_skip_reason(code: str, transform: str) -> str:
    """Why a `manual` finding was not applied, and how to apply it."""
    return (f"not applied: {code} {transform} changes training; pass --accept {code} to try it "
            "(--yes accepts only transforms that keep training the same)")


@dataclass
class DistributedSettings:
    """A --nproc job: the launcher and its bounds."""

    nproc: int = 0
    launcher_args: list[str] = field(default_factory=list)
    timeout_s: float = 1800.0
    collective_timeout_s: float = 300.0
    backend: Optional[str] = None  # None: nccl on GPUs, gloo on CPUs


@dataclass
class OptimizeSettings:
    """One `autoopt optimize` run."""

    model_path: Optional[str] = None
    device: str = "auto"
    batch_size: Optional[int] = None
    seed: int = 0
    out_dir: Optional[str] = None
    force: bool = False  # --force: an --out that holds a report is cleared and reused
    reports_root: str = "reports"
    trace: bool = True
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    consent: Consent = field(default_factory=Consent)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    # transforms to measure whether or not a rule proposes them (--try): [["amp", {"dtype": "float16"}]]
    extra_transforms: list = field(default_factory=list)
    # `optimize --script FILE -- ARGS`: an unmodified training script instead of a model file
    script_path: Optional[str] = None
    script_args: list = field(default_factory=list)
    script_cwd: Optional[str] = None  # the directory the script runs in (default: autoopt's)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OptimizeSettings":
        nested = {"measure": MeasureSettings, "profile": ProfileSettings, "search": SearchSettings,
                  "consent": Consent, "distributed": DistributedSettings}
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in nested and isinstance(v, dict):
                v = nested[f.name](**v)
            kw[f.name] = v
        s = cls(**kw)
        if s.search.compile_modes is not None:
            s.search.compile_modes = tuple(s.search.compile_modes)
        s.extra_transforms = [(str(n), dict(p)) for n, p in s.extra_transforms]
        return s
