"""The batch-size search: the batch size with the most samples per second, found by
measurement — not "the largest that fits" (what Lightning's and Accelerate's finders do).

The batch doubles from the start size while samples/s improves beyond the noise and peak
memory stays under the budget; after a doubling without gain one more is tried (throughput
against batch size is not always monotonic: kernel blocking, cache sizes); on out-of-memory
(or over the budget) the midpoint between the last good size and the failed one is tried
once; a start size that does not fit is halved until one does.

Each larger size is judged beside the best size so far: with `against`, in alternating
rounds (autoopt.run.measure.measure_against), free of the machine's drift between two
measurements taken seconds apart; its row records `ratio_to_best`, and every size judged
records the ratio that decided it: `ratio_to_previous` (its samples/s over `previous_batch_size`,
the best size before it) with its 95 % interval `ratio_low`-`ratio_high` and `side_by_side`.
The rows' `relative_*` keys are the compounded product of those ratios along the chain (a
number for report.json readers, never the one that decided). Where the pair has no
anchor (the two did not fit together), or without `against`, the sizes' own measurements
are compared, and their noise is two standard errors of the two medians, at least 3 %
(autoopt.run.measure.noise_between).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from autoopt.run.measure import Paired, noise_between
from autoopt.run.session import free_memory, is_oom
from autoopt.settings import APART_FLOOR
from autoopt.transforms.batch_size import lr_caveat
from autoopt.types import BatchTry, ExecConfig, Measurement

__all__ = ["BatchSearch", "search_batch_size", "is_oom"]


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


@dataclass
class _Try:
    measurement: Optional[Measurement]
    status: BatchTry  # OK | OOM | OVER_BUDGET
    ratio: Optional[float] = None  # to the best size so far
    noise: float = 0.0

    def beats(self) -> bool:
        return self.status == BatchTry.OK and self.ratio is not None and self.ratio > 1 + self.noise


class _Searcher:
    """The state of one search: the table of tries, the best size and its measurement."""

    def __init__(self, cfg: ExecConfig, measure, against, memory_budget_mb, noise, stop=None):
        self.cfg, self.measure, self.against = cfg, measure, against
        self.stop = stop or (lambda: False)  # True: the time budget has no room for another size
        self.budget, self.noise = memory_budget_mb, noise
        self.table: list[dict[str, Any]] = []
        self.tried: dict[int, Optional[Measurement]] = {}
        self.best = 0
        self.best_m: Optional[Measurement] = None
        self.relative = 1.0

    def attempt(self, b: int, beside_best: bool = False) -> _Try:
        """Measure size b (beside the best size when asked)."""
        pair = None
        try:
            if self.against is not None and beside_best:
                pair = self.against(self.cfg.with_(batch_size=self.best), self.cfg.with_(batch_size=b))
                m = pair.measurement
            else:
                m = self.measure(self.cfg.with_(batch_size=b))
        except BaseException as exc:  # noqa: BLE001 - only OOM is swallowed
            if not is_oom(exc):
                raise
            free_memory()
            self.table.append({"batch_size": b, "throughput_per_s": None, "peak_memory_mb": None,
                               "status": BatchTry.OOM})
            self.tried[b] = None
            return _Try(None, BatchTry.OOM)
        self.tried[b] = m
        row = {"batch_size": b, "throughput_per_s": round(m.throughput_per_s, 3),
               "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 2),
               "status": BatchTry.OK}
        t = _Try(m, BatchTry.OK)
        if beside_best and pair is not None and pair.anchor is not None:
            t.ratio, t.noise = pair.ratio, self.noise if self.noise is not None else pair.noise
            row["ratio_to_best"] = round(t.ratio, 4)
            # compounded: throughput relative to the start size, the product of the side-by-side
            # ratios along the chain (kept for report.json readers; the report shows the pair's own)
            rel = self.relative * t.ratio
            row.update(relative_throughput=round(rel, 4), relative_low=round(rel / (1 + t.noise), 4),
                       relative_high=round(rel * (1 + t.noise), 4))
        elif beside_best:
            t.ratio = m.throughput_per_s / self.best_m.throughput_per_s
            t.noise = self.noise if self.noise is not None else noise_between(self.best_m, m, APART_FLOOR)
        if beside_best:
            # the ratio that decided this size: its samples/s over the size before it (the best so
            # far), side by side where the pair held together, with its 95 % interval
            row.update(previous_batch_size=self.best, ratio_to_previous=round(t.ratio, 4),
                       ratio_low=round(t.ratio / (1 + t.noise), 4), ratio_high=round(t.ratio * (1 + t.noise), 4),
                       side_by_side="ratio_to_best" in row)
        self.table.append(row)
        if self.budget is not None and m.peak_memory_mb is not None and m.peak_memory_mb > self.budget:
            row["status"] = t.status = BatchTry.OVER_BUDGET
        return t

    def mark(self, b: int, status: str) -> None:
        for row in reversed(self.table):
            if row["batch_size"] == b:
                row["status"] = status
                return

    def take(self, b: int, t: _Try) -> None:
        self.best, self.best_m, self.relative = b, t.measurement, self.relative * t.ratio

    def find_start(self, start: int) -> bool:
        """A starting size that fits: `start`, halved until one does."""
        b = start
        t = self.attempt(b)
        while t.status != BatchTry.OK and b > 1:
            b = max(1, b // 2)
            t = self.attempt(b)
        if t.status != BatchTry.OK:
            return False
        self.best, self.best_m = b, t.measurement
        self.table[-1]["relative_throughput"] = 1.0
        return True

    def past_dip(self, nxt: int, max_batch: int) -> bool:
        """One doubling past a size without gain; True when it paid (the search goes on)."""
        beyond = nxt * 2
        if beyond > max_batch or self.stop():
            return False
        t = self.attempt(beyond, beside_best=True)
        if t.beats():
            self.take(beyond, t)
            return True
        if t.status == BatchTry.OK:
            self.mark(beyond, BatchTry.NO_GAIN)
        return False

    def midpoint(self, nxt: int) -> None:
        """After out-of-memory (or over budget) at `nxt`: the midpoint, once."""
        mid = (self.best + nxt) // 2
        if mid <= self.best or mid in self.tried or self.stop():
            return
        t = self.attempt(mid, beside_best=True)
        if t.beats():
            self.take(mid, t)
        elif t.status == BatchTry.OK:
            self.mark(mid, BatchTry.NO_GAIN)

    def grow(self, max_batch: int) -> str:
        """Double while it pays; returns why the search stopped."""
        patience_used = False
        while True:
            nxt = self.best * 2
            if nxt > max_batch:
                return f"reached the maximum batch size {max_batch}"
            if self.stop():
                return f"the time budget was spent before batch {nxt} could be measured"
            t = self.attempt(nxt, beside_best=True)
            if t.beats():
                self.take(nxt, t)
                continue
            if t.status == BatchTry.OK:
                self.mark(nxt, BatchTry.NO_GAIN)
                side = " side by side" if "ratio_to_best" in self.table[-1] else ""
                reason = (f"batch {nxt} gave {t.ratio:.2f}x the samples/s of batch {self.best}{side}: no gain "
                          f"beyond the noise ({t.noise:.0%})")
                if not patience_used and self.stop():
                    return reason + "; the time budget was spent before a larger size could be tried"
                if not patience_used:
                    patience_used = True
                    if self.past_dip(nxt, max_batch):
                        patience_used = False  # past the dip: the next dip gets its look too
                        continue
                return reason
            why = "ran out of memory" if t.status == BatchTry.OOM else f"exceeded the {self.budget:.0f} MB budget"
            self.midpoint(nxt)
            return f"batch {nxt} {why}"


def search_batch_size(
    cfg: ExecConfig,
    measure: Callable[[ExecConfig], Measurement],
    *,
    memory_budget_mb: Optional[float],
    start: Optional[int] = None,
    max_batch: int = 4096,
    noise: Optional[float] = None,
    against: Optional[Callable[[ExecConfig, ExecConfig], Paired]] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> BatchSearch:
    """Search the batch size of `cfg` from `start` (default cfg.batch_size), as the module
    docstring says. `measure(cfg)` measures one size alone; `against(best_cfg, new_cfg)`
    measures a size beside the best so far. Both may raise an out-of-memory error (caught);
    other errors propagate. `noise`, when given, replaces the measured noise. `stop()`, asked
    before each larger size, ends the search with what it has (the time budget)."""
    start = int(start or cfg.batch_size)
    s = _Searcher(cfg, measure, against, memory_budget_mb, noise, stop)
    if not s.find_start(start):
        return BatchSearch(None, None, start, s.table, reason="out of memory (or over the budget) even at batch size 1")
    first_m = s.best_m
    reason = s.grow(max_batch)
    s.mark(s.best, BatchTry.CHOSEN)
    relative = s.relative if against is not None else s.best_m.throughput_per_s / first_m.throughput_per_s
    return BatchSearch(s.best, s.best_m, start, s.table, reason=reason, caveat=lr_caveat(start, s.best),
                       relative=relative)
