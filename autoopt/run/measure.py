"""Timed measurement of a Session, apart from tracing.

Warm-up first (compilation, allocator growth, cuDNN autotuning stay out of the numbers),
then timed steps with the device synchronised around each one (CUDA events on a GPU,
perf_counter after synchronize on a CPU), until both a minimum number of steps and a
minimum time are reached. The median and the interquartile spread are reported.
Peak memory: the CUDA allocator's peak on a GPU; on a CPU the process's peak resident set
(VmHWM), reset before the measurement through /proc/self/clear_refs where Linux allows it.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from autoopt.run.session import Session, free_memory, is_oom
from autoopt.settings import APART_FLOOR, SIDE_BY_SIDE_FLOOR, MeasureSettings
from autoopt.types import Capabilities, Measurement, Stats
from autoopt.workload.guard import UserCall, user_call_of

# How the ranks of a distributed job agree on one round: each rank's medians (anchor,
# candidate) of the round in, the job's out (the slowest rank's). None in one process.
RoundReducer = Callable[[float, float], tuple[float, float]]


# ---------------------------------------------------------------- memory
def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: str) -> Optional[float]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    kb = _read_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def cpu_memory_total_mb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError):
        return None


# ---------------------------------------------------------------- flops
def count_flops(session: Session, notes: Optional[list[str]] = None) -> Optional[float]:
    """FLOPs of one step (forward, and backward when training) by torch.utils.flop_counter,
    counted on the eager model (the math a compiled model does is the same). An error of the
    model file's own code propagates (marked by autoopt.workload.guard: the model-file error
    outside a variant); only what the counter cannot follow leaves MFU unknown, with a line in
    `notes`, after the same step has run without the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = session.next_batch()
    try:
        with FlopCounterMode(display=False) as counter:
            _one_step(session, batch)
        total = counter.get_total_flops()
    except Exception as exc:  # noqa: BLE001 - sorted below: the model's error or the counter's limit
        if user_call_of(exc) is not None and not _through_counter(exc):
            raise
        _one_step(session, batch)  # without the counter: the model's own failure surfaces here
        if notes is not None:
            notes.append(f"FLOPs not counted (MFU unknown): torch.utils.flop_counter cannot follow this model "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
        return None
    return float(total) * (session.accum if session.train else 1) or None


def _one_step(session: Session, batch) -> None:
    """One step of the eager model, as counted: forward (and the loss's backward in training),
    gradients dropped afterwards."""
    from autoopt.workload import contract

    model = session.eager_model
    with session.autocast():
        if session.train:
            loss = contract.extract_loss(contract.call_forward(session.spec, model, batch))
            with UserCall(session.spec.path, "backward"):
                loss.backward()
        else:
            with torch.no_grad():
                contract.call_forward(session.spec, model, batch)
    if session.train:
        session.optimizer.zero_grad(set_to_none=True)


def _through_counter(exc: BaseException) -> bool:
    """Whether the exception passed through the FLOP counter's own code (its dispatch mode or
    formulas), i.e. may be the counter's limit rather than the model's error."""
    return any(frame.f_code.co_filename.replace("\\", "/").endswith("torch/utils/flop_counter.py")
               for frame, _ in traceback.walk_tb(exc.__traceback__))


def peak_flops_per_s(caps: Capabilities, cfg) -> Optional[float]:
    """The device's dense peak for the math mode this configuration uses."""
    if not caps.peak_tflops:
        return None
    if cfg.amp_dtype == "bfloat16" or cfg.weights_dtype == "bfloat16":
        key = "bf16"
    elif cfg.amp_dtype == "float16" or cfg.weights_dtype == "float16":
        key = "fp16"
    elif cfg.matmul_precision in ("high", "medium") and caps.tf32:
        key = "tf32"
    else:
        key = "fp32"
    tf = caps.peak_tflops.get(key)
    return tf * 1e12 if tf else None


# ---------------------------------------------------------------- timing
def _warm_up(session: Session, s: MeasureSettings) -> tuple[int, Optional[float]]:
    """Warm-up steps; the first includes compilation for a compiled model, and is returned
    as the compile time."""
    t0 = time.perf_counter()
    session.step()
    session.sync()
    first_s = time.perf_counter() - t0
    compile_time = first_s if session.compiled else None
    w = 1
    t_w = time.perf_counter()
    while w < s.warmup_steps or (time.perf_counter() - t_w) < s.warmup_min_s:
        session.step()
        w += 1
        if w > 50:
            break
    session.sync()
    return w, compile_time


def _timed_steps(session: Session, s: MeasureSettings, on_step=None, samples: Optional[list] = None) -> list[float]:
    """Timed steps, each with the device synchronised (CUDA events on a GPU), until `s`
    says done; appends to and returns `samples`."""
    samples = [] if samples is None else samples
    start = time.perf_counter()
    first = len(samples)
    while True:
        if session.device == "cuda":
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
            session.step()
            ev1.record()
            ev1.synchronize()  # one step at a time: timings per step, nothing queued across
            samples.append(ev0.elapsed_time(ev1))
        else:
            t = time.perf_counter()
            session.step()
            session.sync()
            samples.append((time.perf_counter() - t) * 1000.0)
        if on_step:
            on_step(len(samples))
        if _done(samples[first:], start, s):
            return samples


def _measurement(session: Session, caps: Capabilities, samples: list[float], *, peak: Optional[float],
                 flops_per_step: Optional[float], compile_time: Optional[float], warmup: int) -> Measurement:
    stats = Stats.of(samples)
    tput = session.samples_per_step / (stats.median / 1000.0)
    mfu = None
    peak_fps = peak_flops_per_s(caps, session.cfg)
    if flops_per_step and peak_fps:
        mfu = flops_per_step / (stats.median / 1000.0) / peak_fps
    return Measurement(
        step_time_ms=stats,
        batch_size=session.cfg.batch_size,
        throughput_per_s=tput,
        peak_memory_mb=peak,
        flops_per_step=flops_per_step,
        mfu=mfu,
        compile_time_s=compile_time,
        warmup_steps=warmup,
        samples_per_step=session.samples_per_step,
    )


def measure(
    session: Session,
    caps: Capabilities,
    settings: MeasureSettings | None = None,
    *,
    flops_per_step: Optional[float] = None,
    on_step: Callable[[int], None] | None = None,
) -> Measurement:
    s = settings or MeasureSettings()
    reset_peak_memory(session.device)
    w, compile_time = _warm_up(session, s)
    samples = _timed_steps(session, s, on_step)
    return _measurement(session, caps, samples, peak=peak_memory_mb(session.device),
                        flops_per_step=flops_per_step, compile_time=compile_time, warmup=w)


def measure_side_by_side(
    a: Session,
    b: Session,
    caps: Capabilities,
    settings: MeasureSettings | None = None,
    *,
    rounds: int = 4,
    flops_a: Optional[float] = None,
    flops_b: Optional[float] = None,
) -> tuple[Measurement, Measurement]:
    """Two configurations measured in alternating rounds (a, b, a, b, ...), each round a
    share of the usual minimum time, so that drift in the machine's speed (other load,
    clocks) falls on both alike. Peak memory is read after each one's warm-up; on a CPU the
    process's resident set then holds both models, so callers that need each one's own peak
    take it from a separate measurement."""
    s = settings or MeasureSettings()
    share = s.round_share(rounds)
    reset_peak_memory(a.device)
    a.activate()
    wa, ca = _warm_up(a, s)
    peak_a = peak_memory_mb(a.device)
    reset_peak_memory(b.device)
    b.activate()
    wb, cb = _warm_up(b, s)
    peak_b = peak_memory_mb(b.device)
    sa: list[float] = []
    sb: list[float] = []
    for _ in range(rounds):
        a.activate()
        _timed_steps(a, share, samples=sa)
        b.activate()
        _timed_steps(b, share, samples=sb)
    return (
        _measurement(a, caps, sa, peak=peak_a, flops_per_step=flops_a, compile_time=ca, warmup=wa),
        _measurement(b, caps, sb, peak=peak_b, flops_per_step=flops_b, compile_time=cb, warmup=wb),
    )


# Two-sided 95 % quantiles of Student's t, by degrees of freedom (beyond the table: 1.96 + 2.4/df).
_T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086}


