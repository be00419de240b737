"""A larger batch carries its learning-rate rule, and an accepted change of training is
kept only when a short training run of it stays within the baseline's loss band (issue 14,
"Convergence check for semantic changes")."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoopt.env import detect_capabilities
from autoopt.output.html import render_html
from autoopt.output.markdown import render_markdown
from autoopt.run import apply
from autoopt.run.convergence import check_convergence, default_steps, smoothed_final
from autoopt.transforms import get_transform
from autoopt.transforms.batch_size import lr_rule
from autoopt.transforms.patch import build_patch
from autoopt.types import ExecConfig
from autoopt.workload.build import build_workload
from autoopt.workload.load import load_model_file

ROOT = Path(__file__).resolve().parents[1]

# linear regression: SGD is stable below lr = 2 / L (L ~ 2 here); at batch 8 lr 0.3 trains,
# x8 (linear scaling to 2.4) diverges; lr 0.02 x8 = 0.16 still trains
REGRESSION = '''
import torch, torch.nn as nn
BATCH_SIZE = 8
LR = {lr}
g = torch.Generator().manual_seed(123)
W = torch.randn(16, 1, generator=g)
def build_model():
    return nn.Linear(16, 1)
def make_batch(bs):
    x = torch.randn(bs, 16)
    return x, x @ W + 0.1 * torch.randn(bs, 1)
def forward(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
def build_optimizer(model):
    return torch.optim.{opt}(model.parameters(), lr=LR{extra})
'''


def _workload(tmp_path, lr=0.02, opt="SGD", extra=""):
    p = tmp_path / "reg.py"
    p.write_text(REGRESSION.format(lr=lr, opt=opt, extra=extra))
    return p, build_workload(load_model_file(p), detect_capabilities("cpu"), batch_size=8)


def _batch_params(wl, new=64):
    t = get_transform("batch_size")
    params = t.resolve_params(wl, wl.caps, {})
    params["batch_size"] = new
    params["lr_rule"] = lr_rule(params)
    return t, params


def test_lr_rule_linear_for_sgd_sqrt_for_adam():
    sgd = lr_rule({"previous": 8, "batch_size": 64, "optimizer": "SGD", "lr": 0.1})
    assert sgd == {"rule": "linear", "factor": 8.0, "lr_before": 0.1, "lr_after": 0.8, "warmup_steps": 40}
    small = lr_rule({"previous": 8, "batch_size": 16, "optimizer": "SGD", "lr": 0.1})
    assert small["factor"] == 2.0 and small["warmup_steps"] == 0  # warm-up only from k >= 8
    adam = lr_rule({"previous": 8, "batch_size": 32, "optimizer": "AdamW", "lr": 1e-3})
    assert adam == {"rule": "sqrt", "factor": 2.0, "lr_before": 1e-3, "lr_after": 2e-3, "warmup_steps": 0}
    assert lr_rule({"previous": 8, "batch_size": 32, "optimizer": "", "lr": None}) is None


def test_the_batch_variant_config_scales_the_optimizers_lr_with_warmup(tmp_path):
    _, wl = _workload(tmp_path, lr=0.05)
    t, params = _batch_params(wl)
    assert params["lr_rule"]["lr_after"] == pytest.approx(0.4)
    cfg = t.apply(ExecConfig(batch_size=8), params, wl)
    assert (cfg.batch_size, cfg.lr_scale, cfg.lr_warmup_steps) == (64, 8.0, 40)
    model = torch.nn.Linear(4, 1)
    opt = apply.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05), cfg)
    seen = []
    for _ in range(42):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
    assert seen[0] == pytest.approx(0.4 / 40) and seen[19] == pytest.approx(0.4 * 20 / 40)
    assert seen[39] == pytest.approx(0.4) and seen[41] == pytest.approx(0.4)


def test_the_patch_carries_the_lr_change_and_loads(tmp_path):
    path, wl = _workload(tmp_path, lr=0.05, extra=", momentum=0.9")
    t, params = _batch_params(wl)
    res = build_patch(path, [(t, params)], wl)
    assert res.check_failure is None and res.applied == ["batch_size"]
    assert "+BATCH_SIZE = 64" in res.diff
    assert "lr=0.4" in res.diff and "momentum=0.9" in res.diff
    ns: dict = {}
    exec(compile(res.new_source, str(path), "exec"), ns)  # the patched file loads and builds its optimizer
    opt = ns["build_optimizer"](ns["build_model"]())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)


def test_the_convergence_check_rejects_a_scaled_lr_that_diverges(tmp_path):
    _, wl = _workload(tmp_path, lr=0.3)
    t, params = _batch_params(wl)
    base = ExecConfig(batch_size=8)
    res = check_convergence(wl, base, t.apply(base, params, wl), 30)
    assert res["ok"] is False and res["steps"] == 30 and res["seeds"] == [0, 1, 2]
    lo, hi = res["band"]
    assert lo < res["baseline_final_loss"] < hi
    assert res["candidate_final_loss"] is None or res["candidate_final_loss"] > hi
    assert "band" in res["reason"] and f"{hi:.4g}" in res["reason"]


def test_the_convergence_check_keeps_a_healthy_larger_batch(tmp_path):
    _, wl = _workload(tmp_path, lr=0.02)
    t, params = _batch_params(wl)
    base = ExecConfig(batch_size=8)
    res = check_convergence(wl, base, t.apply(base, params, wl), 30)
    assert res["ok"] is True, res["reason"]
    assert res["candidate_final_loss"] <= res["band"][1]
    assert len(res["baseline_curves"]) == 3 and len(res["candidate_curve"]) == 30


def test_smoothing_and_default_steps():
    assert smoothed_final([5.0] * 10 + [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert smoothed_final([1.0, math.inf, 1.0]) == math.inf
    assert default_steps(None, 300) == 20
    assert default_steps(0.01, 300) == 200  # clamped
    assert default_steps(0.1, 300) == 75  # 10 % of 300 s over 4 runs of 0.1 s steps
    assert default_steps(1.0, 60) == 20


def test_report_shows_the_convergence_check_and_its_plot():
    conv = {"steps": 20, "seeds": [0, 1, 2], "baseline_final_loss": 0.5, "band": [0.4, 0.6],
            "candidate_final_loss": 9.0, "ok": False, "reason": "above the band 0.4-0.6",
            "baseline_curves": [[1.0, 0.6], [1.1, 0.5], [0.9, 0.4]], "candidate_curve": [1.0, None]}
    rule = {"rule": "linear", "factor": 8.0, "lr_before": 0.3, "lr_after": 2.4, "warmup_steps": 40}
    rep = {"variants": [{"name": "AO402", "codes": ["AO402"], "status": "rejected", "reason": "r",
                         "transforms": [], "convergence": conv, "lr_rule": rule}]}
    md = render_markdown(rep)
    section = md.split("## Convergence check")[1].split("\n## ")[0]
    assert "linear x8, warm-up 40 steps" in section and "above the band 0.4-0.6" in section and "**no**" in section
    html = render_html(rep)
    assert 'id="convergence"' in html and 'data-plot="convergence"' in html


MLP = '''
import torch, torch.nn as nn, torch.nn.functional as F
BATCH_SIZE = 8
g = torch.Generator().manual_seed(0)
W = torch.randn(32, 4, generator=g)
def build_model():
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
def make_batch(bs):
    x = torch.randn(bs, 32)
    return x, (x @ W).argmax(1)
def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr={lr})
'''


def _optimize(tmp_path, lr, *flags):
    tmp_path.mkdir(exist_ok=True)
    model = tmp_path / "mlp.py"
    model.write_text(MLP.format(lr=lr))
    out = tmp_path / "rep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--device", "cpu", "--quick",
                        "--time-budget", "60", "--accept", "AO402", "--reject", "threads,dataloader,amp,compile",
                        "--out", str(out), *flags], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_optimize_runs_the_check_on_the_larger_batch_and_0_disables_it(tmp_path):
    rep = _optimize(tmp_path, 0.01, "--convergence-steps", "20")
    batch = [v for v in rep["variants"] if "AO402" in v["codes"] and v.get("lr_rule")]
    assert batch, [v["name"] for v in rep["variants"]]
    assert batch[0]["lr_rule"]["rule"] == "linear" and batch[0]["lr_rule"]["lr_before"] == 0.01
    checked = [v for v in batch if v.get("convergence")]
    if checked:  # the check runs on a larger batch that beat the throughput
        assert checked[0]["convergence"]["steps"] == 20
        kept = checked[0]["status"] == "kept"
        assert kept == checked[0]["convergence"]["ok"]
    rep0 = _optimize(tmp_path / "off", 0.01, "--convergence-steps", "0")
    assert all(v.get("convergence") is None for v in rep0["variants"])


def test_convergence_steps_must_be_a_whole_number(tmp_path):
    model = tmp_path / "reg.py"
    model.write_text(REGRESSION.format(lr=0.1, opt="SGD", extra=""))
    r = subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--convergence-steps", "-3"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--convergence-steps" in r.stderr and "whole number" in r.stderr


def test_tensorboard_has_both_loss_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autoopt.output import tensorboard as tbsummary

    conv = {"steps": 3, "seeds": [0, 1], "baseline_curves": [[1.0, 0.8, 0.6], [1.1, 0.9, 0.7]],
            "candidate_curve": [1.0, 0.5, None]}
    rep = {"model": "m", "findings": [], "final": None,
           "variants": [{"name": "AO402", "codes": ["AO402"], "status": "kept", "transforms": [],
                         "convergence": conv}]}
    dirs = tbsummary.write_summaries(rep, tmp_path / "tb")
    acc = EventAccumulator(str(dirs["AO402"]), size_guidance={"scalars": 0})
    acc.Reload()
    cand = [(e.step, e.value) for e in acc.Scalars("autoopt/convergence/candidate_loss")]
    assert cand == [(1, 1.0), (2, 0.5)]
    assert [e.value for e in acc.Scalars("autoopt/convergence/baseline_loss_seed1")] == pytest.approx([1.1, 0.9, 0.7])


class _Ev:
    """A fake evaluator: every trial 1.3x faster; the convergence check answers `ok`."""

    caps = None

    def __init__(self, ok: bool) -> None:
        from types import SimpleNamespace

        self.workload = SimpleNamespace(mode="train", batch_size=64, facts={})
        self.ok, self.checks = ok, []

    def agree(self, flag):
        return flag

    def trial(self, name, cfg, *, tolerance, anchor, verify=True, trace=True, deadline=None):
        from autoopt.run.measure import Paired
        from autoopt.search.trial import Outcome

        return Outcome(measurement=_meas(10.0 / 1.3), pair=Paired(_meas(10.0), _meas(10.0 / 1.3), [1.3] * 6))

    def convergence(self, before, cfg, steps):
        self.checks.append((before.grad_accum_steps, cfg.grad_accum_steps, steps))
        return {"steps": steps, "seeds": [0, 1, 2], "baseline_final_loss": 1.0, "band": [0.9, 1.1],
                "candidate_final_loss": 1.0 if self.ok else 5.0, "ok": self.ok,
                "reason": "within the band" if self.ok else "above the band 0.9-1.1"}

    def memory_budget_mb(self, fraction):
        return None


def _meas(ms):
    from autoopt.types import Measurement, Stats

    st = Stats(median=ms, mean=ms, min=ms, max=ms, p25=ms, p75=ms, stdev=0.0, n=10)
    return Measurement(step_time_ms=st, batch_size=64, throughput_per_s=64000.0 / ms, peak_memory_mb=10.0)


@pytest.mark.parametrize("ok,steps", [(False, 25), (True, 25), (None, 0)])
def test_the_convergence_check_decides_a_manual_change_of_training(ok, steps):
    from autoopt.search.engine import Search
    from autoopt.search.strategies import strategy
    from autoopt.search.trial import Candidate, Point
    from autoopt.settings import SearchSettings
    from autoopt.types import Finding, Status

    ev = _Ev(bool(ok))
    search = Search(ev, SearchSettings(time_budget_s=None, follow_diagnosis=False, noise_check=False,
                                       convergence_steps=steps))
    f = Finding(code="AO403", name="grad_accumulation", title="t", message="m", evidence={}, safety="manual",
                transform="grad_accumulation", expected_speedup=1.3)
    c = Candidate("AO403", f, get_transform("grad_accumulation"), {"steps": 2})
    best = search.run(strategy("greedy"), [c], Point(ExecConfig(batch_size=64), [], _meas(10.0)))
    v = next(x for x in search.variants if x.codes == ["AO403"])
    if steps == 0:  # --convergence-steps 0: no check, the faster variant is kept
        assert ev.checks == [] and v.convergence is None and v.status == Status.KEPT
        return
    assert ev.checks == [(1, 2, 25)]  # the configuration without the change beside the candidate
    assert v.convergence["ok"] is ok
    if ok:
        assert v.status == Status.KEPT and best.codes == ["AO403"] and "convergence check passed" in v.reason
    else:
        assert v.status == Status.REJECTED and best.codes == []
        assert v.reason.startswith("rejected by the convergence check: above the band 0.9-1.1")


def test_a_plan_applies_the_lr_rule_and_names_it():
    from autoopt.plan import Plan

    rule = lr_rule({"previous": 8, "batch_size": 32, "optimizer": "Adam", "lr": 1e-3})
    plan = Plan.from_dict(Plan.from_transforms(
        [("batch_size", {"previous": 8, "batch_size": 32, "optimizer": "Adam", "lr": 1e-3, "lr_rule": rule})],
        baseline_batch_size=8).to_dict())
    model = torch.nn.Linear(4, 1)
    opt = plan.prepare_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)  # sqrt(32 / 8) = 2
    assert any("x2" in c and "square-root scaling" in c for c in plan.caveats())
