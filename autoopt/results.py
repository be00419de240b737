"""What a run produces, as typed values whose `to_json()` is the public schema.

- `Variant`: one configuration the search tried (or skipped), with how it was judged
  (`Decision`) or why it failed (`Failure`, which keeps the traceback for --debug);
- `FinalResult`: the kept configuration re-measured beside the baseline;
- `Report`: everything `autoopt optimize` writes to report.json (and prints with --json);
- `ProfileResult`: what `autoopt profile` prints with --json.

`tests/data/golden/` pins the keys these produce; add keys freely, never rename or drop one.
Torch-free.
"""
from __future__ import annotations

import dataclasses
import traceback as _tb
from dataclasses import dataclass, field
from typing import Any, Optional

from autoopt.types import AccuracyCheck, ExecConfig, Finding, Measurement, Stats, Status, Verification

TRACEBACK_CHARS = 8000


def _round(x: Optional[float], n: int) -> Optional[float]:
    return None if x is None else round(x, n)


@dataclass
class Failure:
    """Why a configuration could not be measured: a value, not a crash. `kind` is "out of
    memory" or the exception's type; `traceback` is kept for --debug and report.json."""

    kind: str
    message: str
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException, *, oom: bool = False) -> "Failure":
        text = " ".join(str(exc).split())
        tb = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls("out of memory" if oom else type(exc).__name__, text, tb[-TRACEBACK_CHARS:])

    @property
    def summary(self) -> str:
        """One line for tables: the kind and the start of the message."""
        first = self.message[:300]
        return f"{self.kind}: {first}" if first else self.kind

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Failure":
        return cls(data.get("kind", ""), data.get("message", ""), data.get("traceback", ""))