def t975(df: int) -> float:
    return _T975.get(df, 1.96 + 2.4 / df) if df >= 1 else float("inf")


@dataclass
class Paired:
    """A configuration measured beside an anchor (the one it must beat) in alternating rounds.

    Each round gives one throughput ratio (candidate over anchor, from the two medians of that
    round); the ratio is their geometric mean, and its noise the half-width of a 95 %
    t-interval over the rounds — the spread *between* rounds, where the slow swings of a
    shared machine show, not the step-to-step spread within one (steps in a row are not
    independent), and at least `floor` (autoopt.settings.SIDE_BY_SIDE_FLOOR). `anchor` is None when the anchor did not
    fit beside the candidate; then only `measurement` is known."""

    anchor: Optional[Measurement]
    measurement: Measurement
    round_ratios: list[float]
    floor: float = SIDE_BY_SIDE_FLOOR
    cut_short: bool = False  # more rounds were wanted, and the time budget had none left

    @property
    def ratio(self) -> Optional[float]:
        if not self.round_ratios:
            return None
        return math.exp(statistics.fmean(math.log(r) for r in self.round_ratios))

    @property
    def half_width(self) -> float:
        """Relative half-width of the 95 % interval of the ratio, from the rounds' spread."""
        n = len(self.round_ratios)
        if n < 2:
            return float("inf")
        se = statistics.stdev(math.log(r) for r in self.round_ratios) / math.sqrt(n)
        return math.exp(t975(n - 1) * se) - 1

    @property
    def noise(self) -> float:
        return max(self.floor, self.half_width)

    @property
    def better(self) -> bool:
        return self.ratio is not None and self.ratio > 1 + self.noise

    @property
    def settled(self) -> bool:
        """Better beyond the noise, or not even the top of its interval is a gain worth keeping."""
        if self.ratio is None:
            return True
        return self.better or self.ratio * (1 + self.half_width) <= 1 + self.floor


