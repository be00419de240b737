"""`batch_size`: the batch size that gives the most samples per second, found by
measurement (`search_batch_size`), not "the largest that fits".

Changing the batch size changes training: the gradient noise and the number of steps
per epoch change, so the learning rate must follow — scale it with the batch (the linear
scaling rule: lr x new/old, Goyal et al. 2017) with a few epochs of warm-up, or keep the
effective batch with `grad_accumulation`. It is therefore `manual`: measured and
reported, never applied without the user's explicit acceptance. Inference models have
no learning rate; there only the latency per request changes.

Params: `batch_size` (the chosen size; required by `apply`). `previous` (the batch size
it replaces, for the caveat).

Config: `ExecConfig.batch_size`. Patch: the module-level `BATCH_SIZE = n` constant (set,
or added after the imports), which autoopt and the file's own code read.

Safety: manual. Tolerance 1e-3 relative — per-sample outputs of the same inputs agree to
fp32 rounding at another batch size (batched kernels tile differently); the loss of a
different batch is not comparable, so verification compares the shared samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from autoopt.transforms import Transform, register
from autoopt.types import Capabilities, ExecConfig, Measurement, Workload

if TYPE_CHECKING:
    from autoopt.run.measure import Paired

MIN_GAIN = 0.03  # a doubling must gain at least 3 % samples/s (and beat the measured noise)


def lr_caveat(old: Optional[int], new: Optional[int], mode: str = "train") -> str:
    if mode != "train":
        return "a larger batch raises throughput but also the latency of each batch"
    ratio = f" (x{new / old:g})" if old and new else ""
    return (
        f"changing the batch size from {old} to {new} changes training: scale the learning rate with it"
        f"{ratio}, the linear scaling rule, with a few epochs of warm-up — or keep the effective batch "
        "with grad_accumulation"
    )


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error from the allocator (GPU or CPU): autoopt.run.session's test."""
    from autoopt.run.session import is_oom as runner_is_oom

    return runner_is_oom(exc)


@dataclass
class BatchSearch:
    """The result of a batch-size search: the chosen size, its measurement, its throughput
    relative to the starting size, and every try (for the report's throughput-vs-batch plot)."""

    batch_size: Optional[int]  # None when not even the smallest batch fits
    measurement: Optional[Measurement]
    start: int
    table: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    caveat: str = ""
    # samples/s of the chosen size over the starting size's: the product of the side-by-side
    # ratios of each accepted step (or the ratio of two single measurements without `against`)
    relative: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "start": self.start,
            "reason": self.reason,
            "caveat": self.caveat,
            "relative_throughput": round(self.relative, 4),
            "tries": self.table,
            "measurement": self.measurement.to_json() if self.measurement else None,
        }