@dataclass
class Decision:
    """How a keep decision was made: the throughput ratio over the configuration the variant
    had to beat (`anchor`), the noise it had to exceed, and how it was measured. `settled` is
    False when the call was too close: the ratio's interval still reached both a gain worth
    keeping and none when the rounds ran out (`cut_short`: the time budget ended them, not
    the maximum number of rounds); such a variant is not kept."""

    better: bool
    ratio: float
    noise: float
    anchor: str  # "the baseline" | "the current best" | "batch 64" ...
    rounds: int = 0  # alternating rounds measured side by side; 0 when measured apart
    settled: bool = True
    cut_short: bool = False
    # the anchor as measured in the same rounds (the variant's own numbers are its measurement)
    anchor_step_time_ms: Optional[float] = None
    anchor_throughput_per_s: Optional[float] = None

    @property
    def how(self) -> str:
        if self.rounds:
            return f"side by side in {self.rounds} rounds"
        return "measured apart (the two did not fit side by side)"

    @property
    def interval(self) -> tuple[float, float]:
        return self.ratio / (1 + self.noise), self.ratio * (1 + self.noise)

    @property
    def unsettled_why(self) -> str:
        return "the time budget ended its rounds" if self.cut_short else "still within the noise after the most rounds"

    def to_json(self) -> dict[str, Any]:
        low, high = self.interval
        return {"better": self.better, "ratio": round(self.ratio, 4), "noise": round(self.noise, 4),
                "low": round(low, 4), "high": round(high, 4), "anchor": self.anchor, "rounds": self.rounds,
                "how": self.how, "settled": self.settled, "cut_short": self.cut_short,
                "anchor_step_time_ms": _r(self.anchor_step_time_ms),
                "anchor_throughput_per_s": _r(self.anchor_throughput_per_s)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Decision":
        return cls(data["better"], data["ratio"], data["noise"], data["anchor"], data.get("rounds", 0),
                   data.get("settled", True), data.get("cut_short", False), data.get("anchor_step_time_ms"),
                   data.get("anchor_throughput_per_s"))


def _r(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(x, digits)


@dataclass
class NoiseCheck:
    """The baseline measured beside itself in alternating rounds: what this machine, now,
    can tell apart. Its ratio should be 1; how far it strays, plus its interval, is the
    smallest gain a side-by-side call can resolve (`resolvable`, at least `floor`)."""

    ratio: float
    half_width: float
    rounds: int
    floor: float

    NOISY = 0.10  # beyond this the advice is given

    @property
    def resolvable(self) -> float:
        return max(self.floor, abs(self.ratio - 1) + self.half_width)

    def line(self) -> str:
        low, high = self.ratio / (1 + self.half_width), self.ratio * (1 + self.half_width)
        text = (f"noise check: the baseline beside itself, {self.rounds} rounds: {self.ratio:.2f}x "
                f"({low:.2f}x-{high:.2f}x); gains under ~{self.resolvable:.0%} cannot be told from noise "
                "on this machine now")
        if self.resolvable > self.NOISY:
            text += ("; to resolve smaller gains, stop other work on this machine, give the search more time "
                     "(--time-budget), or run on a GPU")
        return text

    def to_json(self) -> dict[str, Any]:
        return {"ratio": round(self.ratio, 4), "half_width": round(self.half_width, 4), "rounds": self.rounds,
                "floor": self.floor, "resolvable_gain": round(self.resolvable, 4), "message": self.line()}


def _verification_json(v: Optional[Verification]) -> Optional[dict[str, Any]]:
    return None if v is None else dataclasses.asdict(v)


@dataclass
class Variant:
    """One configuration the search tried, or a finding it skipped, and what became of it."""

    name: str
    codes: list[str]
    transforms: list[dict[str, Any]]  # [{"name": "amp", "params": {...}}]
    accepted: bool
    status: Status
    reason: str = ""
    config: Optional[ExecConfig] = None
    measurement: Optional[Measurement] = None
    verification: Optional[Verification] = None
    speedup: Optional[float] = None  # over the baseline: chained side-by-side ratios
    logdir: Optional[str] = None
    expected_speedup: Optional[float] = None  # what the rules predicted for this combination
    safety: Optional[str] = None
    decision: Optional[Decision] = None
    failure: Optional[Failure] = None
    # the model file's evaluate() metrics beside the baseline's (None: no evaluate(), or not evaluated)
    accuracy: Optional[AccuracyCheck] = None
    # a changed batch's learning-rate rule (autoopt.transforms.batch_size.lr_rule), and the
    # convergence check of an accepted change of training (autoopt.run.convergence)
    lr_rule: Optional[dict[str, Any]] = None
    convergence: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    def to_json(self) -> dict[str, Any]:
        m, v = self.measurement, self.verification
        return {
            "name": self.name,
            "codes": self.codes,
            "transforms": self.transforms,
            "accepted": self.accepted,
            "status": self.status.value,
            "reason": self.reason,
            "step_time_ms": m.step_time_ms.to_json() if m else None,
            "batch_size": m.batch_size if m else None,
            "throughput_per_s": round(m.throughput_per_s, 3) if m else None,
            "speedup": _round(self.speedup, 4),
            "expected_speedup": _round(self.expected_speedup, 4),
            "max_abs_error": v.max_abs_error if v else None,
            "max_rel_error": v.max_rel_error if v else None,
            "tolerance": v.tolerance if v else None,
            "peak_memory_mb": None if not m or m.peak_memory_mb is None else round(m.peak_memory_mb, 2),
            "mfu": None if not m or m.mfu is None else round(m.mfu, 5),
            "compile_time_s": None if not m or m.compile_time_s is None else round(m.compile_time_s, 3),
            "logdir": self.logdir,
            "safety": self.safety,
            "ddp": self.config.ddp if self.config is not None else None,
            "decision": self.decision.to_json() if self.decision else None,
            "failure": self.failure.to_json() if self.failure else None,
            "config": self.config.to_json() if self.config is not None else None,
            "verification": _verification_json(v),
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "lr_rule": self.lr_rule,
            "convergence": self.convergence,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Variant":
        """The inverse of to_json, for results that cross a process boundary (a distributed
        job's rank 0 hands its variants to the parent)."""
        m = None
        if data.get("step_time_ms"):
            m = Measurement(
                step_time_ms=Stats.from_json(data["step_time_ms"]), batch_size=data.get("batch_size") or 0,
                throughput_per_s=data.get("throughput_per_s") or 0.0, peak_memory_mb=data.get("peak_memory_mb"),
                mfu=data.get("mfu"), compile_time_s=data.get("compile_time_s"),
                samples_per_step=data.get("samples_per_step") or 0)
            if data.get("measurement"):
                m = Measurement.from_json(data["measurement"])
        ver = Verification(**data["verification"]) if data.get("verification") else None
        return cls(
            name=data["name"], codes=list(data.get("codes") or []), transforms=list(data.get("transforms") or []),
            accepted=bool(data.get("accepted")), status=Status(data["status"]), reason=data.get("reason", ""),
            config=ExecConfig.from_json(data["config"]) if data.get("config") else None, measurement=m,
            verification=ver, speedup=data.get("speedup"), logdir=data.get("logdir"),
            expected_speedup=data.get("expected_speedup"), safety=data.get("safety"),
            decision=Decision.from_json(data["decision"]) if data.get("decision") else None,
            failure=Failure.from_json(data["failure"]) if data.get("failure") else None,
            accuracy=AccuracyCheck.from_json(data["accuracy"]) if data.get("accuracy") else None,
            lr_rule=data.get("lr_rule"), convergence=data.get("convergence"),
        )

    def wire_json(self) -> dict[str, Any]:
        """to_json plus the whole measurement (from_json rebuilds it exactly)."""
        d = self.to_json()
        d["measurement"] = self.measurement.to_json() if self.measurement else None
        return d


@dataclass
class FinalResult:
    """The final configuration, re-measured beside the baseline in alternating rounds (or
    the baseline itself, with a note, when nothing was kept)."""

    codes: list[str]
    transforms: list[dict[str, Any]]
    speedup: float
    speedup_low: float
    speedup_high: float
    measurement: Measurement
    baseline_remeasured: Optional[Measurement] = None
    note: Optional[str] = None
    ddp: Optional[dict] = None
    accuracy: Optional[AccuracyCheck] = None  # only with the model file's evaluate()
    # the speedup with training unchanged (same batch size and semantics: the kept transforms
    # minus those that change training), its 95 % interval and how it was measured; None
    # where not measured. `semantic_changes` names what the final changes in training, if anything.
    fixed_batch_speedup: Optional[float] = None
    fixed_batch_low: Optional[float] = None
    fixed_batch_high: Optional[float] = None
    fixed_batch_how: str = ""
    semantic_changes: str = ""

    def set_fixed_batch(self, speedup: Optional[float], low: Optional[float], high: Optional[float],
                        how: str) -> "FinalResult":
        self.fixed_batch_speedup, self.fixed_batch_low, self.fixed_batch_high = speedup, low, high
        self.fixed_batch_how = how
        return self

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        out: dict[str, Any] = {
            "codes": self.codes, "transforms": self.transforms, "speedup": round(self.speedup, 4),
            "speedup_low": round(self.speedup_low, 4), "speedup_high": round(self.speedup_high, 4),
            "step_time_ms": m.step_time_ms.to_json(), "throughput_per_s": round(m.throughput_per_s, 3),
            "peak_memory_mb": _round(m.peak_memory_mb, 2), "batch_size": m.batch_size, "mfu": _round(m.mfu, 5),
            "fixed_batch_speedup": _round(self.fixed_batch_speedup, 4),
            "fixed_batch_low": _round(self.fixed_batch_low, 4), "fixed_batch_high": _round(self.fixed_batch_high, 4),
            "fixed_batch_how": self.fixed_batch_how or None, "semantic_changes": self.semantic_changes or None,
        }
        if self.baseline_remeasured is not None:
            out["baseline_remeasured"] = self.baseline_remeasured.to_json()
        if self.note:
            out["note"] = self.note
        if self.ddp is not None:
            out["ddp"] = self.ddp
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], measurement: Measurement) -> "FinalResult":
        base = data.get("baseline_remeasured")
        return cls(codes=list(data.get("codes") or []), transforms=list(data.get("transforms") or []),
                   speedup=data["speedup"], speedup_low=data["speedup_low"], speedup_high=data["speedup_high"],
                   measurement=measurement, baseline_remeasured=Measurement.from_json(base) if base else None,
                   note=data.get("note"), ddp=data.get("ddp"),
                   accuracy=AccuracyCheck.from_json(data["accuracy"]) if data.get("accuracy") else None,
                   fixed_batch_speedup=data.get("fixed_batch_speedup"), fixed_batch_low=data.get("fixed_batch_low"),
                   fixed_batch_high=data.get("fixed_batch_high"), fixed_batch_how=data.get("fixed_batch_how") or "",
                   semantic_changes=data.get("semantic_changes") or "")


@dataclass
class SearchSummary:
    """How the search went: its strategy and cost, the time budget, what the budget left
    unmeasured, the calls too close to settle, and the baseline's noise check."""

    strategy: str
    variants_tried: int
    time_s: float
    time_budget_s: Optional[float] = None
    budget_spent: bool = False
    unmeasured: list[str] = field(default_factory=list)
    unsettled: list[dict[str, Any]] = field(default_factory=list)
    noise: Optional[NoiseCheck] = None

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "variants_tried": self.variants_tried, "time_s": round(self.time_s, 2),
                "time_budget_s": self.time_budget_s, "budget_spent": self.budget_spent,
                "unmeasured": list(self.unmeasured), "unsettled": list(self.unsettled),
                "noise": self.noise.to_json() if self.noise else None}

    @classmethod
    def from_json(cls, strategy: str, data: dict[str, Any]) -> "SearchSummary":
        n = data.get("noise")
        noise = NoiseCheck(n["ratio"], n["half_width"], n["rounds"], n.get("floor", 0.02)) if n else None
        return cls(strategy, data.get("variants_tried", 0), data.get("time_s", 0.0),
                   time_budget_s=data.get("time_budget_s"), budget_spent=data.get("budget_spent", False),
                   unmeasured=list(data.get("unmeasured") or []), unsettled=list(data.get("unsettled") or []),
                   noise=noise)


