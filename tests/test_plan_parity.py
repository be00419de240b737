"""A training loop written with `autoopt.plan.Plan` runs the configuration autoopt measured.

For every transform (with parameters a CPU can run), and for the combinations the bundled
examples keep, the same configuration is run twice from the same seed on the same batches:
as the Session autoopt measures (autoopt.run.session) and as a user's loop written with a
Plan (prepare_model / prepare_optimizer / prepare_dataloader / prepare_batch / autocast /
backward / step). Both must put the same settings in force — process-wide settings, the
model's memory format, dtype, checkpointing and torch.compile call, the optimizer's
implementation, the DataLoader's settings — and compute the same losses (or inference
outputs) within the transform's tolerance.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from autoopt.plan import Plan
from autoopt.run import apply
from autoopt.run.session import Session, seeded_batch, split_batch
from autoopt.transforms import TRANSFORMS, apply_transforms, get_transform
from autoopt.types import Capabilities
from autoopt.workload import contract

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
CPU = Capabilities("cpu", name="test CPU", cpu_flags=("avx2",))

TRAIN_MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
BATCH_SIZE = 8
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.fc = nn.Linear(8, 4)
    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(self.blocks(x))
def build_model():
    return Net()
def make_batch(batch_size):
    return torch.randn(batch_size, 3, 8, 8), torch.randint(0, 4, (batch_size,))
def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)
def build_dataloader(batch_size):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))
'''

INFER_MODEL = '''
import torch, torch.nn as nn
BATCH_SIZE = 4
def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
def make_batch(batch_size):
    return torch.randn(batch_size, 3, 8, 8)
'''

# every single-process transform, with parameters this CPU can run
SINGLE = {
    "amp": {"dtype": "bfloat16", "grad_scaler": False},
    "batch_size": {"batch_size": 16, "previous": 8},
    "channels_last": {},
    "compile": {"mode": "default", "backend": "aot_eager"},
    "cuda_graphs": {"backend": "aot_eager"},
    "tf32": {"precision": "high"},
    "cudnn_benchmark": {},
    "fused_optimizer": {"impl": "fused"},
    "dataloader": {"num_workers": 1, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 2,
                   "intra_op_threads": 1, "non_blocking": False},
    "activation_checkpointing": {},
    "grad_accumulation": {"steps": 2},
    "inference_mode": {"weights_dtype": None},
    "threads": {"num_threads": 1},
}
CASES = [("train", [(name, params)]) for name, params in SINGLE.items() if name != "inference_mode"]
CASES += [("infer", [("inference_mode", {"weights_dtype": None})]),
          ("infer", [("inference_mode", {"weights_dtype": "bfloat16"}), ("channels_last", {})]),
          ("train", [("amp", {"dtype": "float16", "grad_scaler": True})]),
          ("train", [("fused_optimizer", {"impl": "foreach"})])]
# the combinations the bundled examples keep (bench/README.md, docs/gpu-results.md)
EXAMPLES = [
    ("simplenet", [("channels_last", {}), ("batch_size", {"batch_size": 64, "previous": 32})]),
    ("simplenet", [("amp", {"dtype": "bfloat16", "grad_scaler": False}), ("channels_last", {}),
                   ("fused_optimizer", {"impl": "fused"})]),
    ("mlp", [("fused_optimizer", {"impl": "fused"}), ("amp", {"dtype": "bfloat16", "grad_scaler": False})]),
    ("resnet_infer", [("channels_last", {}), ("batch_size", {"batch_size": 64, "previous": 32})]),
    ("simplenet", [("cuda_graphs", {"backend": "aot_eager"}), ("batch_size", {"batch_size": 64, "previous": 32})]),
]


def test_every_transform_has_a_parity_case():
    assert set(SINGLE) == set(TRANSFORMS)


def _workload(path):
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    return build_workload(load_model_file(str(path)), CPU, seed=0)


@contextlib.contextmanager
def _compile_calls(calls: list):
    """Record every torch.compile call's mode and backend (and still compile)."""
    real = torch.compile

    def spy(model, *a, **kw):
        calls.append((kw.get("mode") or "default", kw.get("backend", "inductor")))
        return real(model, *a, **kw)

    torch.compile = spy
    try:
        yield
    finally:
        torch.compile = real


