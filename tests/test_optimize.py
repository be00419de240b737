"""The optimize loop end to end on CPU: real profiling, real verification, a real patch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _autoopt(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "autoopt", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV, **kw)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "report"
    r = _autoopt("optimize", "--yes", "--json", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


@pytest.mark.slow
def test_optimize_yes_json_prints_one_document_and_writes_every_artifact(bundled):
    r, out = bundled
    report = json.loads(r.stdout)  # the whole of stdout is one JSON document
    for key in ("model", "device", "mode", "batch_size", "baseline", "findings", "variants", "final", "artifacts"):
        assert key in report
    assert report["model"] == "simplenet" and report["mode"] == "train"
    for name in ("report_md", "report_html", "plan", "patch", "logdir"):
        path = Path(report["artifacts"][name])
        assert path.is_absolute() and path.exists(), name
    assert (out / "report.json").exists()
    assert json.loads((out / "report.json").read_text())["final"] == report["final"]
    runs = {p.name for p in (out / "tb").iterdir() if list(p.glob("*.pt.trace.json.gz"))}
    assert "baseline" in runs
    assert report["baseline"]["step_time_ms"]["n"] >= 5
    assert report["search"]["variants_tried"] >= 1
    from test_report_schema import check_report

    check_report(report, json.loads((out / "plan.json").read_text()))


@pytest.mark.slow
def test_only_verified_variants_are_kept(bundled):
    report = json.loads(bundled[0].stdout)
    for v in report["variants"]:
        if v["status"] != "kept" or v["name"] in ("baseline", "final"):
            continue
        names = {t["name"] for t in v["transforms"]}
        if names <= {"batch_size", "grad_accumulation"}:
            continue
        if "batch_size" in names:
            # numerics of the same transforms were verified at the baseline's batch
            assert any(w["status"] == "kept" and w["max_rel_error"] is not None for w in report["variants"])
            continue
        assert v["max_rel_error"] is not None and v["max_rel_error"] <= v["tolerance"], v
    final = report["final"]
    # --yes keeps training the same: no larger batch (the Quick start once wrote BATCH_SIZE = 4096
    # into the example), so the headline speedup is the final one
    assert all(t["name"] not in ("batch_size", "grad_accumulation") for t in final["transforms"])
    patch = Path(report["artifacts"]["patch"]).read_text().splitlines()
    assert not [x for x in patch if x.startswith(("+BATCH_SIZE", "-BATCH_SIZE"))]
    for v in report["variants"]:
        if v["safety"] == "manual" and v["status"] == "skipped" and not v["accepted"]:
            assert f"--accept {v['name']}" in v["reason"]
    assert final["fixed_batch_speedup"] == final["speedup"] and final["semantic_changes"] is None
    kept_codes = {c for v in report["variants"] if v["status"] == "kept" for c in v["codes"]}
    assert set(final["codes"]) <= kept_codes
    if final["codes"]:
        assert final["speedup_low"] <= final["speedup"] <= final["speedup_high"]


@pytest.mark.slow
def test_patch_round_trip_runs_the_optimized_configuration(bundled, tmp_path):
    report = json.loads(bundled[0].stdout)
    patch = Path(report["artifacts"]["patch"]).read_text()
    final_names = {t["name"] for t in report["final"]["transforms"]}
    if not final_names:
        pytest.skip("nothing was kept on this machine, so the patch is empty")
    assert patch.startswith("--- a/simplenet.py")
    shutil.copy(ROOT / "examples" / "simplenet.py", tmp_path / "simplenet.py")
    r = subprocess.run(["patch", "-p1", "-i", "-"], input=patch, text=True, capture_output=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    threads = torch.get_num_threads()
    try:
        # importing the patched file runs its module-level settings (torch.set_num_threads where
        # the threads transform was kept, on a busy machine): put them back after
        spec = load_model_file(tmp_path / "simplenet.py")
        if "threads" in final_names:
            kept = next(t for t in report["final"]["transforms"] if t["name"] == "threads")
            assert torch.get_num_threads() == kept["params"]["num_threads"]
        wl = build_workload(spec, detect_capabilities("cpu"), seed=0)
        assert wl.batch_size == report["final"]["batch_size"]
        with Session(wl, wl.base_config()) as s:
            if "channels_last" in final_names:
                conv = next(m for m in s.model.modules() if isinstance(m, torch.nn.Conv2d))
                assert conv.weight.is_contiguous(memory_format=torch.channels_last)
            if "fused_optimizer" in final_names:
                g = s.optimizer.param_groups[0]
                assert g.get("foreach") or g.get("fused")
            s.step()
    finally:
        torch.set_num_threads(threads)
    # and autoopt profiles the patched file as it is
    prof = _autoopt("profile", str(tmp_path / "simplenet.py"), "--json", "--steps", "1", "--quiet",
                    "--logdir", str(tmp_path / "logs"))
    assert prof.returncode == 0, prof.stderr[-2000:]
    assert json.loads(prof.stdout)["measurement"]["batch_size"] == report["final"]["batch_size"]


@pytest.mark.slow
def test_fp16_variant_of_an_overflowing_model_is_rejected(tmp_path):
    r = _autoopt("optimize", str(MODELS / "style_fp16_overflow.py"), "--json", "--quick", "--reject", "batch_size",
                 "--try", "amp:dtype=float16", "--try", "amp:dtype=bfloat16", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    amp = [v for v in report["variants"] if any(t["name"] == "amp" for t in v["transforms"])]
    assert amp, report["variants"]
    fp16 = [v for v in amp if v["transforms"][0]["params"].get("dtype") == "float16"]
    if fp16:
        assert fp16[0]["status"] == "rejected" and "inf/NaN" in fp16[0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["style_nanogpt.py", "style_lstm_infer.py", "style_hf_bert.py"])
def test_models_in_other_styles_profile_and_optimize(model, tmp_path):
    r = _autoopt("optimize", str(MODELS / model), "--yes", "--json", "--quick", "--reject", "compile,batch_size",
                 "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["baseline"]["throughput_per_s"] > 0
    assert report["final"] is not None
    assert all(v["status"] in ("kept", "rejected", "failed", "skipped") for v in report["variants"])


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_what_was_measured(tmp_path):
    out = tmp_path / "rep"
    p = subprocess.Popen([sys.executable, "-m", "autoopt", "optimize", "--yes", "--quick", "--out", str(out)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    seen = ""
    try:
        while time.time() < deadline:  # wait until the baseline is measured and a variant starts
            line = p.stderr.readline()
            seen += line
            if "AO" in line and ("building" in line or "verifying" in line):
                break
            if not line and p.poll() is not None:
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, seen + err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    assert report["baseline"]["step_time_ms"]["median"] > 0


def test_without_a_terminal_only_safe_transforms_are_accepted(monkeypatch):
    from autoopt.cli import _make_decider
    from autoopt.transforms import get_transform
    from autoopt.types import Finding

    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    args = SimpleNamespace(accept=None, reject=None, yes=False, json_no_prompt=True)
    decide = _make_decider(args, console=None)

    def f(code, safety):
        return Finding(code=code, name="x", title="t", message="m", evidence={}, safety=safety)

    assert decide(f("AO202", "safe"), get_transform("channels_last")) is True
    assert decide(f("AO104", "unsafe"), get_transform("amp")) is False
    assert decide(f("AO402", "manual"), get_transform("batch_size")) is False
    assert decide(f("AO601", "safe"), None) is False  # advice only: nothing to apply
    args.accept = "AO104"
    decide = _make_decider(args, console=None)
    assert decide(f("AO104", "unsafe"), get_transform("amp")) is True
    assert decide(f("AO202", "safe"), get_transform("channels_last")) is False
    args.accept, args.yes, args.reject = None, True, "AO402"
    decide = _make_decider(args, console=None)
    assert decide(f("AO104", "unsafe"), get_transform("amp")) is True
    assert decide(f("AO402", "manual"), get_transform("batch_size")) is False
    args.reject = None  # --yes alone: still not a change of training
    decide = _make_decider(args, console=None)
    assert decide(f("AO402", "manual"), get_transform("batch_size")) is False


def test_try_parses_transform_parameters():
    from autoopt.cli import _parse_try
    from autoopt.errors import UserError

    assert _parse_try("amp:dtype=float16") == ("amp", {"dtype": "float16"})
    assert _parse_try("amp:dtype=float16,grad_scaler=true") == ("amp", {"dtype": "float16", "grad_scaler": True})
    assert _parse_try("batch_size:batch_size=64") == ("batch_size", {"batch_size": 64})
    with pytest.raises(UserError):
        _parse_try("amp:float16")
    with pytest.raises(UserError):  # a key the transform does not take is refused, not ignored
        _parse_try("compile:mode=default,fullgraph=true")


TINY = (Path(__file__).resolve().parent / "models" / "tiny_conv.py").read_text()


@pytest.mark.slow
def test_exhaustive_search_measures_every_combination(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    r = _autoopt("optimize", str(model), "--json", "--quick", "--search", "exhaustive", "--accept", "none",
                 "--try", "channels_last", "--try", "fused_optimizer", "--out", str(tmp_path / "rep"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    names = [v["name"] for v in report["variants"]]
    # both alone, then the pair, whatever the solo measurements said
    assert "try-channels_last" in names and "try-fused_optimizer" in names
    pair = [v for v in report["variants"] if len(v["codes"]) == 2 and v["name"] != "final"]
    assert len(pair) == 1 and set(pair[0]["codes"]) == {"try-channels_last", "try-fused_optimizer"}
    assert pair[0]["status"] in ("kept", "rejected")
    assert report["search"]["strategy"] == "exhaustive" and report["search"]["variants_tried"] == 3
    assert all(f["accepted"] is False for f in report["findings"] if not f["code"].startswith("try-"))


def _m(ms, spread, batch=8, n=20):
    from autoopt.types import Measurement, Stats

    st = Stats(median=ms, mean=ms, min=ms, max=ms, p25=ms * (1 - spread / 2), p75=ms * (1 + spread / 2), stdev=0.0, n=n)
    return Measurement(step_time_ms=st, batch_size=batch, throughput_per_s=1000.0 * batch / ms, peak_memory_mb=50.0)


def test_keep_decisions_use_the_side_by_side_ratio():
    """A variant measured beside its anchor is judged by the ratio of the rounds and their
    spread (2 % floor); without the anchor (the two did not fit together) by the measurement
    taken apart (3 % floor)."""
    from autoopt.run.measure import Paired
    from autoopt.search.engine import judge
    from autoopt.search.trial import Point
    from autoopt.types import ExecConfig

    stale = _m(7.0, 0.01)  # the anchor measured earlier, when the machine was fast
    anchor = Point(ExecConfig(), [], stale)
    new = _m(9.25, 0.01)

    def decide(pair):
        d = judge(pair, anchor, new, "the current best")
        return d.better, d.ratio, d.noise, d.how

    # side by side the variant is 8 % faster in every round, though 25 % slower than the stale
    # measurement
    better, ratio, noise, how = decide(Paired(_m(10.0, 0.01), new, [1.08] * 6))
    assert better and ratio == pytest.approx(1.08) and noise == pytest.approx(0.02) and how == "side by side in 6 rounds"
    # 1 % is inside the 2 % floor; 8 % with rounds from 0.98 to 1.18 is inside their spread
    assert not decide(Paired(_m(10.0, 0.01), new, [1.01] * 6))[0]
    better, ratio, noise, _ = decide(Paired(_m(10.0, 0.01), new, [0.98, 1.18] * 3))
    assert not better and ratio == pytest.approx(1.0754, abs=1e-3) and noise > 0.08
    better, ratio, noise, how = decide(Paired(None, new, []))
    assert not better and ratio == pytest.approx(7 / 9.25) and noise == pytest.approx(0.03) and "apart" in how
    assert decide(None)[1] == pytest.approx(7 / 9.25)


def test_paired_ratio_noise_and_when_a_call_is_settled():
    from autoopt.run.measure import Paired, t975

    p = Paired(None, _m(1.0, 0.01), [1.10, 1.05, 1.12, 1.08])
    assert p.ratio == pytest.approx((1.10 * 1.05 * 1.12 * 1.08) ** 0.25)
    # by hand: stdev of the logs 0.02734, / sqrt(4), x t(3) = 3.182 -> 4.45 %
    assert p.noise == pytest.approx(0.0445, abs=5e-4) and t975(3) == 3.182
    assert p.better and p.settled
    tie = Paired(None, _m(1.0, 0.01), [1.0, 0.99, 1.01, 1.0])
    assert not tie.better and tie.settled  # 1.00 +- 1.3 %: not a 2 % gain
    loose = Paired(None, _m(1.0, 0.01), [1.0, 0.97, 1.03, 1.0])
    assert not loose.better and not loose.settled  # 1.00 +- 3.9 %: could still be a 2 % gain
    worse = Paired(None, _m(1.0, 0.01), [0.9, 0.92, 0.88, 0.91])
    assert not worse.better and worse.settled
    assert Paired(None, _m(1.0, 0.01), [1.5]).noise == float("inf") and Paired(None, _m(1.0, 0.01), []).settled


def _tiny_workload(tmp_path):
    from autoopt.env import detect_capabilities
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    model = tmp_path / "tiny_consent.py"
    model.write_text(TINY)
    caps = detect_capabilities("cpu")
    return build_workload(load_model_file(model), caps, seed=0), caps


def _batch_finding():
    from autoopt.types import Finding

    return Finding(code="AO402", name="batch-size-small", title="t", message="m", evidence={}, safety="manual",
                   transform="batch_size", params={})


def _consent_candidates(tmp_path, monkeypatch, tty=False, answers="", **flags):
    """The candidates the CLI's decider lets through for an AO402 finding (and an unsafe one)."""
    import io

    from rich.console import Console

    from autoopt.cli import _make_decider
    from autoopt.pipelines.candidates import CandidateBuilder
    from autoopt.types import Finding

    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(sys.stdin, "readline", io.StringIO(answers).readline, raising=False)
    args = SimpleNamespace(**{"accept": None, "reject": None, "yes": False, "json_no_prompt": not tty, **flags})
    wl, caps = _tiny_workload(tmp_path)
    variants = []
    builder = CandidateBuilder(wl, caps, _make_decider(args, Console(file=io.StringIO())), variants)
    amp = Finding(code="AO104", name="amp", title="t", message="m", evidence={}, safety="unsafe", transform="amp",
                  params={"dtype": "bfloat16"})
    out = builder.from_findings([_batch_finding(), amp])
    return {c.code for c in out}, {v.name: v for v in variants}, builder