@dataclass
class DistributedInfo:
    """The job a distributed report describes."""

    nproc: int
    world_size: Optional[int]
    backend: Optional[str]
    global_batch_size: int
    baseline_per_rank: list[dict[str, Any]] = field(default_factory=list)
    per_rank: list[dict[str, Any]] = field(default_factory=list)
    ddp_snippet: str = ""
    launcher: list[str] = field(default_factory=list)


@dataclass
class Report:
    """report.json: everything one `autoopt optimize` run measured and decided."""

    model: str
    model_path: str
    device: dict[str, Any]
    mode: Optional[str]
    batch_size: Optional[int]
    seed: int
    created_at: str
    autoopt_version: str
    torch_version: str
    baseline: Optional[Measurement]
    findings: list[dict[str, Any]]  # Finding.to_json() plus "accepted" and the rule's "doc"
    variants: list[Variant]
    final: Optional[FinalResult]
    search: SearchSummary
    artifacts: dict[str, str]
    batch_search: Optional[list[dict[str, Any]]] = None
    analysis: dict[str, Any] = field(default_factory=dict)
    patch: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    wall_time_s: float = 0.0
    distributed: Optional[DistributedInfo] = None
    # an interrupted run's {"signal", "phase", "measured", "not_measured"} (only then in report.json)
    interruption: Optional[dict[str, Any]] = None
    # the patched file's check before patch.diff is written: {"checked", "ok", "reason"} (None: no patch tried)
    patch_check: Optional[dict[str, Any]] = None
    # gradient health of the baseline's verification steps (autoopt.run.health; None: not measured)
    health: Optional[dict[str, Any]] = None
    # `optimize --script`: the script, its arguments, how reproducible its losses were, the source
    # lines the patch edits (None for a model file: then report.json has no "script" key)
    script: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        d = self.distributed
        out: dict[str, Any] = {"model": self.model, "model_path": self.model_path, "device": self.device,
                               "mode": self.mode, "batch_size": self.batch_size}
        if d is not None:
            out.update(global_batch_size=d.global_batch_size, nproc=d.nproc, world_size=d.world_size,
                       backend=d.backend, distributed=True)
        out.update({
            "seed": self.seed, "created_at": self.created_at, "autoopt_version": self.autoopt_version,
            "torch_version": self.torch_version,
            "baseline": self.baseline.to_json() if self.baseline else None,
        })
        if d is not None:
            out["baseline_per_rank"] = d.baseline_per_rank
        out.update({
            "findings": self.findings,
            "variants": [v.to_json() for v in self.variants],
            "final": self.final.to_json() if self.final else None,
            "search": self.search.to_json(),
            "batch_search": self.batch_search,
            "analysis": self.analysis,
        })
        if d is not None:
            out.update(per_rank=d.per_rank, ddp_snippet=d.ddp_snippet, launcher=d.launcher)
        out.update({"patch": self.patch, "plan": self.plan, "notes": self.notes, "interrupted": self.interrupted,
                    "wall_time_s": round(self.wall_time_s, 2), "artifacts": self.artifacts})
        out["patch_check"] = self.patch_check
        out["health"] = self.health
        if self.interruption is not None:
            out["interruption"] = self.interruption
        if self.script is not None:
            out["script"] = self.script
        return out


def finding_entry(f: Finding, *, accepted: bool, doc: str = "") -> dict[str, Any]:
    """A finding as report.json lists it: its JSON form, whether it was accepted, the rule's doc."""
    return {**f.to_json(), "accepted": accepted, "doc": doc}


@dataclass
class ProfileResult:
    """`autoopt profile --json`: the trace analysis (autoopt.analyze's result, at the top
    level) with the model, the device, the timed measurement, the log directory and the
    findings. `extra` holds what a distributed job or a script run adds."""

    analysis: dict[str, Any]
    model: str
    model_path: str
    mode: Optional[str]
    device: Optional[dict[str, Any]]
    measurement: Optional[dict[str, Any]]
    logdir: str
    findings: list[Finding]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.analysis)
        out.update({"model": self.model, "model_path": self.model_path, "mode": self.mode, "device": self.device,
                    "measurement": self.measurement})
        out.update(self.extra)
        out.update({"logdir": self.logdir, "findings": [f.to_json() for f in self.findings]})
        return out