@dataclass
class RoundPolicy:
    """How many alternating rounds a side-by-side measurement takes: `rounds` first, then three
    more at a time while the call is unsettled, up to `max_rounds`, and none that would end
    after `deadline` (a time.perf_counter() value: the run's time budget). In a distributed job
    `reduce` turns each rank's round medians into the job's and `agree` makes one decision of
    every rank's wish for more rounds, so all ranks take the same rounds."""

    rounds: int = 6
    max_rounds: int = 18
    deadline: Optional[float] = None
    reduce: Optional[RoundReducer] = None
    agree: Optional[Callable[[bool], bool]] = None
    cut_short: bool = False  # set when the deadline stopped rounds the call still wanted

    def more(self, ratios: list[float], started: float) -> bool:
        """Whether three more rounds are taken, after `ratios` (rounds measured since `started`)."""
        want = len(ratios) < self.max_rounds and not Paired(None, None, ratios, SIDE_BY_SIDE_FLOOR).settled
        fits = True
        if want and self.deadline is not None and ratios:
            per_round = (time.perf_counter() - started) / len(ratios)
            fits = time.perf_counter() + 3 * per_round <= self.deadline
        if self.agree is not None:
            want, fits = self.agree(want), self.agree(fits)
        self.cut_short = want and not fits
        return want and fits


def measure_against(
    session: Session,
    open_anchor: Callable[[], Session],
    caps: Capabilities,
    settings: MeasureSettings | None = None,
    *,
    rounds: int = 6,
    max_rounds: int = 18,
    flops_per_step: Optional[float] = None,
    anchor_flops: Optional[float] = None,
    policy: Optional[RoundPolicy] = None,
) -> Paired:
    """`session` measured beside an anchor configuration (the one it must beat) in alternating
    rounds, so that their ratio is free of the machine's drift between measurements taken
    apart (see Paired for the ratio and its noise). Each configuration gets the settings'
    measuring time over the rounds; while the call is not settled (Paired.settled), three more
    rounds at a time (RoundPolicy; `rounds` and `max_rounds` without one). `open_anchor()`
    builds the anchor's Session (a context manager); it is built only after `session` has been
    warmed up alone, so `session`'s peak memory and compile time are its own. If the anchor
    does not fit beside it (out of memory with both held), `session` is timed alone and the
    anchor is None.

    In a distributed job (a policy with `reduce`) running out of memory is not survivable (the
    other ranks would wait in a collective) and propagates."""
    policy = policy or RoundPolicy(rounds=rounds, max_rounds=max_rounds)
    s = settings or MeasureSettings()
    reset_peak_memory(session.device)
    session.activate()
    w, compile_time = _warm_up(session, s)
    peak = peak_memory_mb(session.device)
    anchor_m: Optional[Measurement] = None
    sb: list[float] = []
    ratios: list[float] = []
    try:
        with open_anchor() as a:
            anchor_m = _alternate(session, a, caps, s, sb, ratios, policy=policy, anchor_flops=anchor_flops)
    except BaseException as exc:  # noqa: BLE001 - only out of memory is survivable here
        if policy.reduce is not None or not is_oom(exc):
            raise
        anchor_m, sb, ratios = None, [], []
        free_memory()
    session.activate()
    if anchor_m is None:
        sb = _timed_steps(session, s)
    m = _measurement(session, caps, sb, peak=peak, flops_per_step=flops_per_step, compile_time=compile_time, warmup=w)
    return Paired(anchor_m, m, ratios, SIDE_BY_SIDE_FLOOR, cut_short=policy.cut_short)


