"""The data types that flow through autoopt, one way:

model file -> ModelSpec -> Workload -> Measurement / trace metrics -> Finding
-> accepted transforms (ExecConfig) -> verified Variant -> Report (autoopt.results).

This module imports nothing heavy (no torch), so the trace analysis path can use it.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional


class TextEnum(str, Enum):
    """An enum whose members are their string values everywhere: in JSON, in f-strings and
    in comparisons with plain strings ("kept" == Status.KEPT)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Safety(TextEnum):
    """What a transform risks. SAFE: the same results to fp32 tolerance; UNSAFE: changes
    numerics (verified within a looser tolerance); MANUAL: changes training semantics
    (batch size, accumulation) and is measured, never applied silently."""

    SAFE = "safe"
    UNSAFE = "unsafe"
    MANUAL = "manual"


class BatchTry(TextEnum):
    """What became of one batch size in the batch-size search (report.json "batch_search")."""

    OK = "ok"
    OOM = "oom"
    OVER_BUDGET = "over_budget"
    NO_GAIN = "no_gain"
    CHOSEN = "chosen"


class Status(TextEnum):
    """What became of a variant: KEPT (verified and faster beyond the noise), REJECTED
    (failed verification or not faster), FAILED (it raised: compile error, out of memory),
    SKIPPED (not accepted, or the transform does not apply)."""

    KEPT = "kept"
    REJECTED = "rejected"
    FAILED = "failed"
    SKIPPED = "skipped"


SAFETY_LEVELS = tuple(s.value for s in Safety)
VARIANT_STATUSES = tuple(s.value for s in Status)


@dataclass
class ModelSpec:
    """A loaded model file that satisfies the model-file contract (docs/contracts.md)."""

    path: Path
    name: str
    module: Any
    build_model: Callable[[], Any]
    make_batch: Callable[[int], Any]
    forward: Optional[Callable[[Any, Any], Any]] = None
    build_optimizer: Optional[Callable[[Any], Any]] = None
    build_dataloader: Optional[Callable[[int], Any]] = None
    default_batch_size: Optional[int] = None
    evaluate: Optional[Callable[[Any], Any]] = None  # held-out metrics: {name: float}

    @property
    def mode(self) -> str:
        return "train" if self.build_optimizer is not None else "infer"


@dataclass
class Capabilities:
    """What the device can do. Passed into every decision, never read from globals there,
    so CPU tests can exercise GPU logic with capabilities taken from real GPU traces."""

    device_type: str  # "cpu" | "cuda"
    name: str = ""
    compute_capability: Optional[tuple[int, int]] = None
    total_memory_mb: Optional[float] = None
    sm_count: Optional[int] = None
    bf16: bool = False  # fast bf16 math (Ampere+ GPU, or CPU with AVX-512 BF16 / AMX)
    fp16: bool = False  # fast fp16 math (GPU tensor cores)
    tf32: bool = False  # Ampere+
    tensor_cores: bool = False  # Volta+
    cpu_flags: tuple[str, ...] = ()
    vendor: str = ""  # "nvidia" | "amd" | "" (cpu)
    # peak dense throughput in TFLOP/s by math mode; None where unknown
    peak_tflops: dict[str, float] = field(default_factory=dict)

    @property
    def compute_capability_float(self) -> Optional[float]:
        if self.compute_capability is None:
            return None
        return float(f"{self.compute_capability[0]}.{self.compute_capability[1]}")

    def facts(self) -> dict[str, Any]:
        return {
            "device.type": self.device_type,
            "device.name": self.name,
            "device.vendor": self.vendor,
            "device.compute_capability": self.compute_capability_float,
            "device.memory_mb": self.total_memory_mb,
            "device.bf16": self.bf16,
            "device.fp16": self.fp16,
            "device.tf32": self.tf32,
            "device.tensor_cores": self.tensor_cores,
            "device.cpu_avx512_bf16": "avx512_bf16" in self.cpu_flags,
            "device.cpu_amx": "amx_bf16" in self.cpu_flags or "amx_tile" in self.cpu_flags,
        }

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["type"] = d.pop("device_type")
        d["compute_capability"] = (
            f"{self.compute_capability[0]}.{self.compute_capability[1]}" if self.compute_capability else None
        )
        return d


