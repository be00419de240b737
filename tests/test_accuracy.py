"""Accuracy, when the model file can say what it is (issue 14): the optional evaluate(model) is
run for the baseline, every verified variant and the final configuration, each trained the
same verification steps from the same seed; a variant whose metric gets worse beyond the
tolerance is rejected with the numbers. A model file without evaluate() gets the report it
always got. The runs here are in-process, on a CPU, with few timed steps and no traces."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from autoopt.cli import main
from autoopt.errors import ModelFileError

ROOT = Path(__file__).resolve().parents[1]

MODEL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 8


def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def make_batch(batch_size):
    return torch.randn(batch_size, 3, 8, 8), torch.randint(0, 4, (batch_size,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)
'''

# An honest held-out evaluation, plus PLANTED: a line that may make one transform "hurt accuracy".
EVALUATE = '''

def evaluate(model):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    logits = model(x.to(next(model.parameters()).device)).float().cpu()
    acc = (logits.argmax(1) == y).float().mean().item()
    PLANTED
    return {"accuracy": acc, "val_loss": F.cross_entropy(logits, y).item()}
'''

# channels_last changes the conv weight's layout (and nothing a correct model computes): the
# planted evaluate() sees the layout and reports an accuracy 0.25 lower — on any host
HARM = "if not model[0].weight.is_contiguous(): acc -= 0.25"


def _model(tmp_path: Path, evaluate: str | None = EVALUATE, planted: str = "pass", name: str = "accnet") -> Path:
    p = tmp_path / f"{name}.py"
    body = MODEL + (evaluate.replace("PLANTED", planted) if evaluate else "")
    p.write_text(body)
    return p


def _run(tmp_path: Path, model: Path, *, keep_everything: bool = False, monkeypatch=None, **search) -> dict:
    """An optimize run of `model` trying channels_last only (every rule declined), without
    traces, with few rounds; with `keep_everything`, every measured variant counts as faster
    (the keep decision is not what these tests are about, and timing is host-dependent)."""
    from autoopt.pipelines.optimize import OptimizeRun
    from autoopt.settings import MeasureSettings, OptimizeSettings, SearchSettings

    if keep_everything:
        from autoopt.results import Decision
        from autoopt.search import engine

        monkeypatch.setattr(engine, "judge", lambda pair, anchor, m, name: Decision(True, 1.5, 0.01, name, rounds=2))
    settings = OptimizeSettings(
        model_path=str(model), device="cpu", out_dir=str(tmp_path / "rep"), trace=False,
        measure=MeasureSettings.quick(),
        search=SearchSettings(noise_check=False, follow_diagnosis=False, time_budget_s=None, rounds=2, max_rounds=2,
                              **search),
        extra_transforms=[("channels_last", {})])
    return OptimizeRun(settings, lambda finding, transform: False).run()


def _variant(report: dict, name: str) -> dict:
    return next(v for v in report["variants"] if v["name"] == name)


def _check_schema(report: dict, tmp_path: Path) -> None:
    from test_report_schema import check_report

    check_report(report, json.loads((tmp_path / "rep" / "plan.json").read_text()))


# ---------------------------------------------------------------------------- end to end
def test_baseline_and_final_get_their_metrics_side_by_side(tmp_path, monkeypatch):
    report = _run(tmp_path, _model(tmp_path), keep_everything=True, monkeypatch=monkeypatch)
    _check_schema(report, tmp_path)
    base = _variant(report, "baseline")["accuracy"]
    assert set(base["baseline"]) == {"accuracy", "val_loss"} and base["variant"] == base["baseline"] and base["ok"]
    assert base["higher_is_better"] == {"accuracy": True, "val_loss": False}
    tried = _variant(report, "try-channels_last")
    assert tried["status"] == "kept" and tried["accuracy"]["ok"] is True
    final = report["final"]
    assert final["codes"] == ["try-channels_last"]
    acc = final["accuracy"]  # the final configuration built afresh, trained like the baseline, evaluated
    assert acc["ok"] is True and acc["steps"] == 4 and acc["tolerance"] == 0.01
    assert acc["baseline"] == base["baseline"]
    for k, b in acc["baseline"].items():
        assert acc["difference"][k] == pytest.approx(acc["variant"][k] - b, abs=1e-6)
        assert acc["allowed"][k] == pytest.approx(0.01 * max(abs(b), 1.0))
    assert _variant(report, "final")["accuracy"] == acc
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Accuracy" in md and "val_loss" in md and "`final`" in md and "`baseline`" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="accuracy"' in html and "val_loss" in html
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["final"]["accuracy"] == acc


def test_a_transform_that_hurts_accuracy_is_rejected_with_the_numbers_even_if_faster(tmp_path, monkeypatch):
    report = _run(tmp_path, _model(tmp_path, planted=HARM), keep_everything=True, monkeypatch=monkeypatch)
    _check_schema(report, tmp_path)
    v = _variant(report, "try-channels_last")
    acc = v["accuracy"]
    assert v["status"] == "rejected" and acc["ok"] is False
    assert acc["difference"]["accuracy"] == pytest.approx(-0.25, abs=1e-6)
    base, got = acc["baseline"]["accuracy"], acc["variant"]["accuracy"]
    for text in ("accuracy outside tolerance", f"{got:.6g}", f"{base:.6g}", "-0.25", "allowed -0.01", "4 training steps"):
        assert text in v["reason"], (text, v["reason"])
    assert v["max_rel_error"] is not None and v["max_rel_error"] <= v["tolerance"]  # the numerics agreed
    assert report["final"]["codes"] == [] and report["final"]["accuracy"]["ok"] is True  # the baseline stays
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**no**" in md and "try-channels_last" in md


def test_a_looser_accuracy_tolerance_lets_the_same_drop_pass(tmp_path, monkeypatch):
    report = _run(tmp_path, _model(tmp_path, planted=HARM), keep_everything=True, monkeypatch=monkeypatch,
                  accuracy_tolerance=0.3)
    v = _variant(report, "try-channels_last")
    assert v["accuracy"]["ok"] is True and v["accuracy"]["tolerance"] == 0.3 and v["status"] == "kept"


def test_without_evaluate_the_report_is_what_it_was(tmp_path, monkeypatch):
    report = _run(tmp_path, _model(tmp_path, evaluate=None), keep_everything=True, monkeypatch=monkeypatch)
    _check_schema(report, tmp_path)
    assert report["variants"] and all("accuracy" in v and v["accuracy"] is None for v in report["variants"])
    assert "accuracy" not in report["final"]
    assert _variant(report, "try-channels_last")["status"] == "kept"
    assert "Accuracy" not in (tmp_path / "rep" / "report.md").read_text()
    assert 'id="accuracy"' not in (tmp_path / "rep" / "report.html").read_text()


# ---------------------------------------------------------------------------- a broken evaluate()
@pytest.mark.parametrize("body,words", [
    ("raise RuntimeError('held-out set missing')", ["evaluate(model) raised RuntimeError", "held-out set missing"]),
    ("return [acc]", ["evaluate(model) returned [", "not a dict of metrics"]),
    ("return {}", ["returned an empty dict"]),
    ("return {'accuracy': 'high'}", ["'accuracy'", "str", "must be a number"]),
    ("return {'accuracy': torch.ones(3)}", ["Tensor(3,)", "must be a number"]),
])
def test_a_broken_evaluate_is_the_model_file_error(tmp_path, capfd, body, words):
    m = _model(tmp_path, planted=body)
    rc = main(["optimize", str(m), "--json", "--quick", "--quiet", "--accept", "none", "--device", "cpu",
               "--out", str(tmp_path / "rep")])
    out, err = capfd.readouterr()
    assert rc == 2 and out == "", err[-2000:]
    assert "accnet.py: evaluate:" in err and "Fix:" in err and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_evaluate_with_the_wrong_signature_is_refused_at_load(tmp_path):
    from autoopt.workload.load import load_model_file

    p = _model(tmp_path, evaluate="\n\ndef evaluate():\n    return {}\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(p)
    assert "evaluate" in e.value.message and "evaluate(model)" in e.value.message


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "x"])
def test_accuracy_tolerance_flag_is_checked(value, capsys):
    assert main(["optimize", "--accuracy-tolerance", value]) == 2
    err = capsys.readouterr().err
    assert "--accuracy-tolerance" in err and "not a tolerance" in err


def test_accuracy_tolerance_flag_reaches_the_search():
    from autoopt.cli import _optimize_settings, build_parser

    args = build_parser().parse_args(["optimize", "m.py", "--accuracy-tolerance", "0.05"])
    assert _optimize_settings(args).search.accuracy_tolerance == 0.05
    args = build_parser().parse_args(["optimize", "m.py"])
    assert _optimize_settings(args).search.accuracy_tolerance == 0.01


# ---------------------------------------------------------------------------- the comparison
def test_metrics_are_judged_by_their_direction_and_a_floor():
    from autoopt.run.accuracy import compare_metrics

    base = {"accuracy": 0.9, "loss": 2.0, "top5": 95.0}
    assert compare_metrics(base, {"accuracy": 0.895, "loss": 2.015, "top5": 94.1}, 0.01, 4).ok  # within margins
    assert compare_metrics(base, {"accuracy": 0.5, "loss": 0.1, "top5": 99.0}, 0.01, 4).ok is False  # accuracy fell
    worse_loss = compare_metrics(base, {"accuracy": 0.95, "loss": 2.03, "top5": 96.0}, 0.01, 4)
    assert not worse_loss.ok and "loss 2.03 vs baseline 2" in worse_loss.reason and "allowed +0.02" in worse_loss.reason
    better = compare_metrics(base, {"accuracy": 1.0, "loss": 0.5, "top5": 99.0}, 0.01, 4)
    assert better.ok  # improvements never reject
    missing = compare_metrics(base, {"accuracy": 0.9, "loss": 2.0}, 0.01, 4)
    assert not missing.ok and "top5 missing" in missing.reason
    nan = compare_metrics(base, {"accuracy": math.nan, "loss": 2.0, "top5": 95.0}, 0.01, 4)
    assert not nan.ok and nan.to_json()["difference"]["accuracy"] is None
    json.dumps(nan.to_json())


def test_the_bundled_mlp_example_evaluates_quickly():
    import time

    import torch

    from autoopt.workload.load import check_metrics, load_model_file

    spec = load_model_file(ROOT / "examples" / "mlp.py")
    assert spec.evaluate is not None
    torch.manual_seed(0)
    model = spec.build_model().eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        metrics = check_metrics(spec.evaluate(model), "mlp.py")
    assert set(metrics) == {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 1
    assert time.perf_counter() - t0 < 2.0


def test_a_variant_crosses_processes_with_its_accuracy():
    from autoopt.results import Variant
    from autoopt.types import AccuracyCheck, Status

    v = Variant("AO202", ["AO202"], [], True, Status.REJECTED, "r",
                accuracy=AccuracyCheck({"acc": 0.5}, {"acc": 0.2}, 0.01, ok=False, reason="x", steps=4))
    again = Variant.from_json(json.loads(json.dumps(v.wire_json())))
    assert again.to_json() == v.to_json() and again.accuracy.ok is False


def test_evaluate_runs_in_eval_mode_without_gradients_and_puts_the_mode_back(tmp_path):
    from autoopt.env import capabilities_for
    from autoopt.run.accuracy import evaluate_session
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    probe = textwrap.dedent('''
        def evaluate(model):
            return {"training": float(model.training), "grad": float(torch.is_grad_enabled())}
    ''')
    caps = capabilities_for("cpu", "test cpu", None, 4096.0, None, ("avx2",))
    wl = build_workload(load_model_file(_model(tmp_path, evaluate=probe)), caps)
    with Session(wl, wl.base_config()) as s:
        assert s.eager_model.training
        assert evaluate_session(s) == {"training": 0.0, "grad": 0.0}
        assert s.eager_model.training


def test_reduced_precision_weights_get_their_inputs_cast_while_evaluate_runs(tmp_path):
    """Inference with bf16 weights (inference_mode's weights_dtype) casts the batch to bf16
    (autoopt.run.apply.prepare_batch); evaluate()'s own fp32 inputs are cast alike, and the
    hook that does it is gone after."""
    from autoopt.env import capabilities_for
    from autoopt.run.accuracy import evaluate_session
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    p = tmp_path / "infer.py"
    p.write_text(textwrap.dedent('''
        import torch
        import torch.nn as nn

        def build_model():
            return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

        def make_batch(batch_size):
            return torch.randn(batch_size, 4)

        def evaluate(model):
            out = model(torch.ones(5, 4))
            return {"mean": out.float().mean().item(), "bf16": float(out.dtype == torch.bfloat16)}
    '''))
    caps = capabilities_for("cpu", "test cpu", None, 4096.0, None, ("avx2",))
    wl = build_workload(load_model_file(p), caps, batch_size=4)
    cfg = wl.base_config().with_(inference_mode=True, weights_dtype="bfloat16")
    with Session(wl, cfg) as s:
        metrics = evaluate_session(s)
        assert metrics["bf16"] == 1.0 and math.isfinite(metrics["mean"])
        assert not s.eager_model._forward_pre_hooks