def test_yes_does_not_apply_a_change_of_training(tmp_path, monkeypatch):
    """--yes accepts unsafe transforms (numerics within tolerance), not AO402, which changes
    training; the skipped finding says how to apply it."""
    codes, skipped, builder = _consent_candidates(tmp_path, monkeypatch, yes=True)
    assert "AO402" not in codes and builder.accepted["AO402"] is False
    assert builder.accepted["AO104"] is True
    v = skipped["AO402"]
    assert v.status == "skipped" and v.safety == "manual" and not v.accepted
    assert "changes training" in v.reason and "--accept AO402" in v.reason


@pytest.mark.parametrize("name", ["AO402", "batch_size", "ao402"])
def test_accept_names_a_change_of_training(tmp_path, monkeypatch, name):
    codes, skipped, _ = _consent_candidates(tmp_path, monkeypatch, yes=True, accept=name)
    assert "AO402" in codes and "AO402" not in skipped
    assert "AO104" in codes  # --yes still accepts the rest


def test_the_prompt_applies_a_change_of_training_when_answered_yes(tmp_path, monkeypatch):
    codes, _, _ = _consent_candidates(tmp_path, monkeypatch, tty=True, answers="y\nn\n")
    assert codes == {"AO402"}  # AO402 asked first: yes; AO104: no
    codes, skipped, _ = _consent_candidates(tmp_path, monkeypatch, tty=True, answers="n\nn\n")
    assert codes == set() and "--accept AO402" in skipped["AO402"].reason


def test_consent_flags_decide_by_safety():
    from autoopt.settings import Consent

    yes = Consent(yes=True)
    assert yes.decide("AO202", "channels_last", "safe") is True and yes.decide("AO104", "amp", "unsafe") is True
    assert yes.decide("AO402", "batch_size", "manual") is False
    assert yes.decide("AO403", "grad_accumulation", "manual") is False
    assert Consent(yes=True, accept=["GRAD_ACCUMULATION"]).decide("AO403", "grad_accumulation", "manual") is True
    assert Consent(yes=True, accept=["AO402"], reject=["batch_size"]).decide("AO402", "batch_size", "manual") is False
    assert Consent(yes=True).unattended("AO402", "batch_size", "manual") is False
