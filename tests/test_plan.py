"""autoopt.plan: plan.json round trips, errors, and the API a training script uses."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoopt.errors import UserError
from autoopt.plan import Plan, PlanError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.fc(x)


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_round_trip_through_json(tmp_path):
    plan = Plan.from_transforms(
        [("amp", {"dtype": "bfloat16", "grad_scaler": False}), ("channels_last", {}),
         ("batch_size", {"previous": 32, "batch_size": 128}), ("grad_accumulation", {"steps": 2})],
        model="cnn", device="cpu", mode="train", baseline_batch_size=32, codes=["AO104", "AO202"], speedup=2.1,
    )
    assert plan.batch_size == 64 and plan.grad_accum_steps == 2 and plan.effective_batch_size == 128
    d = plan.to_dict()
    assert d["plan_version"] == 1 and d["autoopt_version"] and d["batch_size"] == 64
    assert d["config"]["amp_dtype"] == "bfloat16" and d["config"]["channels_last"] is True
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == d
    assert again.config == plan.config
    assert any("learning rate" in c for c in again.caveats())
    assert "amp(dtype=bfloat16" in again.describe()


def test_from_the_optimize_pipelines_dict_with_only_the_final_batch():
    d = {"model": "cnn", "model_path": "/x/cnn.py", "device": "cpu", "batch_size": 16,
         "transforms": [{"name": "grad_accumulation", "params": {"steps": 2}, "code": "AO404"}],
         "autoopt_version": "0.1.0"}
    plan = Plan.from_dict(d)
    assert plan.batch_size == 16 and plan.baseline_batch_size == 32 and plan.codes == ["AO404"]
    assert plan.to_dict()["transforms"][0]["code"] == "AO404"
    assert plan.to_dict()["model_path"] == "/x/cnn.py"


@pytest.mark.parametrize("bad, match", [
    ({"transforms": [{"name": "warp_speed", "params": {}}]}, "unknown transform 'warp_speed'"),
    ({"transforms": "amp"}, "no valid 'transforms' list"),
    ({"plan_version": 99, "transforms": []}, "newer than this autoopt"),
    ({"transforms": [{"name": "amp", "params": {"dtype": "int8"}}]}, "invalid transform parameters"),
    ([], "not a plan"),
])
def test_bad_plans_are_user_errors(bad, match):
    with pytest.raises(PlanError, match=match) as info:
        Plan.from_dict(bad, source="p.json")
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PlanError, match="bad.json cannot be read as JSON"):
        Plan.load(bad)


def test_empty_plan_changes_nothing():
    plan = Plan.from_transforms([], device="cpu", baseline_batch_size=8)
    model = Net()
    assert plan.prepare_model(model) is model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert plan.prepare_optimizer(opt) is opt
    dl = DataLoader(range(4))
    assert plan.prepare_dataloader(dl) is dl
    x = torch.randn(2, 3, 4, 4)
    assert plan.prepare_batch(x).is_contiguous()
    with plan.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert plan.scaler is None and plan.caveats() == []


def test_prepare_model_optimizer_batch_and_autocast():
    plan = Plan.from_transforms(
        [("amp", {"dtype": "bfloat16", "grad_scaler": False}), ("channels_last", {}),
         ("activation_checkpointing", {}), ("fused_optimizer", {"impl": "fused"})],
        device="cpu", baseline_batch_size=8,
    )
    model = plan.prepare_model(Net())
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(getattr(b, "_autoopt_checkpointed", False) for b in model.blocks)
    opt = plan.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert opt.defaults["fused"] is True and opt.defaults["momentum"] == 0.9
    x, y = plan.prepare_batch(data(4))
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.long
    with plan.autocast():
        assert torch.is_autocast_enabled("cpu")
        out = model(x)
    assert out.dtype == torch.bfloat16


def test_compile_plan_wraps_the_model():
    plan = Plan.from_transforms([("compile", {"mode": "default", "backend": "eager"})], device="cpu")
    model = plan.prepare_model(Net())
    assert type(model).__name__ == "OptimizedModule"
    # cuda_graphs' reduce-overhead mode falls back to the default mode off CUDA
    plan = Plan.from_transforms([("cuda_graphs", {"backend": "eager"})], device="cpu")
    assert plan.config.compile_mode == "reduce-overhead"
    assert type(plan.prepare_model(Net())).__name__ == "OptimizedModule"


def _loop(plan, model, opt, steps=4):
    losses = []
    for i in range(steps):
        x, y = plan.prepare_batch(data(8, seed=i))
        with plan.autocast():
            loss = F.cross_entropy(model(x), y)
        plan.backward(loss)
        plan.step(opt)
        losses.append(loss.item())
    return losses


def test_gradient_accumulation_matches_the_full_batch():
    """Two micro-batches of 4 with plan.backward/step give the same update as one batch of 8."""
    torch.manual_seed(0)
    ref = Net()
    acc = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    plan = Plan.from_transforms([("grad_accumulation", {"steps": 2})], device="cpu", baseline_batch_size=8)
    assert plan.batch_size == 4
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1)
    for i in range(3):
        x, y = data(8, seed=i)
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
        stepped = []
        for xs, ys in zip(x.split(4), y.split(4)):
            plan.backward(F.cross_entropy(acc(xs), ys))
            stepped.append(plan.step(opt_acc))
        assert stepped == [False, True]
    for (n, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_fp16_plan_uses_a_grad_scaler():
    plan = Plan.from_transforms([("amp", {"dtype": "float16", "grad_scaler": True})], device="cpu")
    assert isinstance(plan.scaler, torch.amp.GradScaler) and plan.scaler is plan.scaler
    torch.manual_seed(0)
    model = plan.prepare_model(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _loop(plan, model, opt)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert plan.scaler.get_scale() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_prepare_dataloader_and_threads():
    plan = Plan.from_transforms(
        [("dataloader", {"num_workers": 0, "pin_memory": True, "persistent_workers": False,
                         "prefetch_factor": None, "intra_op_threads": 1, "non_blocking": True})],
        device="cpu",
    )
    threads = torch.get_num_threads()
    try:
        dl = plan.prepare_dataloader(DataLoader(TensorDataset(torch.arange(6)), batch_size=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert dl.pin_memory is False  # no accelerator here: pinning would only warn
    assert [b[0].tolist() for b in dl] == [[0, 1], [2, 3], [4, 5]]


def test_inference_plan_with_bf16_weights():
    plan = Plan.from_transforms([("inference_mode", {"weights_dtype": "bfloat16"})], device="cpu", mode="infer")
    model = plan.prepare_model(Net()).eval()
    x = plan.prepare_batch(torch.randn(2, 3, 6, 6))
    assert x.dtype == torch.bfloat16
    with plan.inference():
        out = model(x)
    assert out.is_inference() and out.dtype == torch.bfloat16
    assert json.loads(json.dumps(plan.to_dict()))["config"]["weights_dtype"] == "bfloat16"
