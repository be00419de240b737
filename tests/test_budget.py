"""The time budget (--time-budget) and the noise check: trials that would not end in time are
not started and are listed; unsettled calls take more rounds only within their share of the
time left, and the report names the calls too close to settle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.results import Decision, NoiseCheck
from autoopt.run.measure import Paired, RoundPolicy
from autoopt.search.engine import Search
from autoopt.search.strategies import strategy
from autoopt.search.trial import Candidate, Outcome, Point
from autoopt.settings import SearchSettings
from autoopt.transforms import get_transform
from autoopt.types import ExecConfig, Finding, Measurement, Stats, Status

ROOT = Path(__file__).resolve().parent.parent


def _m(ms: float, batch: int = 8) -> Measurement:
    st = Stats(median=ms, mean=ms, min=ms, max=ms, p25=ms, p75=ms, stdev=0.0, n=10)
    return Measurement(step_time_ms=st, batch_size=batch, throughput_per_s=1000.0 * batch / ms, peak_memory_mb=10.0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEvaluator:
    """Each trial costs `cost` seconds of a fake clock and returns the round ratios asked for."""

    workload = None
    caps = None

    def __init__(self, clock: Clock, cost: float, ratios: dict[str, list[float]], cut_short: bool = False):
        self.clock, self.cost, self.ratios, self.cut_short = clock, cost, ratios, cut_short
        self.deadlines: list = []
        self.pairs = 0

    def agree(self, flag: bool) -> bool:
        return flag

    def trial(self, name, cfg, *, tolerance, anchor, verify=True, trace=True, deadline=None) -> Outcome:
        self.deadlines.append((name, self.clock.t, deadline))
        self.clock.t += self.cost
        ratios = self.ratios.get(name, [1.0] * 6)
        m = _m(10.0 / ratios[0])
        return Outcome(measurement=m, pair=Paired(_m(10.0), m, ratios, cut_short=self.cut_short))

    def measure_pair(self, anchor, cfg, *, deadline=None, extend=True) -> Paired:
        self.pairs += 1
        self.clock.t += 10.0
        return Paired(_m(10.0), _m(10.0), [1.0, 1.01, 0.99, 1.0, 1.02, 0.98])

    def memory_budget_mb(self, fraction):
        return None


def _candidates(*names: str) -> list[Candidate]:
    out = []
    for i, n in enumerate(names):
        f = Finding(code=f"T{i}", name=n, title=n, message=n, evidence={}, safety="safe", transform=n,
                    expected_speedup=1.5 - 0.1 * i)
        out.append(Candidate(f.code, f, get_transform(n), {}))
    return out


def _search(ev, clock, budget, **kw) -> Search:
    return Search(ev, SearchSettings(time_budget_s=budget, follow_diagnosis=False, **kw), clock=clock, run_started=0.0)


def test_trials_that_would_not_end_in_time_are_not_started_and_are_listed():
    clock = Clock()
    ev = FakeEvaluator(clock, cost=35.0, ratios={"T0": [1.3] * 6, "T1": [1.2] * 6, "T2": [1.25] * 6})
    search = _search(ev, clock, budget=100.0)
    base = Point(ExecConfig(batch_size=8), [], _m(10.0))
    best = search.run(strategy("greedy"), _candidates("tf32", "cudnn_benchmark", "channels_last"), base)

    # noise check 0-10 s; T0 10-45; T1 45-80 (80 + the median trial, 35 s, > 100: nothing more)
    assert ev.pairs == 1 and search.noise is not None and search.noise.rounds == 6
    assert [n for n, _, _ in ev.deadlines] == ["T0", "T1"]
    by_name = {v.name: v for v in search.variants}
    assert by_name["T2"].status == Status.SKIPPED and "time budget (100 s" in by_name["T2"].reason
    assert by_name["T0+T1"].status == Status.SKIPPED
    assert best.codes == ["T0"]
    summary = search.summary().to_json()
    assert summary["unmeasured"] == ["T2", "T0+T1"] and summary["budget_spent"] is True
    assert summary["time_budget_s"] == 100.0 and summary["noise"]["rounds"] == 6
    # rounds are shared out: the first call may add rounds until its share of the 90 s left
    # (6 trials expected for three candidates), never past the budget
    name, t, deadline = ev.deadlines[0]
    assert t == 10.0 and deadline == pytest.approx(10.0 + 90.0 / 6)
    assert all(d <= 100.0 for _, _, d in ev.deadlines)


def test_no_budget_measures_everything():
    clock = Clock()
    ev = FakeEvaluator(clock, cost=35.0, ratios={"T0": [1.3] * 6, "T1": [1.2] * 6})
    search = _search(ev, clock, budget=None, noise_check=False)
    search.run(strategy("greedy"), _candidates("tf32", "cudnn_benchmark"), Point(ExecConfig(), [], _m(10.0)))
    assert ev.pairs == 0 and [n for n, _, _ in ev.deadlines] == ["T0", "T1", "T0+T1"]
    assert all(d is None for _, _, d in ev.deadlines)
    s = search.summary()
    assert s.unmeasured == [] and not s.budget_spent and s.noise is None


def test_a_call_too_close_to_settle_is_not_kept_and_is_named():
    clock = Clock()
    loose = [1.0, 0.97, 1.03, 1.0, 1.06, 0.99]  # 1.01x +- 3 %: a 2 % gain is neither shown nor ruled out
    ev = FakeEvaluator(clock, cost=1.0, ratios={"T0": loose}, cut_short=True)
    search = _search(ev, clock, budget=1000.0, noise_check=False)
    best = search.run(strategy("greedy"), _candidates("tf32"), Point(ExecConfig(), [], _m(10.0)))
    v = search.variants[0]
    assert best.codes == [] and v.status == Status.REJECTED
    assert v.decision is not None and not v.decision.settled and v.decision.cut_short
    assert "too close to call" in v.reason and "time budget" in v.reason
    [u] = search.summary().to_json()["unsettled"]
    assert u["variant"] == "T0" and u["low"] < 1.02 < u["high"] and u["why"] == "the time budget ended its rounds"
    back = Decision.from_json(v.decision.to_json())
    assert (back.settled, back.cut_short, back.rounds) == (False, True, 6)


def test_round_policy_takes_more_rounds_only_while_unsettled_and_in_time():
    loose = [1.0, 0.97, 1.03, 1.0, 1.06, 0.99]
    settled = [1.2] * 6
    p = RoundPolicy(rounds=6, max_rounds=18)
    assert p.more(loose, started=0.0) and not p.cut_short
    assert not p.more(settled, started=0.0)
    assert not RoundPolicy(max_rounds=6).more(loose, started=0.0)
    import time

    now = time.perf_counter()
    late = RoundPolicy(deadline=now)  # six rounds took a second: three more do not fit
    assert not late.more(loose, started=now - 1.0) and late.cut_short
    roomy = RoundPolicy(deadline=now + 100.0)
    assert roomy.more(loose, started=now - 1.0) and not roomy.cut_short
    # a job: one answer for every rank
    assert not RoundPolicy(agree=lambda want: False).more(loose, started=0.0)


def test_noise_check_line_names_what_would_help_only_when_noisy():
    quiet = NoiseCheck(1.0, 0.015, 6, 0.02)
    assert quiet.resolvable == 0.02 and "GPU" not in quiet.line()
    busy = NoiseCheck(1.08, 0.2, 6, 0.02)
    assert busy.resolvable == pytest.approx(0.28) and "--time-budget" in busy.line() and "GPU" in busy.line()


TINY = (Path(__file__).resolve().parent / "models" / "tiny_conv.py").read_text()


@pytest.mark.slow
def test_a_spent_budget_ends_the_search_and_the_report_says_what_it_left(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--quick", "--accept", "none",
                        "--try", "channels_last", "--try", "fused_optimizer", "--time-budget", "0.01",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "time budget: 0 s for the baseline and the search" in r.stderr
    assert "Not measured within the time budget: try-channels_last, try-fused_optimizer" in r.stdout
    report = json.loads((out / "report.json").read_text())
    s = report["search"]
    assert s["budget_spent"] and s["unmeasured"] == ["try-channels_last", "try-fused_optimizer"]
    assert s["variants_tried"] == 0 and report["final"]["codes"] == []
    assert "Not measured (the time budget was spent" in (out / "report.md").read_text()
    assert "try-channels_last" in (out / "report.html").read_text()
    bad = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--time-budget", "-5"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "not a number of seconds" in bad.stderr