def _alternate(session: Session, a: Session, caps: Capabilities, s: MeasureSettings, sb: list[float],
               ratios: list[float], *, policy: RoundPolicy, anchor_flops: Optional[float]) -> Measurement:
    """The alternating rounds of measure_against, anchor first in each; appends the
    candidate's samples to `sb` and each round's ratio to `ratios`; returns the anchor's
    measurement."""
    share = s.round_share(policy.rounds)
    a.activate()
    wa, ca = _warm_up(a, s)
    sa: list[float] = []

    def one_round() -> None:
        i, j = len(sa), len(sb)
        a.activate()
        _timed_steps(a, share, samples=sa)
        session.activate()
        _timed_steps(session, share, samples=sb)
        ta, tb = statistics.median(sa[i:]), statistics.median(sb[j:])
        if policy.reduce is not None:
            ta, tb = policy.reduce(ta, tb)
        ratios.append((session.samples_per_step * ta) / (a.samples_per_step * tb))

    started = time.perf_counter()
    for _ in range(policy.rounds):
        one_round()
    while policy.more(ratios, started):
        for _ in range(3):
            one_round()
    return _measurement(a, caps, sa, peak=None, flops_per_step=anchor_flops, compile_time=ca, warmup=wa)


def _done(samples: list[float], start: float, s: MeasureSettings) -> bool:
    n = len(samples)
    elapsed = time.perf_counter() - start
    if n >= s.max_steps or (elapsed >= s.max_time_s and n >= 3):
        return True
    return n >= s.min_steps and elapsed >= s.min_time_s


def median_rel_error(st: Stats) -> float:
    """Relative standard error of a median: about 1.2533 x sigma / sqrt(n) for a normal
    sample, with sigma estimated from the interquartile range (IQR / 1.349)."""
    if st.n < 2 or st.median <= 0:
        return float("inf")
    return 1.2533 * ((st.p75 - st.p25) / 1.349) / st.median / math.sqrt(st.n)


def noise_between(a: Measurement, b: Measurement, floor: float = APART_FLOOR) -> float:
    """The relative difference two medians must exceed to count as real: two combined
    standard errors (about 95 %), and never less than `floor` — drift of a shared machine
    between two measurements is not in their own spread."""
    combined = math.hypot(median_rel_error(a.step_time_ms), median_rel_error(b.step_time_ms))
    return max(floor, 2.0 * combined)


def speedup(base: Measurement, new: Measurement) -> tuple[float, float, float]:
    """Speedup of `new` over `base` as a throughput ratio (samples per second, so a larger batch
    is compared fairly), with a low/high range from the quartiles of both measurements
    (pessimistic: slow new against fast base, and the reverse)."""
    b_per = base.step_time_ms
    n_per = new.step_time_ms
    kb = 1.0 / base.samples_per_step
    kn = 1.0 / new.samples_per_step
    mid = (b_per.median * kb) / (n_per.median * kn)
    low = (b_per.p25 * kb) / (n_per.p75 * kn) if n_per.p75 > 0 else mid
    high = (b_per.p75 * kb) / (n_per.p25 * kn) if n_per.p25 > 0 else mid
    return mid, low, high