@dataclass(frozen=True)
class ExecConfig:
    """How one variant runs. Transforms only ever return a modified copy of this; the
    runner (autoopt.run.session) is the single place that turns it into a step function."""

    device: str = "cpu"
    batch_size: int = 32
    amp_dtype: Optional[str] = None  # "bfloat16" | "float16"
    grad_scaler: bool = False  # fp16 training needs loss scaling
    channels_last: bool = False
    compile_mode: Optional[str] = None  # None = eager; "default" | "max-autotune-no-cudagraphs" | "reduce-overhead"
    compile_backend: str = "inductor"
    matmul_precision: Optional[str] = None  # "high" enables TF32 matmuls (and cuDNN TF32)
    cudnn_benchmark: Optional[bool] = None
    optimizer_impl: Optional[str] = None  # "foreach" | "fused"
    dataloader: Optional[dict] = None  # num_workers, pin_memory, persistent_workers, prefetch_factor, intra_op_threads
    num_threads: Optional[int] = None  # intra-op threads (the `threads` transform); wins over the loader's
    cuda_graphs: bool = False
    activation_checkpointing: bool = False
    grad_accum_steps: int = 1
    inference_mode: bool = False
    weights_dtype: Optional[str] = None  # inference only: cast weights ("bfloat16" | "float16")
    # the DistributedDataParallel wrapper in a --nproc job (autoopt.transforms.ddp): bucket_cap_mb,
    # gradient_as_bucket_view, static_graph, no_sync; None outside a distributed job
    ddp: Optional[dict] = None
    # the learning-rate rule that goes with a changed batch (autoopt.transforms.batch_size):
    # every parameter group's lr times lr_scale, reached by a linear warm-up over
    # lr_warmup_steps optimizer steps; None / 0 leave the optimizer's lr alone
    lr_scale: Optional[float] = None
    lr_warmup_steps: int = 0

    def with_(self, **changes: Any) -> "ExecConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def compile_call_mode(self) -> Optional[str]:
        """The torch.compile mode this configuration runs under, None for eager. CUDA graphs
        are torch.compile's "reduce-overhead" mode; off a CUDA device that mode is "default"."""
        mode = "reduce-overhead" if self.cuda_graphs else self.compile_mode
        if mode == "reduce-overhead" and self.device != "cuda":
            return "default"
        return mode


@dataclass
class Workload:
    """A model file bound to a device, a batch size, a seed and a mode."""

    spec: ModelSpec
    caps: Capabilities
    batch_size: int
    seed: int = 0
    facts: dict[str, Any] = field(default_factory=dict)  # model.* and workload.* facts (see autoopt.facts)

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def device(self) -> str:
        return self.caps.device_type

    def base_config(self) -> ExecConfig:
        return ExecConfig(device=self.device, batch_size=self.batch_size)


