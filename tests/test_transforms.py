"""Transforms: check / resolve / apply on CPU workloads (GPU decisions through
Capabilities taken from real traces), the real-code helpers the runner calls
(apply_checkpointing, rebuild_optimizer, rebuild_dataloader, choose_settings) and the
throughput-driven batch-size search."""
from __future__ import annotations

import copy
import gzip
import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from autoopt.run.apply import apply_checkpointing
from autoopt.run.loaders import rebuild_dataloader
from autoopt.run.measure import Paired
from autoopt.run.optimizers import rebuild_optimizer
from autoopt.search.batch import BatchSearch, is_oom, search_batch_size
from autoopt.transforms import TRANSFORMS, apply_transforms, get_transform, ordered
from autoopt.transforms.dataloader import choose_settings
from autoopt.types import Capabilities, ExecConfig, Measurement, ModelSpec, Stats, Workload
from autoopt.workload.inspect import optimizer_impl, workload_facts

TRACES = Path(__file__).resolve().parent / "data" / "traces" / "real"

EXPECTED_NAMES = {
    "amp", "channels_last", "compile", "batch_size", "tf32", "cudnn_benchmark", "fused_optimizer",
    "dataloader", "cuda_graphs", "activation_checkpointing", "grad_accumulation", "inference_mode", "threads",
}


# ---------------------------------------------------------------------------- fixtures
def caps_from_trace(rel: str) -> Capabilities:
    """Capabilities of the GPU that recorded a real trace (its deviceProperties)."""
    path = TRACES / rel
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        props = json.load(fh)["deviceProperties"][0]
    cc = (props["computeMajor"], props["computeMinor"])
    return Capabilities(
        device_type="cuda", name=props["name"], compute_capability=cc,
        total_memory_mb=props["totalGlobalMem"] / 2**20, sm_count=props["numSms"],
        bf16=cc >= (8, 0), fp16=cc >= (7, 0), tf32=cc >= (8, 0), tensor_cores=cc >= (7, 0), vendor="nvidia",
    )


CPU = Capabilities("cpu")
CPU_BF16 = Capabilities("cpu", bf16=True, cpu_flags=("avx512_bf16",))


