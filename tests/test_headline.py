"""The honest headline (issue 14): every report states the speedup with training unchanged
(final.fixed_batch_speedup) first, and a change of training (a larger batch) only beside it,
named as such; findings that change training and were not named are listed with how to
accept them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from autoopt.output import report as R
from autoopt.results import Decision, FinalResult, Variant
from autoopt.search.fixed import set_fixed_batch
from autoopt.search.trial import Candidate
from autoopt.transforms import get_transform
from autoopt.types import Finding, Measurement, Stats, Status


def _m(ms: float, batch: int = 16) -> Measurement:
    st = Stats(median=ms, mean=ms, min=ms, max=ms, p25=ms, p75=ms, stdev=0.0, n=10)
    return Measurement(step_time_ms=st, batch_size=batch, throughput_per_s=1000.0 * batch / ms, peak_memory_mb=10.0)


def _cand(code: str, name: str, params: dict, safety: str = "safe") -> Candidate:
    f = Finding(code=code, name=name, title=name, message=name, evidence={}, safety=safety, transform=name)
    return Candidate(code, f, get_transform(name), params)


CL = _cand("AO202", "channels_last", {})
FUSED = _cand("AO501", "fused_optimizer", {"impl": "foreach"})
BATCH = _cand("AO402", "batch_size", {"batch_size": 128, "previous": 16}, "manual")


def _variant(codes, speedup, ratio, noise, anchor) -> Variant:
    return Variant("+".join(codes), list(codes), [], True, Status.KEPT, "r", measurement=_m(8.0), speedup=speedup,
                   decision=Decision(True, ratio, noise, anchor, rounds=6))


def _final(speedup=3.0) -> FinalResult:
    return FinalResult(["x"], [], speedup, speedup * 0.9, speedup * 1.1, _m(2.0, 128))


def test_a_larger_batch_is_left_out_of_the_speedup_with_training_unchanged():
    variants = [_variant(["AO202"], 1.25, 1.25, 0.04, "the baseline"),
                _variant(["AO202", "AO402"], 3.0, 2.4, 0.03, "the current best")]
    f = set_fixed_batch(_final(), [CL, BATCH], variants, 16).to_json()
    assert f["speedup"] == 3.0  # the final speedup stays the one with the larger batch
    assert f["fixed_batch_speedup"] == 1.25
    assert f["fixed_batch_low"] == pytest.approx(1.25 / 1.04, abs=1e-4)
    assert f["fixed_batch_high"] == pytest.approx(1.25 * 1.04, abs=1e-4)
    assert f["semantic_changes"] == "batch size 16 -> 128"
    assert "AO202" in f["fixed_batch_how"] and "beside the baseline" in f["fixed_batch_how"]


def test_a_chained_configuration_carries_its_last_ratio_interval_to_the_baseline():
    variants = [_variant(["AO202"], 1.25, 1.25, 0.04, "the baseline"),
                _variant(["AO202", "AO501"], 1.375, 1.1, 0.02, "the current best")]
    f = set_fixed_batch(_final(), [CL, FUSED, BATCH], variants, 16).to_json()
    assert f["fixed_batch_speedup"] == 1.375
    assert f["fixed_batch_low"] == pytest.approx(1.375 / 1.02, abs=1e-4)
    assert "product of the side-by-side ratios" in f["fixed_batch_how"]


def test_fixed_batch_speedup_in_every_final():
    # nothing semantic kept: the final speedup itself
    f = set_fixed_batch(_final(1.3), [CL], [], 16).to_json()
    assert (f["fixed_batch_speedup"], f["fixed_batch_low"], f["fixed_batch_high"]) == (1.3, 1.17, 1.43)
    assert f["semantic_changes"] is None and "re-measured beside the baseline" in f["fixed_batch_how"]
    # no change kept
    f = set_fixed_batch(FinalResult([], [], 1.0, 1.0, 1.0, _m(10.0)), [], [], 16).to_json()
    assert f["fixed_batch_speedup"] == 1.0 and "nothing was kept" in f["fixed_batch_how"]
    # only the larger batch kept: training unchanged is the baseline
    f = set_fixed_batch(_final(), [BATCH], [], 16).to_json()
    assert f["fixed_batch_speedup"] == 1.0 and f["semantic_changes"] == "batch size 16 -> 128"
    # the search holds no measurement without the change: null, said so
    f = set_fixed_batch(_final(), [CL, BATCH], [], 16).to_json()
    assert f["fixed_batch_speedup"] is None and f["fixed_batch_low"] is None
    assert "not measured" in f["fixed_batch_how"]
    assert FinalResult.from_json(f, _m(2.0)).fixed_batch_how == f["fixed_batch_how"]


def _report() -> dict:
    st = {"median": 10.0, "p25": 9.9, "p75": 10.1, "n": 10}
    return {
        "model": "m", "mode": "train", "device": {"type": "cpu"}, "batch_size": 16,
        "baseline": {"step_time_ms": st, "throughput_per_s": 1600.0, "batch_size": 16},
        "variants": [
            {"name": "baseline", "status": "kept", "speedup": 1.0, "step_time_ms": st},
            {"name": "AO104", "codes": ["AO104"], "transforms": [{"name": "amp", "params": {}}], "status": "skipped",
             "accepted": False, "safety": "unsafe", "reason": "not accepted"},
            {"name": "AO403", "codes": ["AO403"], "transforms": [{"name": "grad_accumulation", "params": {}}],
             "status": "skipped", "accepted": False, "safety": "manual",
             "reason": "not applied: AO403 grad_accumulation changes training; pass --accept AO403 to try it"},
            {"name": "final", "status": "kept", "speedup": 4.0, "step_time_ms": dict(st, median=20.0)},
        ],
        "final": {"codes": ["AO202", "AO402"], "transforms": [{"name": "channels_last", "params": {}},
                                                              {"name": "batch_size", "params": {"batch_size": 128}}],
                  "speedup": 4.0, "speedup_low": 3.8, "speedup_high": 4.2, "step_time_ms": dict(st, median=20.0),
                  "throughput_per_s": 6400.0, "batch_size": 128,
                  "fixed_batch_speedup": 1.25, "fixed_batch_low": 1.2, "fixed_batch_high": 1.3,
                  "fixed_batch_how": "from the search: AO202 without the change of training, measured beside the "
                                     "baseline (side by side in 6 rounds)",
                  "semantic_changes": "batch size 16 -> 128"},
        "artifacts": {"report_md": "/r/report.md", "report_html": "/r/report.html", "patch": "/r/patch.diff",
                      "plan": "/r/plan.json"},
    }


def test_report_md_leads_with_the_speedup_with_training_unchanged():
    md = R.render_markdown(_report())
    result = md.split("## Result")[1].split("\n## ")[0]
    first = next(line for line in result.splitlines() if line.strip())
    assert first.startswith("**Speedup: 1.25× (95 % interval 1.20×–1.30×) with training unchanged; 4.00×")
    assert "4.00×" in first and "with batch size 16 -> 128, which changes training" in first
    assert first.index("1.25×") < first.index("4.00×")
    # the finding left out, with how to apply it; a declined unsafe one is not listed as such
    assert "AO403 (grad_accumulation): changes training; pass --accept AO403 to try it" in result
    assert "AO104 (" not in result


def test_report_html_leads_with_the_speedup_with_training_unchanged():
    html = R.render_html(_report())
    cards = re.findall(r'<div class="k">([^<]*)</div><div class="v">([^<]*)</div>', html)
    assert cards[0] == ("Speedup, training unchanged", "1.25×")
    assert cards[1] == ("With batch size 16 -&gt; 128 (changes training)", "4.00×")
    assert "pass --accept AO403 to try it" in html


def test_terminal_final_line_leads_with_the_speedup_with_training_unchanged(capsys):
    from autoopt import cli

    cli._print_optimize_summary(_report())
    out = capsys.readouterr().out
    final = next(line for line in out.splitlines() if line.startswith("Final:"))
    assert final.startswith("Final: 1.25x with training unchanged (range 1.20-1.30); 4.00x")
    assert "with batch size 16 -> 128, which changes training" in final
    assert "Not applied: AO403 (grad_accumulation): changes training; pass --accept AO403 to try it" in out
    rep = _report()
    rep["final"] = {"codes": [], "transforms": [], "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0,
                    "fixed_batch_speedup": 1.0, "fixed_batch_low": 1.0, "fixed_batch_high": 1.0,
                    "note": "nothing kept"}
    cli._print_optimize_summary(rep)
    final = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Final:"))
    assert final.startswith("Final: 1.00x with training unchanged") and "no change kept" in final


TINY = (Path(__file__).resolve().parent / "models" / "tiny_conv.py").read_text()


def _optimize(tmp_path, *flags):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    out = tmp_path / "rep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # on a CPU at batch 8 AO402 (a larger batch) fires: the smallest model where it does
    r = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--device", "cpu", "--quick",
                        "--time-budget", "90", "--reject", "threads,dataloader,amp,compile", "--out", str(out),
                        *flags], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_yes_leaves_the_larger_batch_out_and_says_how_to_apply_it(tmp_path):
    out, rep, md = _optimize(tmp_path, "--yes")
    ao402 = next(v for v in rep["variants"] if v["name"] == "AO402")
    assert ao402["status"] == "skipped" and "--accept AO402" in ao402["reason"]
    assert "batch_size" not in {t["name"] for t in rep["final"]["transforms"]}
    assert rep["final"]["batch_size"] == 8 and rep["final"]["semantic_changes"] is None
    assert rep["final"]["fixed_batch_speedup"] == rep["final"]["speedup"]
    final = next(line for line in out.splitlines() if line.startswith("Final:"))
    assert re.match(r"Final: \d+\.\d\dx with training unchanged", final), final
    assert "Not applied: AO402 (batch_size): changes training; pass --accept AO402 to try it" in out
    assert "pass --accept AO402 to try it" in md.split("## Result")[1].split("\n## ")[0]


@pytest.mark.slow
def test_accept_ao402_searches_the_batch_and_reports_both_speedups(tmp_path):
    out, rep, md = _optimize(tmp_path, "--yes", "--accept", "AO402")
    batch = [v for v in rep["variants"] if "AO402" in v["codes"]]
    assert batch and batch[0]["status"] in ("kept", "rejected")
    fin = rep["final"]
    assert "fixed_batch_speedup" in fin and fin["fixed_batch_how"]
    if "batch_size" in {t["name"] for t in fin["transforms"]}:
        assert fin["semantic_changes"].startswith("batch size 8 -> ")
        assert "which changes training" in next(line for line in out.splitlines() if line.startswith("Final:"))
    # every size past the start carries the ratio that decided it, and the table shows it
    judged = [b for b in rep["batch_search"] if b.get("ratio_to_previous") is not None]
    assert judged and all(b["ratio_low"] <= b["ratio_to_previous"] <= b["ratio_high"] for b in judged)
    table = md.split("## Batch-size search")[1].split("\n## ")[0]
    for b in judged:
        assert f"batch {b['previous_batch_size']} (" in table