def search_batch_size(
    cfg: ExecConfig,
    measure: Callable[[ExecConfig], Measurement],
    *,
    memory_budget_mb: Optional[float],
    start: Optional[int] = None,
    max_batch: int = 4096,
    noise: Optional[float] = None,
    against: Optional[Callable[[ExecConfig, ExecConfig], "Paired"]] = None,
) -> BatchSearch:
    """Grow the batch (x2) from `start` (default cfg.batch_size) while samples/s improves
    beyond the noise and peak memory stays under `memory_budget_mb` (None: no budget); after
    the first doubling without gain, one more doubling is tried (throughput curves are not
    always monotonic). On out-of-memory (or over the budget) the midpoint between the last
    good size and the failed one is tried once. When the starting size itself does not fit,
    it is halved until one does. `measure(cfg)` measures one size alone; it and `against`
    may raise an out-of-memory error (caught); other errors propagate.

    With `against(best_cfg, new_cfg) -> autoopt.run.measure.Paired`, each larger size is measured
    beside the current best in alternating rounds (autoopt.run.measure.measure_against) and judged
    by their ratio and its noise, free of the machine's drift between measurements taken
    seconds apart; its row records `ratio_to_best`. Where the pair has no anchor (the two did
    not fit together), the new size's own measurement is compared with the best's earlier
    one. Without `against`, sizes are measured alone and compared with each other.

    The noise is `noise` when given; else the pair's (Paired.noise), or for measurements
    taken apart two combined standard errors of the two medians, at least MIN_GAIN
    (autoopt.run.measure.noise_between).
    """
    from autoopt.run.measure import noise_between

    start = int(start or cfg.batch_size)
    table: list[dict[str, Any]] = []
    tried: dict[int, Optional[Measurement]] = {}

    def attempt(b: int, best_b: Optional[int] = None) -> tuple[Optional[Measurement], str, Optional[float], float]:
        """Measure size b (beside best_b when given). Returns (measurement, status, ratio to
        the best or None, the noise of that ratio)."""
        pair = None
        try:
            if against is not None and best_b is not None:
                pair = against(cfg.with_(batch_size=best_b), cfg.with_(batch_size=b))
                m = pair.measurement
            else:
                m = measure(cfg.with_(batch_size=b))
        except BaseException as exc:  # noqa: BLE001 - only OOM is swallowed
            if not is_oom(exc):
                raise
            from autoopt.run.session import free_memory

            free_memory()
            table.append({"batch_size": b, "throughput_per_s": None, "peak_memory_mb": None, "status": "oom"})
            tried[b] = None
            return None, "oom", None, 0.0
        tried[b] = m
        row = {
            "batch_size": b,
            "throughput_per_s": round(m.throughput_per_s, 3),
            "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 2),
            "status": "ok",
        }
        ratio, gain = None, 0.0
        if best_b is not None and pair is not None and pair.anchor is not None:
            ratio = pair.ratio
            gain = noise if noise is not None else pair.noise
            row["ratio_to_best"] = round(ratio, 4)
        elif best_b is not None:
            ratio = m.throughput_per_s / best_m.throughput_per_s
            gain = noise if noise is not None else noise_between(best_m, m, MIN_GAIN)
        table.append(row)
        if memory_budget_mb is not None and m.peak_memory_mb is not None and m.peak_memory_mb > memory_budget_mb:
            row["status"] = "over_budget"
            return m, "over_budget", ratio, gain
        return m, "ok", ratio, gain

    def mark(b: int, status: str) -> None:
        for row in reversed(table):
            if row["batch_size"] == b:
                row["status"] = status
                return

    # 1. a starting size that fits
    b = start
    best_m, status, _, _ = attempt(b)
    while status != "ok" and b > 1:
        b = max(1, b // 2)
        best_m, status, _, _ = attempt(b)
    if status != "ok":
        return BatchSearch(None, None, start, table, reason="out of memory (or over the budget) even at batch size 1")
    first_m = best_m
    best = b
    relative = 1.0
    reason = ""

    # 2. grow while it pays
    midpoint_used = False
    patience_used = False
    while True:
        nxt = best * 2
        if nxt > max_batch:
            reason = f"reached the maximum batch size {max_batch}"
            break
        m, status, ratio, gain = attempt(nxt, best)
        if status == "ok" and ratio > 1 + gain:
            best, best_m, relative = nxt, m, relative * ratio
            continue
        if status == "ok":
            mark(nxt, "no_gain")
            reason = (f"batch {nxt} gave {ratio:.2f}x the samples/s of batch {best}"
                      f"{' side by side' if 'ratio_to_best' in table[-1] else ''}: no gain beyond the noise "
                      f"({gain:.0%})")
            # Throughput against batch size is not always monotonic (kernel blocking, cache
            # sizes): one more doubling past a step without gain before giving up.
            beyond = nxt * 2
            if not patience_used and beyond <= max_batch:
                patience_used = True
                m2, st2, r2, g2 = attempt(beyond, best)
                if st2 == "ok" and r2 > 1 + g2:
                    best, best_m, relative = beyond, m2, relative * r2
                    patience_used = False  # past the dip: the next dip gets its look too
                    continue
                if st2 == "ok":
                    mark(beyond, "no_gain")
            break
        # out of memory or over the budget: the midpoint, once
        why = "ran out of memory" if status == "oom" else f"exceeded the {memory_budget_mb:.0f} MB budget"
        reason = f"batch {nxt} {why}"
        mid = (best + nxt) // 2
        if not midpoint_used and mid > best and mid not in tried:
            midpoint_used = True
            mm, st, rm, gm = attempt(mid, best)
            if st == "ok" and rm > 1 + gm:
                best, best_m, relative = mid, mm, relative * rm
            elif st == "ok":
                mark(mid, "no_gain")
        break

    mark(best, "chosen")
    if against is None:
        relative = best_m.throughput_per_s / first_m.throughput_per_s
    return BatchSearch(best, best_m, start, table, reason=reason, caveat=lr_caveat(start, best), relative=relative)


@register
class BatchSize(Transform):
    name = "batch_size"
    safety = "manual"
    tolerance = 1e-3
    summary = (
        "Use the batch size with the best measured samples/s (changes training: scale the learning "
        "rate with it — linear scaling rule with warm-up — or keep the effective batch with grad_accumulation)"
    )
    order = 10

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        b = params.get("batch_size")
        if b is not None and (not isinstance(b, int) or b < 1):
            return f"batch_size must be a positive integer, not {b!r}"
        if b is not None and b == workload.batch_size:
            return f"the batch size is already {b}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        out = {"previous": workload.batch_size}
        if params.get("batch_size") is not None:
            out["batch_size"] = int(params["batch_size"])
        return out

    def caveat(self, params: dict, mode: str = "train") -> str:
        return lr_caveat(params.get("previous"), params.get("batch_size"), mode)

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            raise ValueError("batch_size needs a chosen 'batch_size' param (run search_batch_size first)")
        return cfg.with_(batch_size=b)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            from autoopt.patching.editor import PatchError

            raise PatchError("no batch size was chosen")
        editor.set_constant(
            "BATCH_SIZE", str(b),
            comment=f"autoopt (batch_size): {lr_caveat(params.get('previous'), b, workload.mode if workload else 'train')}",
        )