@pytest.fixture
def single_thread():
    """Tiny numeric checks run faster on one thread than fighting for a shared machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def a100():
    return caps_from_trace("hta/a100_triton_kernel.json.gz")


@pytest.fixture(scope="module")
def v100():
    return caps_from_trace("kineto/resnet50_v100_num_workers_0.pt.trace.json.gz")


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.fc2(F.gelu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, n=4, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def cnn_batch(b):
    return torch.randn(b, 3, 8, 8), torch.randint(0, 10, (b,))


def cnn_forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def loader(b):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    return DataLoader(ds, batch_size=b, shuffle=True, generator=g)


def workload(build_model, make_batch, *, forward=None, build_optimizer=None, build_dataloader=None,
             caps=CPU, batch_size=8, facts=None) -> Workload:
    spec = ModelSpec(path=Path("model.py"), name="model", module=None, build_model=build_model,
                     make_batch=make_batch, forward=forward, build_optimizer=build_optimizer,
                     build_dataloader=build_dataloader, default_batch_size=batch_size)
    return Workload(spec, caps, batch_size, facts=dict(facts or {}))


def cnn_train(caps=CPU, **kw):
    return workload(CNN, cnn_batch, forward=cnn_forward, build_optimizer=sgd, build_dataloader=loader,
                    caps=caps, **kw)


def mlp_infer(caps=CPU, **kw):
    return workload(Stack, lambda b: torch.randn(b, 16), caps=caps, **kw)


def stack_train(caps=CPU, **kw):
    return workload(Stack, lambda b: torch.randn(b, 16),
                    forward=lambda m, x: m(x).pow(2).mean(),
                    build_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), caps=caps, **kw)


# ---------------------------------------------------------------------------- registry
def test_registry_names_and_metadata():
    assert set(TRANSFORMS) == EXPECTED_NAMES
    for name, t in TRANSFORMS.items():
        assert t.name == name
        assert t.safety in ("safe", "unsafe", "manual")
        assert 0 < t.tolerance <= 5e-2
        assert t.summary and "\n" not in t.summary
        assert t.__class__.__doc__ or __import__(t.__module__).__doc__
    assert get_transform("batch_size").safety == "manual"
    assert "learning rate" in get_transform("batch_size").summary
    with pytest.raises(KeyError, match="unknown transform"):
        get_transform("nope")


def test_tolerances_are_per_precision():
    amp = get_transform("amp")
    assert amp.tolerance_for({"dtype": "bfloat16"}) > amp.tolerance_for({"dtype": "float16"})
    assert get_transform("channels_last").tolerance <= 1e-3
    assert get_transform("compile").tolerance <= 1e-3
    im = get_transform("inference_mode")
    assert im.safety_for({}) == "safe" and im.safety_for({"weights_dtype": "bfloat16"}) == "unsafe"
    assert im.tolerance_for({"weights_dtype": "bfloat16"}) > im.tolerance_for({})


def test_ordering_puts_batch_first_and_compile_last():
    names = [t.name for t, _ in ordered([(n, {}) for n in EXPECTED_NAMES])]
    assert names[0] == "batch_size" and names[1] == "grad_accumulation"
    assert names.index("channels_last") < names.index("compile") < names.index("cuda_graphs")


# ---------------------------------------------------------------------------- check / resolve / apply
def test_amp_on_cpu_needs_fast_bf16_unless_asked():
    t = get_transform("amp")
    w = cnn_train()
    assert "bf16" in t.check(w, CPU, {})
    assert t.check(w, CPU, {"dtype": "bfloat16"}) is None
    assert t.check(cnn_train(CPU_BF16), CPU_BF16, {}) is None
    assert "dtype" in t.check(w, CPU, {"dtype": "int8"})
    p = t.resolve_params(w, CPU, {"dtype": "bfloat16"})
    assert p == {"dtype": "bfloat16", "grad_scaler": False}
    cfg = t.apply(w.base_config(), p, w)
    assert cfg.amp_dtype == "bfloat16" and not cfg.grad_scaler and cfg.device == "cpu"


def test_amp_picks_bf16_on_ampere_fp16_with_scaler_on_volta(a100, v100):
    t = get_transform("amp")
    assert t.resolve_params(cnn_train(a100), a100, {}) == {"dtype": "bfloat16", "grad_scaler": False}
    p = t.resolve_params(cnn_train(v100), v100, {})
    assert p == {"dtype": "float16", "grad_scaler": True}
    # inference needs no loss scaling
    assert t.resolve_params(mlp_infer(v100), v100, {}) == {"dtype": "float16", "grad_scaler": False}
    cfg = t.apply(ExecConfig(device="cuda"), p)
    assert cfg.amp_dtype == "float16" and cfg.grad_scaler


def test_amp_skips_a_forward_already_under_autocast(a100):
    w = cnn_train(a100, facts={"workload.autocast": True})
    assert "autocast" in get_transform("amp").check(w, a100, {})


def test_channels_last_needs_conv2d():
    t = get_transform("channels_last")
    assert t.check(cnn_train(), CPU, {}) is None
    assert "Conv2d" in t.check(mlp_infer(), CPU, {})
    assert t.apply(ExecConfig(), {}).channels_last

    def already():
        return CNN().to(memory_format=torch.channels_last)

    assert "already" in t.check(workload(already, cnn_batch), CPU, {})


def test_compile_modes_and_refusals(a100):
    t = get_transform("compile")
    w = cnn_train()
    assert t.check(w, CPU, {}) is None  # g++ is on this machine
    assert "CUDA" in t.check(w, CPU, {"mode": "reduce-overhead"})
    assert "unknown" in t.check(w, CPU, {"mode": "fast"})
    assert [c["mode"] for c in t.candidates(w, CPU, {})] == ["default"]
    wa = cnn_train(a100, facts={"workload.static_shapes": True})
    modes = [c["mode"] for c in t.candidates(wa, a100, {})]
    assert modes == ["default", "max-autotune-no-cudagraphs", "reduce-overhead"]
    cfg = t.apply(ExecConfig(), {"mode": "default", "backend": "aot_eager"})
    assert cfg.compile_mode == "default" and cfg.compile_backend == "aot_eager" and not cfg.cuda_graphs
    assert t.apply(ExecConfig(), {"mode": "reduce-overhead"}).cuda_graphs

    def compiled():
        return torch.compile(CNN(), backend="eager")

    assert "already" in t.check(workload(compiled, cnn_batch), CPU, {})


def test_cuda_graphs_refused_on_cpu_and_dynamic_shapes(a100):
    t = get_transform("cuda_graphs")
    assert "CPU" in t.check(cnn_train(), CPU, {})
    assert "shapes" in t.check(cnn_train(a100, facts={"workload.static_shapes": False}), a100, {})
    cfg = t.apply(ExecConfig(device="cuda", compile_mode="default"), {"backend": "inductor"})
    assert cfg.cuda_graphs and cfg.compile_mode == "reduce-overhead"


def test_tf32_needs_ampere(a100, v100):
    t = get_transform("tf32")
    assert "CPU" in t.check(cnn_train(), CPU, {})
    assert "8.0" in t.check(cnn_train(v100), v100, {})
    assert t.check(cnn_train(a100), a100, {}) is None
    assert "already" in t.check(cnn_train(a100, facts={"env.matmul_precision": "high"}), a100, {})
    assert t.apply(ExecConfig(), t.resolve_params(cnn_train(a100), a100, {})).matmul_precision == "high"
    assert t.safety == "unsafe"


def test_cudnn_benchmark_needs_conv_on_gpu_with_static_shapes(a100):
    t = get_transform("cudnn_benchmark")
    assert "CPU" in t.check(cnn_train(), CPU, {})
    assert "convolution" in t.check(mlp_infer(a100), a100, {})
    assert "shapes" in t.check(cnn_train(a100, facts={"workload.static_shapes": False}), a100, {})
    assert t.check(cnn_train(a100), a100, {}) is None
    assert t.apply(ExecConfig(), {}).cudnn_benchmark is True


def test_fused_optimizer_check_and_params(a100):
    t = get_transform("fused_optimizer")
    w = cnn_train()
    assert t.check(w, CPU, {}) is None
    assert t.resolve_params(w, CPU, {}) == {"impl": "fused"}
    assert [c["impl"] for c in t.candidates(w, CPU, {})] == ["fused", "foreach"]
    assert "train" in t.check(mlp_infer(), CPU, {})
    lbfgs = workload(CNN, cnn_batch, forward=cnn_forward, build_optimizer=lambda m: torch.optim.LBFGS(m.parameters()))
    assert "no foreach or fused" in t.check(lbfgs, CPU, {})
    fused = workload(CNN, cnn_batch, forward=cnn_forward,
                     build_optimizer=lambda m: torch.optim.Adam(m.parameters(), fused=True))
    assert "already" in t.check(fused, CPU, {})
    rms = workload(CNN, cnn_batch, forward=cnn_forward, build_optimizer=lambda m: torch.optim.RMSprop(m.parameters()))
    assert "no fused implementation" in t.check(rms, CPU, {"impl": "fused"})
    assert t.resolve_params(rms, CPU, {}) == {"impl": "foreach"}
    # on CUDA the default is already foreach: only fused is worth it
    assert [c["impl"] for c in t.candidates(cnn_train(a100), a100, {})] == ["fused"]
    assert t.apply(ExecConfig(), {"impl": "foreach"}).optimizer_impl == "foreach"


def test_optimizer_impl_matches_pytorch_defaults():
    params = list(nn.Linear(4, 4).parameters())
    assert optimizer_impl(torch.optim.SGD(params, lr=0.1)) == "for-loop"  # CPU parameters: no foreach default
    assert optimizer_impl(torch.optim.SGD(params, lr=0.1, foreach=True)) == "foreach"
    assert optimizer_impl(torch.optim.SGD(params, lr=0.1, fused=True)) == "fused"


def test_dataloader_check_resolve_apply(a100):
    t = get_transform("dataloader")
    assert "build_dataloader" in t.check(mlp_infer(), CPU, {})
    w = cnn_train(facts={"workload.cpu_count": 2})
    assert t.check(w, CPU, {}) is None
    p = t.resolve_params(w, CPU, {})
    assert p["num_workers"] == 2 and p["intra_op_threads"] == 1 and not p["pin_memory"]
    cfg = t.apply(ExecConfig(), p)
    assert cfg.dataloader == p
    one = cnn_train(facts={"workload.cpu_count": 1})
    assert "one CPU core" in t.check(one, CPU, {}) or "1 CPU core" in t.check(one, CPU, {})
    pg = t.resolve_params(cnn_train(a100, facts={"workload.cpu_count": 16}), a100, {})
    assert pg["pin_memory"] and pg["non_blocking"] and pg["num_workers"] == 8

    def not_a_loader(b):
        return [cnn_batch(b) for _ in range(3)]

    wl = workload(CNN, cnn_batch, forward=cnn_forward, build_optimizer=sgd, build_dataloader=not_a_loader)
    assert "not a torch DataLoader" in t.check(wl, CPU, {})


def test_threads_sized_to_the_free_cores_and_measured_against_one_and_half():
    from autoopt.run.apply import process_settings_for
    from autoopt.transforms.threads import thread_options

    assert thread_options(2, 1) == [1] and thread_options(8, 3) == [3, 1, 4] and thread_options(1, 1) == []
    assert thread_options(4, 8) == [1, 2]  # more free cores than threads: only fewer threads are this transform's
    t = get_transform("threads")
    busy = cnn_train(facts={"workload.cpu_count": 2, "env.num_threads": 2, "env.cpus_free": 1})
    assert t.check(busy, CPU, {}) is None
    assert t.resolve_params(busy, CPU, {}) == {"num_threads": 1}
    assert t.candidates(busy, CPU, {}) == [{"num_threads": 1}]
    big = mlp_infer(facts={"workload.cpu_count": 8, "env.num_threads": 8, "env.cpus_free": 3})
    assert [c["num_threads"] for c in t.candidates(big, CPU, {})] == [3, 1, 4]  # without a DataLoader too
    assert t.candidates(big, CPU, {"num_threads": 2}) == [{"num_threads": 2}]
    one = cnn_train(facts={"workload.cpu_count": 2, "env.num_threads": 1, "env.cpus_free": 1})
    assert "already runs 1 intra-op thread" in t.check(one, CPU, {})
    assert "whole number" in t.check(busy, CPU, {"num_threads": 0})
    assert "unknown threads settings" in t.check(busy, CPU, {"threads": 1})
    cfg = t.apply(ExecConfig(), {"num_threads": 1})
    assert cfg.num_threads == 1
    defaults = {"matmul_precision": "highest", "cudnn_benchmark": False, "cudnn_allow_tf32": True,
                "cuda_matmul_allow_tf32": False, "num_threads": 2}
    assert process_settings_for(cfg, defaults)["num_threads"] == 1
    # it wins over the dataloader's thread budget, and comes after it in a patch
    both = apply_transforms(ExecConfig(), [("dataloader", {"num_workers": 2, "intra_op_threads": 2}),
                                           ("threads", {"num_threads": 1})])
    assert process_settings_for(both, defaults)["num_threads"] == 1
    assert [x.name for x, _ in ordered([("threads", {}), ("dataloader", {})])] == ["dataloader", "threads"]
    with pytest.raises(ValueError):
        t.apply(ExecConfig(), {"num_threads": "2"})


def test_free_cores_from_other_work_and_loader_workers():
    from autoopt.diagnosis.facts_builder import build_facts, cpu_share_facts, diagnose
    from autoopt.env import busy_from_proc_stat, self_jiffies_from_stat

    assert cpu_share_facts({"workload.cpu_count": 2, "env.cpus_busy_other": 1.0, "env.num_threads": 2}) == {
        "env.cpus_free": 1, "env.threads_over_free": 1}
    assert cpu_share_facts({"workload.cpu_count": 2, "env.cpus_busy_other": 0.5})["env.cpus_free"] == 2
    assert cpu_share_facts({"workload.cpu_count": 4, "workload.dataloader_workers": 2,
                            "env.num_threads": 4})["env.threads_over_free"] == 2
    assert cpu_share_facts({"workload.cpu_count": 2, "env.cpus_busy_other": 3.0})["env.cpus_free"] == 1
    assert cpu_share_facts({"env.cpus_busy_other": 1.0}) == {}
    before = "cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n"
    after = "cpu  200 0 100 900 10 0 0 40 0 0\n"
    assert busy_from_proc_stat(before, after) == (150.0, 250.0)
    stat = "4242 (python (x) y) S 1 2 3 4 5 6 7 8 9 10 31 9 0 0 20 0"
    assert self_jiffies_from_stat(stat) == 40
    # AO907 from the facts of a run, and not once the configuration runs on the free cores
    facts = {"device.type": "cpu", "workload.cpu_count": 2, "env.num_threads": 2, "env.cpus_busy_other": 1.1}
    assert "AO907" in [f.code for f in diagnose(build_facts(workload=facts))]
    fixed = build_facts(workload=facts, config=ExecConfig(num_threads=1))
    assert fixed["env.threads_over_free"] == 0
    assert not {"AO907", "AO906"} & {f.code for f in diagnose(fixed)}


def test_activation_checkpointing_check():
    t = get_transform("activation_checkpointing")
    assert t.check(stack_train(), CPU, {}) is None
    assert "repeated blocks" in t.check(cnn_train(), CPU, {})
    assert "train" in t.check(mlp_infer(), CPU, {})
    assert t.apply(ExecConfig(), {}).activation_checkpointing


def test_batch_size_is_manual_and_needs_a_choice():
    t = get_transform("batch_size")
    w = cnn_train()
    assert t.check(w, CPU, {}) is None
    assert "already" in t.check(w, CPU, {"batch_size": 8})
    p = t.resolve_params(w, CPU, {"batch_size": 64})
    assert p == {"previous": 8, "batch_size": 64, "optimizer": "SGD", "lr": 0.05}
    cfg = t.apply(ExecConfig(batch_size=8), p)
    assert cfg.batch_size == 64
    # SGD at k = 8: linear scaling with a warm-up (autoopt.transforms.batch_size.lr_rule)
    assert (cfg.lr_scale, cfg.lr_warmup_steps) == (8.0, 40)
    assert "learning rate" in t.caveat(p) and "x8" in t.caveat(p) and "0.05 -> 0.4" in t.caveat(p)
    with pytest.raises(ValueError, match="search_batch_size"):
        t.apply(ExecConfig(), {})


def test_grad_accumulation_keeps_the_effective_batch():
    t = get_transform("grad_accumulation")
    w = cnn_train(batch_size=64)
    assert t.check(w, CPU, {"steps": 4}) is None
    assert "equal micro-batches" in t.check(w, CPU, {"steps": 3})
    assert "train" in t.check(mlp_infer(), CPU, {})
    cfg = t.apply(ExecConfig(batch_size=64), {"steps": 4})
    assert (cfg.batch_size, cfg.grad_accum_steps) == (16, 4)
    # with batch_size first (canonical order): the wanted batch, split
    cfg = apply_transforms(ExecConfig(batch_size=8), [("grad_accumulation", {"steps": 2}),
                                                      ("batch_size", {"batch_size": 128})])
    assert (cfg.batch_size, cfg.grad_accum_steps) == (64, 2)


def test_inference_mode_for_inference_models_only():
    t = get_transform("inference_mode")
    assert "autograd" in t.check(cnn_train(), CPU, {})
    w = mlp_infer()
    assert t.check(w, CPU, {}) is None
    assert "weights_dtype" in t.check(w, CPU, {"weights_dtype": "int4"})
    cfg = t.apply(ExecConfig(), t.resolve_params(w, CPU, {"weights_dtype": "bf16"}))
    assert cfg.inference_mode and cfg.weights_dtype == "bfloat16"
    assert t.apply(ExecConfig(), t.resolve_params(w, CPU, {})).weights_dtype is None


def test_inspect_prefers_loader_facts_and_builds_missing_ones():
    w = cnn_train(facts={"model.conv2d_count": 0})
    facts = workload_facts(w)
    assert facts["model.conv2d_count"] == 0  # autoopt.workload.load's value wins
    assert facts["workload.optimizer"] == "SGD"
    assert facts["_dataloader"]["num_workers"] == 0
    assert workload_facts(w) is facts  # cached per workload


# ---------------------------------------------------------------------------- activation checkpointing
def test_apply_checkpointing_recomputes_blocks_with_equal_gradients(single_thread):
    torch.manual_seed(0)
    ref = Stack()
    ckpt = copy.deepcopy(ref)
    assert apply_checkpointing(ckpt) == 4
    assert apply_checkpointing(ckpt) == 0  # idempotent
    assert ckpt.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(5, 16)
    ref(x).pow(2).mean().backward()
    for b in ckpt.layers:
        b.calls = 0
    ckpt(x).pow(2).mean().backward()
    assert all(b.calls == 2 for b in ckpt.layers)  # forward, then recomputed in backward
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=n)
    with torch.no_grad():
        for b in ckpt.layers:
            b.calls = 0
        ckpt(x)
    assert all(b.calls == 1 for b in ckpt.layers)  # no checkpoint outside autograd
    assert apply_checkpointing(CNN()) == 0


def test_checkpointing_saves_activation_memory():
    """Saved tensors for backward shrink: what checkpointing is for."""
    torch.manual_seed(0)
    model = Stack(n=6, d=64)
    x = torch.randn(64, 64)

    def saved_bytes(m):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x).sum()
        return total

    plain = saved_bytes(model)
    apply_checkpointing(model)
    assert saved_bytes(model) < plain / 2


# ---------------------------------------------------------------------------- fused optimizer
def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
], ids=["sgd", "adam", "adamw"])
def test_rebuild_optimizer_keeps_hyperparameters_and_trajectory(make, impl, single_thread):
    torch.manual_seed(0)
    a = Stack()
    b = copy.deepcopy(a)
    groups = [{"params": list(a.inp.parameters()) + list(a.layers.parameters())},
              {"params": list(a.head.parameters()), "lr": 1e-3}]
    opt_a = make(groups)
    opt_b0 = make([{"params": list(b.inp.parameters()) + list(b.layers.parameters())},
                   {"params": list(b.head.parameters()), "lr": 1e-3}])
    _train(a, opt_a, 3)
    _train(b, opt_b0, 3)
    opt_b = rebuild_optimizer(opt_b0, impl, "cpu")  # with state: continues the same trajectory
    assert type(opt_b) is type(opt_b0)
    assert opt_b.defaults[impl] is True
    for ga, gb in zip(opt_b0.param_groups, opt_b.param_groups):
        assert gb[impl] is True
        for k, v in ga.items():
            if k not in ("params", "fused", "foreach"):
                assert gb[k] == v, k
        assert all(p is q for p, q in zip(ga["params"], gb["params"]))
    _train(a, opt_a, 4, seed=2)
    _train(b, opt_b, 4, seed=2)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_rebuild_optimizer_refuses_with_reasons():
    m = Stack()
    with pytest.raises(ValueError, match="no fused implementation"):
        rebuild_optimizer(torch.optim.RMSprop(m.parameters()), "fused", "cpu")
    with pytest.raises(ValueError, match="no foreach implementation"):
        rebuild_optimizer(torch.optim.LBFGS(m.parameters()), "foreach", "cpu")
    with pytest.raises(ValueError, match="fused' or 'foreach"):
        rebuild_optimizer(torch.optim.SGD(m.parameters(), lr=0.1), "turbo", "cpu")
    with pytest.raises(ValueError, match="no kernels for cuda"):
        rebuild_optimizer(torch.optim.Adagrad(m.parameters()), "fused", "cuda")
    half = nn.Linear(4, 4)
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]
    with pytest.raises(ValueError, match="floating-point"):
        rebuild_optimizer(torch.optim.SGD(params, lr=0.1), "fused", "cpu")
    assert rebuild_optimizer(torch.optim.SGD(half.parameters(), lr=0.1), "fused", "cpu").defaults["fused"]


# ---------------------------------------------------------------------------- dataloader
def test_choose_settings_budgets_workers_and_threads():
    two = choose_settings(2, "cpu", {})
    assert two["num_workers"] == 2 and two["intra_op_threads"] == 1  # the measured 1.8x setting
    assert two["num_workers"] + two["intra_op_threads"] <= 3
    four = choose_settings(4, "cpu", {})
    assert four["num_workers"] + four["intra_op_threads"] == 4
    big = choose_settings(64, "cpu", {})
    assert big["num_workers"] == 8 and big["intra_op_threads"] == 32
    one = choose_settings(1, "cpu", {})
    assert one["num_workers"] == 0 and not one["persistent_workers"] and one["prefetch_factor"] is None
    gpu = choose_settings(16, "cuda", {})
    assert gpu["pin_memory"] and gpu["non_blocking"] and gpu["num_workers"] == 8 and gpu["persistent_workers"]
    assert gpu["num_workers"] + gpu["intra_op_threads"] == 16
    assert choose_settings(2, "cuda", {})["num_workers"] == 1
    assert choose_settings(16, "cuda", {"num_workers": 4, "prefetch_factor": 8})["prefetch_factor"] == 8


def _batches(dl, epochs=2):
    out = []
    for _ in range(epochs):
        torch.manual_seed(123)  # the shuffle order is drawn from the global RNG at iteration start
        out.append([tuple(t.clone() for t in b) for b in dl])
    return out


def test_rebuild_dataloader_yields_identical_batches_with_workers():
    ds = TensorDataset(torch.arange(40).float().view(20, 2), torch.arange(20))
    base = DataLoader(ds, batch_size=3, shuffle=True, drop_last=True)
    fast = rebuild_dataloader(base, {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 4,
                                     "pin_memory": False, "intra_op_threads": 1, "non_blocking": False})
    assert fast.num_workers == 2 and fast.persistent_workers and fast.prefetch_factor == 4
    assert fast.sampler is base.sampler and fast.drop_last and fast.batch_size == 3
    want, got = _batches(base), _batches(fast)
    assert len(want[0]) == 6
    for ew, eg in zip(want, got):
        for bw, bg in zip(ew, eg):
            for tw, tg in zip(bw, bg):
                assert torch.equal(tw, tg)


def test_rebuild_dataloader_keeps_generator_collate_and_batch_sampler():
    ds = TensorDataset(torch.arange(12).float())
    collate = lambda items: torch.stack([i[0] for i in items]) * 2  # noqa: E731
    base = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5), collate_fn=collate)
    fast = rebuild_dataloader(base, {"num_workers": 0, "pin_memory": False})
    assert fast.generator is base.generator and fast.collate_fn is collate
    base.generator.manual_seed(5)
    a = [b.clone() for b in base]
    base.generator.manual_seed(5)
    b = [x.clone() for x in fast]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 3

    from torch.utils.data import BatchSampler, SequentialSampler

    bs = BatchSampler(SequentialSampler(range(12)), batch_size=5, drop_last=False)
    custom = DataLoader(ds, batch_sampler=bs)
    rebuilt = rebuild_dataloader(custom, {"num_workers": 0})
    assert rebuilt.batch_sampler is bs
    assert [len(x[0]) for x in rebuilt] == [5, 5, 2]


def test_rebuild_dataloader_refusals():
    with pytest.raises(ValueError, match="not a torch.utils.data.DataLoader"):
        rebuild_dataloader([1, 2], {"num_workers": 2})

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(6))

    with pytest.raises(ValueError, match="iterable-style"):
        rebuild_dataloader(DataLoader(Stream(), batch_size=2), {"num_workers": 2})
    assert [b.tolist() for b in rebuild_dataloader(DataLoader(Stream(), batch_size=2), {"num_workers": 0})] == [
        [0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="unknown dataloader settings"):
        rebuild_dataloader(DataLoader(range(4)), {"workers": 2})


# ---------------------------------------------------------------------------- batch-size search
def fake_measure(curve, *, oom_above=None, mem_per_sample=1.0, spread=0.01, calls=None):
    """A measure() whose throughput follows curve(batch) and which runs out of memory
    above `oom_above`."""

    def measure(cfg):
        b = cfg.batch_size
        if calls is not None:
            calls.append(b)
        if oom_above is not None and b > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        tp = curve(b)
        ms = 1000.0 * b / tp
        stats = Stats(median=ms, mean=ms, min=ms * 0.99, max=ms * 1.01, p25=ms * (1 - spread / 2),
                      p75=ms * (1 + spread / 2), stdev=0.0, n=20)
        return Measurement(step_time_ms=stats, batch_size=b, throughput_per_s=tp, peak_memory_mb=b * mem_per_sample)

    return measure


def saturating(b, knee=256, peak=1000.0):
    return peak * min(b, knee) / knee if b <= knee else peak * (1 - 0.1 * (b / knee - 1))


def test_batch_search_stops_at_the_throughput_peak_not_the_memory_limit():
    calls = []
    res = search_batch_size(ExecConfig(batch_size=32), fake_measure(saturating, calls=calls),
                            memory_budget_mb=10_000)
    assert isinstance(res, BatchSearch)
    assert res.batch_size == 256
    # stopped after the first doubling without gain and one more to look past a dip
    assert calls == [32, 64, 128, 256, 512, 1024]
    statuses = {r["batch_size"]: r["status"] for r in res.table}
    assert statuses[256] == "chosen" and statuses[512] == "no_gain" and statuses[1024] == "no_gain"
    assert set(res.table[0]) == {"batch_size", "throughput_per_s", "peak_memory_mb", "status", "relative_throughput"}
    assert res.measurement.batch_size == 256
    assert "learning rate" in res.caveat and "no gain" in res.reason
    json.dumps(res.to_json())


def test_batch_search_looks_one_doubling_past_a_dip():
    # throughput dips at 64 (a kernel-blocking effect seen on CPUs) and peaks at 128
    curve = {32: 700.0, 64: 620.0, 128: 1100.0, 256: 1050.0, 512: 900.0}
    calls = []
    res = search_batch_size(ExecConfig(batch_size=32), fake_measure(lambda b: curve[b], calls=calls),
                            memory_budget_mb=None)
    assert res.batch_size == 128
    assert calls == [32, 64, 128, 256, 512]


def test_batch_search_backs_off_on_oom_with_one_midpoint():
    calls = []
    res = search_batch_size(ExecConfig(batch_size=64), fake_measure(lambda b: 10.0 * b, oom_above=300, calls=calls),
                            memory_budget_mb=None)
    assert calls == [64, 128, 256, 512, 384]
    assert res.batch_size == 256  # 384 ran out of memory too; 256 is the last that fit
    assert [r["status"] for r in res.table].count("oom") == 2
    res = search_batch_size(ExecConfig(batch_size=64), fake_measure(lambda b: 10.0 * b, oom_above=400),
                            memory_budget_mb=None)
    assert res.batch_size == 384 and "ran out of memory" in res.reason


def test_batch_search_respects_budget_noise_and_start():
    res = search_batch_size(ExecConfig(batch_size=16), fake_measure(lambda b: 10.0 * b, mem_per_sample=10.0),
                            memory_budget_mb=1000)
    assert res.batch_size == 96 and any(r["status"] == "over_budget" for r in res.table)  # 128 over, midpoint fits
    assert all(r["peak_memory_mb"] <= 1000 for r in res.table if r["status"] == "chosen")
    # gains inside the measured noise are not gains
    small = lambda b: 1000.0 * (1 + 0.05 * (b > 16))  # noqa: E731  +5 % past 16: under 2 SE at 10 % spread (5.9 %), over the 3 % floor
    noisy = search_batch_size(ExecConfig(batch_size=16), fake_measure(small, spread=0.10), memory_budget_mb=None)
    quiet = search_batch_size(ExecConfig(batch_size=16), fake_measure(small, spread=0.001), memory_budget_mb=None)
    assert noisy.batch_size == 16 and quiet.batch_size == 32
    assert search_batch_size(ExecConfig(batch_size=16), fake_measure(small), memory_budget_mb=None,
                             noise=0.05).batch_size == 16
    # a start that does not fit is halved
    res = search_batch_size(ExecConfig(batch_size=512), fake_measure(saturating, oom_above=100),
                            memory_budget_mb=None)
    assert res.batch_size == 96 and res.start == 512  # 512, 256, 128 OOM; 64 fits; 128 OOM; midpoint 96
    none = search_batch_size(ExecConfig(batch_size=4), fake_measure(saturating, oom_above=0), memory_budget_mb=None)
    assert none.batch_size is None and none.measurement is None
    assert search_batch_size(ExecConfig(), fake_measure(lambda b: 10.0 * b), memory_budget_mb=None,
                             max_batch=128).batch_size == 128


def paired(best, new, jitter=0.0, rounds=6):
    """A side-by-side measurement of new beside best: round ratios around the true ratio."""
    r = new.throughput_per_s / best.throughput_per_s
    return Paired(best, new, [r * (1 + jitter * (-1) ** i) for i in range(rounds)])


def test_batch_search_judges_each_size_beside_the_best_so_far():
    # +6 % per doubling up to 64: inside the noise of two single measurements at 25 % spread
    # (2 combined SE = 14.7 %), so even the look past the first dip (+12.4 %) misses it
    curve = {16: 1000.0, 32: 1060.0, 64: 1123.6, 128: 1100.0, 256: 900.0}
    noisy = fake_measure(lambda b: curve[b], spread=0.25)
    precise = fake_measure(lambda b: curve[b], spread=0.01)
    pairs = []

    def against(best, new):
        pairs.append((best.batch_size, new.batch_size))
        return paired(precise(best), precise(new))

    without = search_batch_size(ExecConfig(batch_size=16), noisy, memory_budget_mb=None)
    assert without.batch_size == 16  # a real 12 % gain lost in the noise
    apart = {r["batch_size"]: r for r in without.table}
    assert apart[32]["previous_batch_size"] == 16 and apart[32]["side_by_side"] is False
    assert apart[32]["ratio_to_previous"] == pytest.approx(1.06, abs=1e-3)
    res = search_batch_size(ExecConfig(batch_size=16), noisy, memory_budget_mb=None, against=against)
    assert res.batch_size == 64
    # every larger size measured beside the best so far; 128 (2 % slower) and 256 lose
    assert pairs == [(16, 32), (32, 64), (64, 128), (64, 256)]
    rows = {r["batch_size"]: r for r in res.table}
    assert rows[32]["ratio_to_best"] == pytest.approx(1.06, abs=1e-3)
    assert rows[128]["ratio_to_best"] == pytest.approx(0.979, abs=1e-3)
    assert rows[64]["status"] == "chosen" and rows[128]["status"] == rows[256]["status"] == "no_gain"
    assert "ratio_to_best" not in rows[16]  # the start, measured alone
    # each row carries the ratio that decided it: beside the size before it, with its interval,
    # not the product along the chain (256 was judged beside 64, its ratio 0.80, not 0.90)
    assert "ratio_to_previous" not in rows[16]
    assert rows[64]["previous_batch_size"] == 32 and rows[64]["ratio_to_previous"] == pytest.approx(1.06, abs=1e-3)
    assert rows[256]["previous_batch_size"] == 64 and rows[256]["ratio_to_previous"] == pytest.approx(0.801, abs=1e-3)
    for b in (32, 64, 128, 256):
        r = rows[b]
        assert r["ratio_low"] < r["ratio_to_previous"] < r["ratio_high"] and r["side_by_side"] is True
    assert rows[64]["relative_throughput"] == pytest.approx(1.1236, abs=1e-3)  # the compounded value, kept
    assert res.relative == pytest.approx(1.1236, abs=1e-3)  # chained side-by-side ratios
    assert res.to_json()["relative_throughput"] == pytest.approx(1.1236, abs=1e-3)
    assert "side by side" in res.reason

    # a gain the side-by-side measurement does not confirm is not a gain, however the
    # single measurement looked
    flat = fake_measure(lambda b: 1000.0, spread=0.01)
    lucky = fake_measure(lambda b: 1000.0 * (1.5 if b == 32 else 1.0), spread=0.01)
    res = search_batch_size(ExecConfig(batch_size=16), lucky, memory_budget_mb=None,
                            against=lambda a, b: paired(flat(a), flat(b)))
    assert res.batch_size == 16 and res.table[1]["ratio_to_best"] == 1.0
    # gains of 6 and 12 % whose rounds disagree by +-12 % (noise 15 %) are not gains either
    res = search_batch_size(ExecConfig(batch_size=16), noisy, memory_budget_mb=None,
                            against=lambda a, b: paired(precise(a), precise(b), jitter=0.12))
    assert res.batch_size == 16 and "no gain beyond the noise (15%)" in res.reason

    # the two did not fit together (None for the best): the new size's own measurement is
    # compared with the best's earlier one
    res = search_batch_size(ExecConfig(batch_size=16), precise, memory_budget_mb=None,
                            against=lambda a, b: Paired(None, precise(b), []))
    assert res.batch_size == 64 and "ratio_to_best" not in res.table[1]
    # out of memory measuring the larger size: the midpoint, as without a partner
    res = search_batch_size(ExecConfig(batch_size=64), fake_measure(lambda b: 10.0 * b, oom_above=400),
                            memory_budget_mb=None,
                            against=lambda a, b: paired(fake_measure(lambda b: 10.0 * b, oom_above=400)(a),
                                                        fake_measure(lambda b: 10.0 * b, oom_above=400)(b)))
    assert res.batch_size == 384 and "ran out of memory" in res.reason


def test_batch_search_propagates_real_errors():
    def broken(cfg):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        search_batch_size(ExecConfig(), broken, memory_budget_mb=None)
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_oom(MemoryError())
    assert not is_oom(ValueError("out of memory"))


def test_batch_search_on_a_real_tiny_model():
    """Real timed steps of a tiny MLP on the CPU: per-sample overhead dominates at
    batch 1, so the search must grow past it, and every try is in the table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def measure(cfg):
        x = torch.randn(cfg.batch_size, 32)
        for _ in range(3):  # warm-up
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        times = []
        for _ in range(25):
            t0 = time.perf_counter()
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            times.append((time.perf_counter() - t0) * 1000)
        st = Stats.of(times)
        return Measurement(step_time_ms=st, batch_size=cfg.batch_size,
                           throughput_per_s=cfg.batch_size / (st.median / 1000), peak_memory_mb=None)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: no thread oversubscription in the timing
    try:
        # noise=0.25: a doubling must win by 25 %; going from 1 to 4 samples per step on a
        # model this small costs almost nothing extra per step (~2x per doubling)
        res = search_batch_size(ExecConfig(batch_size=1), measure, memory_budget_mb=None, max_batch=256, noise=0.25)
    finally:
        torch.set_num_threads(threads)
    assert res.batch_size >= 4
    assert [r["batch_size"] for r in res.table][:3] == [1, 2, 4]
    chosen = [r for r in res.table if r["status"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["batch_size"] == res.batch_size
    assert round(res.measurement.throughput_per_s, 3) == max(r["throughput_per_s"] for r in res.table
                                                   if r["status"] in ("chosen", "ok"))


def test_a_failed_trial_names_what_the_model_would_need_for_the_transform():
    """channels_last on a model that flattens a convolution's output with .view() (opacus' MNIST
    example does): torch's own error, the reason the variant is given, says what to change."""
    from autoopt.results import Failure
    from autoopt.search.strategies import strategy
    from autoopt.search.trial import Outcome, Point
    from autoopt.types import Status
    from tests.test_budget import Clock, FakeEvaluator, _candidates, _m, _search

    conv = torch.nn.Conv2d(1, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError) as raised:
        conv(x).view(-1, 4 * 6 * 6)
    failure = Failure.of(raised.value)
    channels_last = get_transform("channels_last")
    assert ".view()" in channels_last.explain_failure(failure.message)
    assert channels_last.explain_failure("CUDA out of memory") == ""
    assert get_transform("amp").explain_failure(failure.message) == ""

    class Failing(FakeEvaluator):
        def trial(self, name, cfg, *, tolerance, anchor, verify=True, trace=True, deadline=None) -> Outcome:
            return Outcome(failure=failure)

    clock = Clock()
    search = _search(Failing(clock, cost=1.0, ratios={}), clock, budget=None, noise_check=False)
    search.run(strategy("greedy"), _candidates("channels_last"), Point(ExecConfig(), [], _m(10.0)))
    (v,) = search.variants
    assert v.status == Status.FAILED and v.reason.startswith("RuntimeError: view size is not compatible")
    assert "torch.flatten(x, 1) at that line would let channels_last apply" in v.reason
