"""The values the search moves: a Candidate (a transform a finding proposed, with the parameter
sets worth measuring), a Point (a configuration the search reached, with its measurement and
speedup over the baseline) and an Outcome (what the evaluator saw of one configuration)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from autoopt.results import Failure
from autoopt.run.measure import Paired
from autoopt.transforms.base import Transform
from autoopt.types import AccuracyCheck, ExecConfig, Finding, Measurement, Verification


@dataclass
class Candidate:
    """A transform to try: the finding that proposed it (or the --try request), its resolved
    parameters, and other parameter sets worth measuring (torch.compile's modes, DDP bucket
    sizes); `options` empty means `params` only."""

    code: str
    finding: Finding
    transform: Transform
    params: dict
    options: list[dict] = field(default_factory=list)

    def with_params(self, params: dict) -> "Candidate":
        return Candidate(self.code, self.finding, self.transform, dict(params), [])

    @property
    def all_options(self) -> list[dict]:
        return self.options or [self.params]

    def transform_json(self) -> dict:
        return {"name": self.transform.name, "params": self.params}


@dataclass
class Point:
    """A configuration the search reached: the transforms chosen, its measurement, its speedup
    over the baseline (the product of the side-by-side ratios that led to it) and its trace."""

    config: ExecConfig
    chosen: list[Candidate]
    measurement: Measurement
    speedup: float = 1.0
    logdir: Optional[str] = None

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.chosen]

    @property
    def label(self) -> str:
        return "+".join(self.codes)


@dataclass
class Outcome:
    """What the evaluator saw of one configuration: verified (or not), measured (beside its
    anchor when it had one), traced — or the failure that stopped it."""

    measurement: Optional[Measurement] = None
    verification: Optional[Verification] = None
    pair: Optional[Paired] = None
    logdir: Optional[str] = None
    failure: Optional[Failure] = None
    accuracy: Optional[AccuracyCheck] = None  # the model file's evaluate() beside the baseline's, when it has one

    @property
    def verified(self) -> bool:
        return self.failure is None and (self.verification is None or self.verification.ok)