def _state(model, optimizer, loader) -> dict:
    """The settings a configuration put in force, as a user would observe them."""
    inner = getattr(model, "_orig_mod", model)
    weights = [p for p in inner.parameters() if p.dim() == 4]
    out = {"process": apply.read_process_settings(),
           "channels_last": bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights),
           "dtype": next(inner.parameters()).dtype,
           "checkpointed": sum(1 for m in inner.modules() if getattr(m, "_autoopt_checkpointed", False))}
    if optimizer is not None:
        g = optimizer.param_groups[0]
        out["optimizer"] = (type(optimizer).__name__, bool(g.get("fused")), bool(g.get("foreach")))
    if loader is not None:
        out["loader"] = (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor)
    return out


def _steps(wl, cfg):
    """Each verification step's micro-batches (the effective batch, split for accumulation)."""
    k = max(1, cfg.grad_accum_steps)
    return [split_batch(seeded_batch(wl, cfg.batch_size * k, i), k) for i in range(STEPS)]


def _measured(wl, cfg):
    """The Session autoopt measures: its settings and what it computes."""
    calls: list = []
    with _compile_calls(calls), Session(wl, cfg) as s:
        state = _state(s.model, s.optimizer, s._loader)
        if s.train:
            values = [float(s.train_on([s.prepare(b) for b in micro])) for micro in _steps(wl, cfg)]
        else:
            values = [s.infer_on(s.prepare(seeded_batch(wl, cfg.batch_size, i))).float() for i in range(2)]
        first = next(iter(s._loader))[0] if s._loader is not None else None
    return state, calls, values, first


def _user_loop(wl, plan, cfg):
    """A user's training loop written with the Plan, on the same seed and batches."""
    calls: list = []
    spec = wl.spec
    saved = apply.read_process_settings()
    try:
        with _compile_calls(calls):
            torch.manual_seed(wl.seed)
            model = plan.prepare_model(spec.build_model())
            model.train(plan.mode == "train")
            opt = plan.prepare_optimizer(spec.build_optimizer(model)) if plan.mode == "train" else None
            loader = None
            if spec.build_dataloader is not None:
                torch.manual_seed(wl.seed)
                loader = plan.prepare_dataloader(spec.build_dataloader(plan.batch_size))
            state = _state(model, opt, loader)
            if plan.mode == "train":
                values = []
                for micro in _steps(wl, cfg):
                    total = 0.0
                    for b in micro:
                        with plan.autocast():
                            loss = contract.call_forward(spec, model, plan.prepare_batch(b))
                        plan.backward(loss)
                        plan.step(opt)
                        total += float(loss.detach()) / len(micro)
                    values.append(total)
            else:
                values = []
                for i in range(2):
                    with plan.inference():
                        values.append(model(plan.prepare_batch(seeded_batch(wl, plan.batch_size, i))).float())
            first = next(iter(loader))[0] if loader is not None else None
    finally:
        apply.write_process_settings(saved)
    return state, calls, values, first


def _check(wl, items):
    names = [n for n, _ in items]
    base = wl.base_config()
    cfg = apply_transforms(base, items, wl)
    plan = Plan.from_transforms(items, device="cpu", mode=wl.mode, baseline_batch_size=wl.batch_size)
    assert plan.config == cfg, names  # the plan describes exactly the measured configuration
    m_state, m_calls, m_values, m_first = _measured(wl, cfg)
    p_state, p_calls, p_values, p_first = _user_loop(wl, plan, cfg)
    assert p_state == m_state, names
    assert p_calls == m_calls, names
    tol = max(get_transform(n).tolerance_for(p) for n, p in items)
    for a, b in zip(p_values, m_values):
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape and ((a - b).abs().max() <= tol * b.abs().max()), names
        else:
            assert a == pytest.approx(b, rel=tol), (names, p_values, m_values)
    if m_first is not None:
        assert torch.equal(p_first, m_first), names


@pytest.mark.slow
@pytest.mark.parametrize("mode, items", CASES, ids=["+".join(n for n, _ in c[1]) + f"-{c[0]}" for c in CASES])
def test_plan_runs_the_measured_configuration(tmp_path, mode, items):
    path = tmp_path / f"{mode}_model.py"
    path.write_text(TRAIN_MODEL if mode == "train" else INFER_MODEL)
    _check(_workload(path), items)


@pytest.mark.slow
@pytest.mark.parametrize("example, items", EXAMPLES, ids=[e + ":" + "+".join(n for n, _ in i) for e, i in EXAMPLES])
def test_plan_runs_the_kept_combinations_of_the_examples(example, items):
    _check(_workload(ROOT / "examples" / f"{example}.py"), items)