@dataclass
class Stats:
    """Summary of repeated timings, in milliseconds."""

    median: float
    mean: float
    min: float
    max: float
    p25: float
    p75: float
    stdev: float
    n: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Stats":
        if not samples_ms:
            raise ValueError("no samples")
        s = sorted(samples_ms)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return cls(
            median=statistics.median(s),
            mean=statistics.fmean(s),
            min=s[0],
            max=s[-1],
            p25=q[0],
            p75=q[2],
            stdev=statistics.stdev(s) if len(s) > 1 else 0.0,
            n=len(s),
        )

    @property
    def rel_spread(self) -> float:
        """Interquartile range over the median: the measured noise of this measurement."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Stats":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class Measurement:
    """Timed steps of one configuration, measured apart from tracing."""

    step_time_ms: Stats
    batch_size: int
    throughput_per_s: float
    peak_memory_mb: Optional[float]
    flops_per_step: Optional[float] = None
    mfu: Optional[float] = None
    compile_time_s: Optional[float] = None
    warmup_steps: int = 0
    samples_per_step: int = 0  # batch size x micro-batches per step; 0 means batch_size
    slowest_rank: Optional[int] = None  # a distributed job's measurement: the rank whose steps set its pace

    def __post_init__(self) -> None:
        if not self.samples_per_step:
            self.samples_per_step = self.batch_size

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Measurement":
        return cls(
            step_time_ms=Stats.from_json(data["step_time_ms"]), batch_size=data["batch_size"],
            throughput_per_s=data["throughput_per_s"], peak_memory_mb=data.get("peak_memory_mb"),
            flops_per_step=data.get("flops_per_step"), mfu=data.get("mfu"), compile_time_s=data.get("compile_time_s"),
            warmup_steps=data.get("warmup_steps", 0), samples_per_step=data.get("samples_per_step", 0),
            slowest_rank=data.get("slowest_rank"),
        )

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.slowest_rank is None else {"slowest_rank": self.slowest_rank}
        return extra | {
            "step_time_ms": self.step_time_ms.to_json(),
            "batch_size": self.batch_size,
            "throughput_per_s": round(self.throughput_per_s, 3),
            "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 2),
            "flops_per_step": self.flops_per_step,
            "mfu": None if self.mfu is None else round(self.mfu, 5),
            "compile_time_s": None if self.compile_time_s is None else round(self.compile_time_s, 3),
            "warmup_steps": self.warmup_steps,
            "samples_per_step": self.samples_per_step,
        }


@dataclass
class Finding:
    """A rule that fired, with the values its conditions read."""

    code: str
    name: str
    title: str
    message: str
    evidence: dict[str, Any]
    safety: str
    transform: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    expected_speedup: Optional[float] = None
    predicted_step_time_ms: Optional[float] = None
    family: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "title": self.title,
            "message": self.message,
            "evidence": self.evidence,
            "safety": self.safety,
            "transform": self.transform,
            "params": self.params,
            "expected_speedup": None if self.expected_speedup is None else round(self.expected_speedup, 3),
            "predicted_step_time_ms": (
                None if self.predicted_step_time_ms is None else round(self.predicted_step_time_ms, 3)
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Finding":
        """A finding from its JSON form (extra keys such as "accepted" or "doc" are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Verification:
    ok: bool
    max_abs_error: Optional[float]
    max_rel_error: Optional[float]
    tolerance: Optional[float]
    reason: str = ""
    losses_baseline: list[float] = field(default_factory=list)
    losses_variant: list[float] = field(default_factory=list)


def higher_is_better(metric: str) -> bool:
    """An evaluate() metric is better higher unless its name says it is a loss."""
    return "loss" not in metric.lower()


@dataclass
class AccuracyCheck:
    """The model file's evaluate(model) metrics of a configuration beside the baseline's, both
    trained the same verification steps from the same seed (autoopt.run.accuracy). A metric
    may get worse by at most `tolerance` x max(|baseline|, 1) (1 % of it, and at least 0.01
    for a metric within [-1, 1]); `ok` is False when one got worse beyond that, or is missing
    or not finite."""

    baseline: dict[str, float]
    variant: dict[str, float]
    tolerance: float
    ok: bool = True
    reason: str = ""
    steps: int = 0  # the training steps before evaluate(model), the same for both

    def allowed(self, metric: str) -> float:
        return self.tolerance * max(abs(self.baseline[metric]), 1.0)

    def difference(self) -> dict[str, Optional[float]]:
        """variant - baseline per metric (None where the variant has no finite value)."""
        out: dict[str, Optional[float]] = {}
        for k, b in self.baseline.items():
            v = self.variant.get(k)
            out[k] = None if v is None or v != v or v in (float("inf"), float("-inf")) else v - b
        return out

    def to_json(self) -> dict[str, Any]:
        return {"baseline": dict(self.baseline), "variant": dict(self.variant), "difference": self.difference(),
                "tolerance": self.tolerance, "allowed": {k: self.allowed(k) for k in self.baseline},
                "higher_is_better": {k: higher_is_better(k) for k in self.baseline}, "steps": self.steps,
                "ok": self.ok, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AccuracyCheck":
        return cls(dict(data["baseline"]), dict(data["variant"]), data["tolerance"], data.get("ok", True),
                   data.get("reason", ""), data.get("steps", 0))
