"""Search strategies: which trials the engine runs, in which order.

- `Greedy` (the default): every transform alone against the baseline; then, from the fastest
  kept one, the others added one at a time in order of their solo speedup, each measured
  beside the current best; the batch size last, on the most promising configuration.
- `Exhaustive` (`--search exhaustive`): every combination of the verified transforms against
  the baseline, each with its own batch search; the best by speedup.

A batch-size candidate is never combined like the others: the batch search (autoopt.search.
batch) runs on a configuration and is judged beside the best one.
"""
from __future__ import annotations

import itertools

from autoopt.search.engine import BATCH, Search
from autoopt.search.trial import Candidate, Point
from autoopt.types import Status

# Pairs known to interact: one can pay off only beside the other (channels_last helps more
# under autocast and inside a compiled graph), so a pair is tried even when one of them alone
# was no faster.
SYNERGY = {frozenset(p) for p in (("amp", "channels_last"), ("compile", "channels_last"), ("amp", "compile"))}


def _split(candidates: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    regular = [c for c in candidates if c.transform.name != BATCH]
    batch = [c for c in candidates if c.transform.name == BATCH]
    # most promising first: the rules' predicted gain (unknown counts as a small gain)
    regular.sort(key=lambda c: -(c.finding.expected_speedup or 1.01))
    return regular, batch


def _solos(search: Search, regular: list[Candidate]) -> list[tuple[Candidate, Point, bool]]:
    """Every transform alone against the baseline; the verified ones with their points and
    whether each was kept (faster beyond the noise)."""
    out = []
    for c in regular:
        v, point = search.solo(c)
        if point is not None:
            out.append((c, point, v.status == Status.KEPT))
    return out


class Greedy:
    name = "greedy"

    def run(self, search: Search, candidates: list[Candidate], base: Point) -> Point:
        regular, batch = _split(candidates)
        search.expect(2 * len(regular) + (4 if batch else 0))
        verified = sorted(_solos(search, regular), key=lambda cp: -cp[1].speedup)
        search.expect(len(verified) + (4 if batch else 0))
        best = self._combine(search, verified, base)
        if not best.chosen:
            best = self._pair_up(search, verified, base)
        if batch:
            # batch size last, on the most promising configuration: the kept combination, or when
            # nothing was kept, the fastest verified transform that measured no slower than the
            # baseline (a gain inside the noise at this batch can grow at a larger one); the result
            # must still beat the current best beyond the noise to be kept.
            start = best
            if not best.chosen and verified and verified[0][1].speedup >= 1.0:
                start = verified[0][1]
            best = search.batch(batch[0], start, best) or best
        return best

    @staticmethod
    def _combine(search: Search, verified: list[tuple[Candidate, Point, bool]], base: Point) -> Point:
        """From the fastest kept solo, add the others; skip what the measurements so far say is
        hopeless (no faster than the baseline alone, with no known partner in the combination:
        without an interaction, what does not help alone rarely helps beside another transform)."""
        best = base
        for c, point, kept in verified:
            if not best.chosen:
                if kept:
                    best = point
                continue
            if any(x.transform.name == c.transform.name for x in best.chosen):
                continue  # an alternative of a transform already chosen
            partner = any(frozenset((c.transform.name, x.transform.name)) in SYNERGY for x in best.chosen)
            if point.speedup <= 1.0 and not partner:
                search.notes.append(f"search: skipped combining {c.code} ({c.transform.name}): "
                                    f"{point.speedup:.2f}x alone, no known interaction with the current best")
                continue
            best = search.extend(best, c) or best
        return best

    @staticmethod
    def _pair_up(search: Search, verified: list[tuple[Candidate, Point, bool]], base: Point) -> Point:
        """None helped alone; a known pair can still help (channels_last pays off under AMP)."""
        for (a, _, _), (b, _, _) in itertools.combinations(verified, 2):
            if frozenset((a.transform.name, b.transform.name)) in SYNERGY:
                v, point = search.evaluate([a, b], base)
                if v.status == Status.KEPT:
                    return point
        return base


class Exhaustive:
    name = "exhaustive"

    def run(self, search: Search, candidates: list[Candidate], base: Point) -> Point:
        regular, batch = _split(candidates)
        search.expect((2 ** len(regular)) * (5 if batch else 1))
        verified = _solos(search, regular)
        points = [(p, kept) for _, p, kept in verified]
        pool = [c for c, _, _ in verified]
        for r in range(2, len(pool) + 1):
            for combo in itertools.combinations(pool, r):
                v, point = search.evaluate(list(combo), base)
                if point is not None:
                    points.append((point, v.status == Status.KEPT))
        # with a batch-size finding, every verified combination gets its own batch search (a
        # combination can pay off only at a larger batch), not only those faster at this batch
        configs = [base] + [p for p, kept in points if batch or kept]
        if batch:
            configs = [search.batch(batch[0], p, p) or p for p in configs]
        return max(configs, key=lambda p: p.speedup)


STRATEGIES = {"greedy": Greedy, "exhaustive": Exhaustive}


def strategy(name: str):
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown search strategy {name!r}; use {' or '.join(STRATEGIES)}") from None
