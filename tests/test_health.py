"""Gradient health (issue 14): model files written here, not for the rules' benefit, get the
right AO0xx findings naming their layers, a healthy control gets none, and a baseline that
diverges to NaN stops with an exit-2 message naming the gradient growth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEADER = "import torch, torch.nn as nn, torch.nn.functional as F\n"

VANISHING = HEADER + textwrap.dedent("""
    BATCH_SIZE = 32

    def build_model():
        layers = []
        for _ in range(12):
            lin = nn.Linear(32, 32)
            nn.init.normal_(lin.weight, std=0.05)
            layers += [lin, nn.Sigmoid()]
        layers.append(nn.Linear(32, 4))
        return nn.Sequential(*layers)

    def make_batch(n):
        return torch.randn(n, 32), torch.randint(0, 4, (n,))

    def forward(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def build_optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=0.05)
""")

# every block scales its input up fourfold: activations and gradients grow through the depth
GROWING = HEADER + textwrap.dedent("""
    BATCH_SIZE = 32

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            return 4.0 * self.lin(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(8))
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    def build_model():
        return Net()

    def make_batch(n):
        return torch.randn(n, 32), torch.randint(0, 4, (n,))

    def forward(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def build_optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=1e-6)
""")

HEALTHY = HEADER + textwrap.dedent("""
    BATCH_SIZE = 64

    def build_model():
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))

    def make_batch(n):
        x = torch.randn(n, 20)
        return x, x[:, :5].argmax(1)

    def forward(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def build_optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
""")

# regression on unnormalised targets with a learning rate of 1: the loss explodes to inf/NaN
DIVERGING = HEADER + textwrap.dedent("""
    BATCH_SIZE = 32

    def build_model():
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def make_batch(n):
        x = torch.randn(n, 16) * 10
        return x, x.sum(1, keepdim=True) * 10

    def forward(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def build_optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=1.0)
""")

# a healthy network with a learning rate far too small
TINY_LR = HEALTHY.replace("lr=0.01, momentum=0.9", "lr=1e-7")


def _profile(tmp_path: Path, source: str) -> dict:
    from autoopt.pipelines.profile import profile_model
    from autoopt.settings import MeasureSettings

    path = tmp_path / "net.py"
    path.write_text(source)
    return profile_model(str(path), device="cpu", steps=1, logdir=str(tmp_path / "tb"), cpu_busy_other=0.0,
                         measure_settings=MeasureSettings(warmup_steps=1, warmup_min_s=0.0, min_steps=3, max_steps=3,
                                                                          min_time_s=0.0, max_time_s=2.0))


def _health_codes(result: dict) -> dict[str, dict]:
    return {f["code"]: f for f in result["findings"] if f["code"].startswith("AO0")}


def test_vanishing_gradients_name_the_input_side_layers(tmp_path):
    found = _health_codes(_profile(tmp_path, VANISHING))
    assert set(found) == {"AO001"}, found
    f = found["AO001"]
    assert f["evidence"]["health.vanishing_layers"].startswith("0, 2, 4")  # the first Linear layers
    assert f["evidence"]["health.layer_grad_spread"] < 1e-6
    assert "0, 2, 4" in f["message"] and f["safety"] == "manual" and f["transform"] is None


def test_growing_activations_explode_the_gradients_naming_the_blocks(tmp_path):
    result = _profile(tmp_path, GROWING)
    found = _health_codes(result)
    assert set(found) == {"AO002", "AO007"}, found
    assert "blocks." in found["AO002"]["message"]
    # the activations: named in depth order, from where they first pass 100x the first layer's
    grown = found["AO007"]["evidence"]["health.exploding_activations"]
    assert grown.startswith("blocks.") and "head" in grown
    rms = [r["activation_rms"] for r in result["health"]["layers"]]
    assert all(b > a for a, b in zip(rms, rms[1:]))  # they grow with depth
    assert found["AO007"]["evidence"]["health.first_activation_rms"] == pytest.approx(rms[0], rel=1e-3)
    assert all(r["activation_rms"] >= 100 * rms[0] for r in result["health"]["layers"]
               if r["name"] in grown)
    assert found["AO002"]["evidence"]["health.max_layer_grad_norm"] >= 1e3
    rows = result["health"]["layers"]
    assert [r["name"] for r in rows][:2] == ["blocks.0.lin", "blocks.1.lin"] and rows[-1]["name"] == "head"


def test_diverging_model_gets_non_finite_and_diverging_loss_findings(tmp_path):
    found = _health_codes(_profile(tmp_path, DIVERGING))
    assert {"AO003", "AO005"} <= set(found), found
    assert found["AO003"]["evidence"]["health.first_nonfinite_step"] >= 2
    assert found["AO003"]["evidence"]["health.first_nonfinite_layer"] in ("0", "2")
    assert found["AO005"]["evidence"]["health.loss_growth"] > 2


def test_learning_rate_far_below_the_update_ratio_norm(tmp_path):
    found = _health_codes(_profile(tmp_path, TINY_LR))
    assert set(found) == {"AO006"}, found
    assert found["AO006"]["evidence"]["health.update_ratio"] < 1e-5
    assert "1e-07" in found["AO006"]["message"]


def test_healthy_control_gets_no_health_finding(tmp_path):
    result = _profile(tmp_path, HEALTHY)
    assert _health_codes(result) == {}
    h = result["health"]
    assert h["steps"] == 4 and h["nonfinite_grads"] == 0 and h["grad_scaler"] is None
    assert [r["name"] for r in h["layers"]] == ["0", "2", "4"]
    assert all(r["grad_norm"] > 0 and r["update_ratio"] > 0 for r in h["layers"])
    json.dumps(h, allow_nan=False)  # report.json stays strict JSON


def test_health_is_read_off_the_timed_steps(tmp_path):
    """The monitor hangs on the training step only while verification runs."""
    from autoopt.env import detect_capabilities
    from autoopt.run.session import Session
    from autoopt.run.verify import record_run
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    path = tmp_path / "net.py"
    path.write_text(HEALTHY)
    wl = build_workload(load_model_file(str(path)), detect_capabilities("cpu"), seed=0)
    with Session(wl, wl.base_config()) as s:
        rec = record_run(s, health=True)
        assert s.training_step.monitor is None
        s.step()
    assert rec.health["steps"] == 4 and len(rec.health["loss"]) == 4


def test_baseline_diverging_to_nan_exits_2_naming_the_gradient_growth(tmp_path):
    path = tmp_path / "diverging.py"
    path.write_text(DIVERGING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(path), "--device", "cpu", "--quick",
                        "--out", str(tmp_path / "rep")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    err = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert "first became inf/NaN at verification step" in err and "in layer '" in err
    assert "the total gradient norm grew from" in err and "per step" in err


@pytest.mark.parametrize("summary, expected", [
    ({"first_nonfinite": None, "grad_norm": [1.0, 2.0]}, ""),
    ({"first_nonfinite": {"step": 3, "layer": "enc.1"}, "grad_norm": [10.0, 1000.0, None],
      "layers": [{"name": "enc.1", "grad_norm_max": 900.0}]},
     "the gradients first became inf/NaN at verification step 3, in layer 'enc.1'; the total gradient norm "
     "grew from 10 to 1e+03 over steps 1-2 (x100 per step); largest finite layer gradient norms: 'enc.1' 900"),
])
def test_growth_text(summary, expected):
    from autoopt.run.health import growth_text

    assert growth_text(summary) == expected


def test_grad_scaler_norms_are_unscaled_and_its_scale_recorded(tmp_path):
    from autoopt.env import detect_capabilities
    from autoopt.run.session import Session
    from autoopt.run.verify import record_run
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    path = tmp_path / "net.py"
    path.write_text(HEALTHY)
    wl = build_workload(load_model_file(str(path)), detect_capabilities("cpu"), seed=0)
    with Session(wl, wl.base_config()) as s:
        plain = record_run(s, health=True).health
    with Session(wl, wl.base_config().with_(grad_scaler=True)) as s:
        scaled = record_run(s, health=True).health
    assert plain["grad_scaler"] is None
    assert scaled["grad_scaler"]["skipped_steps"] == 0 and scaled["grad_scaler"]["scale"][0] > 1
    assert scaled["grad_norm"][0] == pytest.approx(plain["grad_norm"][0], rel=1e-4)


def test_report_md_shows_the_largest_and_smallest_layers():
    from autoopt.output.markdown import health

    layers = [{"name": f"blocks.{i}.lin", "grad_norm": 10.0 ** -i, "grad_norm_last": 10.0 ** -i, "update_ratio": 1e-3,
               "nonfinite": 0} for i in range(14)]
    r = {"health": {"steps": 4, "loss": [2.0, 1.9], "grad_norm": [1.0, 0.9], "layers": layers, "nonfinite_grads": 0,
                    "update_ratio": 1e-3, "grad_scaler": None}}
    text = "\n".join(health(r))
    assert text.startswith("## Gradient health")
    shown = [f"blocks.{i}.lin" for i in range(14) if f"`blocks.{i}.lin`" in text]
    assert shown == [f"blocks.{i}.lin" for i in (0, 1, 2, 3, 4, 9, 10, 11, 12, 13)]
    assert "4 more in report.json" in text and "1e-13" in text
    assert health({"health": None}) == []


def test_report_html_plots_the_per_layer_gradient_norms():
    from autoopt.output.html import plots

    layers = [{"name": "enc.0", "grad_norm": 1e-9, "grad_norm_max": 2e-9, "nonfinite": 0},
              {"name": "head", "grad_norm": 0.5, "grad_norm_max": 0.7, "nonfinite": 3}]
    figs = [str(f["svg"]) for f in plots({"health": {"steps": 4, "layers": layers}}) if f["svg"]]
    grad = [svg for svg in figs if "Gradient norm per layer" in svg]
    assert len(grad) == 1 and "enc.0" in grad[0] and "3 inf/NaN" in grad[0]
    assert not [f for f in plots({"health": None}) if "Gradient norm" in str(f["svg"])]


@pytest.mark.parametrize("model", [
    "style_nanogpt.py",
    # attention's query/key weights start with gradients ~1e-4 of the largest: not vanishing
    pytest.param("style_hf_bert.py", marks=pytest.mark.slow),
])
def test_transformers_written_elsewhere_get_no_health_finding(model):
    from autoopt.diagnosis.facts_builder import health_facts
    from autoopt.diagnosis.rules import evaluate, load_rules
    from autoopt.env import detect_capabilities
    from autoopt.run.session import Session
    from autoopt.run.verify import record_run
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    wl = build_workload(load_model_file(str(ROOT / "tests" / "models" / model)), detect_capabilities("cpu"), seed=0)
    with Session(wl, wl.base_config()) as s:
        health = record_run(s, health=True).health
    rules = [r for r in load_rules() if r.code.startswith("AO0")]
    assert [f.code for f in evaluate(rules, health_facts(health))] == [], health["layers"]
