"""report.json's schema is pinned: the typed results (autoopt.results) produce exactly the JSON
of tests/data/golden/report_fixed.json for a report built from fixed values, and every report
the suite writes has the keys tests/data/golden/report_schema.json lists (check_report, called
by the end-to-end tests of the single-process and distributed pipelines)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from autoopt.results import (
    Decision,
    DistributedInfo,
    Failure,
    FinalResult,
    NoiseCheck,
    Report,
    SearchSummary,
    Variant,
    finding_entry,
)
from autoopt.types import ExecConfig, Finding, Measurement, Stats, Status, Verification

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
SCHEMA = json.loads((GOLDEN / "report_schema.json").read_text())


def _keys(obj: dict, required: list, optional: list = ()) -> None:
    missing = set(required) - set(obj)
    extra = set(obj) - set(required) - set(optional)
    assert not missing and not extra, (sorted(missing), sorted(extra))


def check_report(report: dict, plan: dict) -> None:
    """Every key report.json and plan.json must have, and nothing the schema does not name."""
    distributed = bool(report.get("distributed"))
    _keys(report, SCHEMA["report"]["required"] + (SCHEMA["report"]["distributed"] if distributed else []))
    m = SCHEMA["measurement"]
    _keys(report["baseline"], m["required"], m["optional"])
    _keys(report["baseline"]["step_time_ms"], SCHEMA["stats"])
    for v in report["variants"]:
        _keys(v, SCHEMA["variant"])
        if v["decision"] is not None:
            _keys(v["decision"], SCHEMA["decision"])
        if v["accuracy"] is not None:
            _keys(v["accuracy"], SCHEMA["accuracy"])
    _keys(report["final"], SCHEMA["final"]["required"], SCHEMA["final"]["optional"])
    if "accuracy" in report["final"]:
        _keys(report["final"]["accuracy"], SCHEMA["accuracy"])
    for f in report["findings"]:
        _keys(f, SCHEMA["finding"], ["sources"])
    _keys(report["search"], SCHEMA["search"])
    _keys(report["artifacts"], SCHEMA["artifacts"])
    _keys(report["device"], SCHEMA["device"])
    _keys(plan, SCHEMA["plan"]["distributed" if distributed else "required"])
    assert report["plan"] == plan


def _m(ms: float, batch: int = 8) -> Measurement:
    st = Stats(median=ms, mean=ms, min=ms * 0.9, max=ms * 1.2, p25=ms * 0.95, p75=ms * 1.05, stdev=ms * 0.05, n=20)
    return Measurement(step_time_ms=st, batch_size=batch, throughput_per_s=1000.0 * batch / ms, peak_memory_mb=123.4,
                       flops_per_step=1e9, mfu=0.1234, compile_time_s=None, warmup_steps=3)


def fixed_report() -> Report:
    """A report whose every part is fixed: each status, a decision, a failure, a final."""
    base_cfg = ExecConfig(batch_size=8)
    finding = Finding(code="AO202", name="channels-last-cpu", title="t", message="m", evidence={"model.conv2d_count": 3},
                      safety="safe", transform="channels_last", params={}, expected_speedup=1.2)
    ver = Verification(True, 1e-6, 2e-6, 1e-3, "", [2.0, 1.5], [2.0, 1.5])
    variants = [
        Variant("baseline", [], [], True, Status.KEPT, "the model file as written", config=base_cfg,
                measurement=_m(10.0), speedup=1.0, logdir="/r/tb/baseline"),
        Variant("AO104", ["AO104"], [{"name": "amp", "params": {"dtype": "bfloat16"}}], False, Status.SKIPPED,
                "not accepted", safety="unsafe"),
        Variant("AO202", ["AO202"], [{"name": "channels_last", "params": {}}], True, Status.KEPT,
                "verified; 1.25x the baseline, side by side in 6 rounds (noise 3%)",
                config=base_cfg.with_(channels_last=True), measurement=_m(8.0), verification=ver, speedup=1.25,
                logdir="/r/tb/AO202", expected_speedup=1.2, safety="safe",
                decision=Decision(True, 1.25, 0.03, "the baseline", rounds=6, anchor_step_time_ms=10.2,
                                  anchor_throughput_per_s=784.3)),
        Variant("AO301", ["AO301"], [{"name": "compile", "params": {"mode": "default"}}], True, Status.FAILED,
                "BackendCompilerFailed: boom", safety="safe",
                failure=Failure("BackendCompilerFailed", "boom", "Traceback (most recent call last): ...")),
    ]
    final = FinalResult(["AO202"], [{"name": "channels_last", "params": {}}], 1.24, 1.1, 1.4, _m(8.0),
                        baseline_remeasured=_m(9.9)).set_fixed_batch(
        1.24, 1.1, 1.4, "the final configuration itself (training unchanged), re-measured beside the baseline")
    return Report(
        model="net", model_path="/m/net.py", device={"type": "cpu"}, mode="train", batch_size=8, seed=0,
        created_at="2026-11-30T12:00:00", autoopt_version="0.1.0", torch_version="2.13.0+cpu", baseline=_m(10.0),
        findings=[finding_entry(finding, accepted=True, doc="## What it does")], variants=variants, final=final,
        search=SearchSummary("greedy", 2, 12.345, time_budget_s=600.0, budget_spent=True, unmeasured=["AO999"],
                             unsettled=[{"variant": "AO105", "ratio": 1.01, "low": 0.98, "high": 1.04, "rounds": 18,
                                         "anchor": "the baseline",
                                         "why": "still within the noise after the most rounds"}],
                             noise=NoiseCheck(1.01, 0.03, 6, 0.02)), artifacts={"report_md": "/r/report.md"},
        batch_search=[{"batch_size": 8, "throughput_per_s": 800.0, "peak_memory_mb": 1.0, "status": "chosen"},
                      {"batch_size": 16, "throughput_per_s": 810.0, "peak_memory_mb": 2.0, "status": "no gain",
                       "ratio_to_best": 1.01, "relative_throughput": 1.01, "relative_low": 0.99,
                       "relative_high": 1.03, "previous_batch_size": 8, "ratio_to_previous": 1.01,
                       "ratio_low": 0.99, "ratio_high": 1.03, "side_by_side": True}],
        analysis={"baseline": None}, patch="--- a/net.py\n", plan={"plan_version": 1}, notes=["n"], wall_time_s=20.5)


def test_report_json_is_pinned():
    got = json.loads(json.dumps(fixed_report().to_json()))
    path = GOLDEN / "report_fixed.json"
    if os.environ.get("AUTOOPT_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text())


def test_distributed_report_adds_its_keys_and_variants_cross_processes():
    r = fixed_report()
    r.distributed = DistributedInfo(nproc=2, world_size=2, backend="gloo", global_batch_size=16)
    d = r.to_json()
    assert set(SCHEMA["report"]["distributed"]) <= set(d) and d["distributed"] is True
    for v in r.variants:
        again = Variant.from_json(json.loads(json.dumps(v.wire_json())))
        assert again.to_json() == v.to_json()
