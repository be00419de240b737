"""autoopt.workload.load: every way a model file can break gives a ModelFileError naming the file
and the function; valid files give a Workload with the model.* / workload.* facts."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autoopt.env import capabilities_for
from autoopt.errors import ModelFileError, UserError
from autoopt.facts import FACTS
from autoopt.workload.build import build_workload
from autoopt.workload.inspect import optimizer_impl, source_uses_autocast
from autoopt.workload.load import load_model_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"


@pytest.fixture(scope="module")
def cpu():
    return capabilities_for("cpu", "test cpu", None, 4096.0, None, ("avx2",))


def _load_and_build(path, caps, **kw):
    return build_workload(load_model_file(path), caps, **kw)


def _write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


# (file, the function the message names, words the message must contain)
MALFORMED = [
    ("does_not_exist.py", None, ["no such file", "Fix:"]),
    ("bad_is_directory", None, ["is a directory", "bad_is_directory/model.py"]),
    ("bad_not_python.yaml", None, ["not a Python file", ".py"]),
    ("bad_binary.py", None, ["not Python source", "binary"]),
    ("bad_syntax.py", None, ["syntax error", "line 10", "column"]),
    ("bad_import.py", "import", ["autoopt_test_missing_dependency", "pip install"]),
    ("bad_sys_exit.py", "import", ["sys.exit", "__main__"]),
    ("bad_raises_at_import.py", "import", ["FileNotFoundError", "line 5"]),
    ("bad_missing_build_model.py", "build_model", ["missing", "build_models"]),
    ("bad_missing_make_batch.py", "make_batch", ["missing", "def make_batch(batch_size)"]),
    ("bad_not_callable.py", "make_batch", ["Tensor", "not a function"]),
    ("bad_batch_size.py", "BATCH_SIZE", ["'64'", "positive integer"]),
    ("bad_build_model_returns.py", "build_model", ["tuple", "build_optimizer"]),
    ("bad_build_model_raises.py", "build_model", ["KeyError", "hidden_size", "line 8"]),
    ("bad_make_batch.py", "make_batch", ["numpy", "torch.from_numpy"]),
    ("bad_make_batch_fixed_size.py", "make_batch", ["32", "(8, 10)", "batch_size"]),
    ("bad_shape_mismatch.py", "forward", ["fc1", "Linear", "400", "256", "(32, 256)"]),
    ("bad_loss_not_scalar.py", "forward", ["not a scalar", "(32,)", "return the loss"]),
    ("bad_optimizer.py", "build_optimizer", ["NoneType", "torch.optim.Optimizer"]),
    ("bad_dataloader.py", "build_dataloader", ["Dataset", "DataLoader("]),
]


@pytest.mark.parametrize("name,function,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_model_file_gives_one_paragraph_error(name, function, words, cpu):
    path = MODELS / name
    with pytest.raises(ModelFileError) as info:
        _load_and_build(path, cpu)
    err = info.value
    msg = err.message
    assert name in msg, msg  # names the file
    if function is not None:
        assert f": {function}" in msg, msg  # names the function
        assert err.function.startswith(function)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    assert "Fix:" in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert err.exit_code == 2
    assert isinstance(err, UserError)


def test_errors_keep_the_original_exception_for_debug(cpu):
    with pytest.raises(ModelFileError) as info:
        _load_and_build(MODELS / "bad_shape_mismatch.py", cpu)
    assert isinstance(info.value.cause, RuntimeError)
    assert info.value.cause.__traceback__ is not None
    with pytest.raises(ModelFileError) as info:
        load_model_file(MODELS / "bad_syntax.py")
    assert isinstance(info.value.cause, SyntaxError)
    with pytest.raises(ModelFileError) as info:
        load_model_file(MODELS / "bad_import.py")
    assert isinstance(info.value.cause, ModuleNotFoundError)


def test_import_leaves_sys_modules_and_sys_path_as_they_were(tmp_path):
    before_mods, before_path = set(sys.modules), list(sys.path)
    spec = load_model_file(MODELS / "style_nanogpt.py")
    assert spec.module.__name__ not in sys.modules
    assert not [m for m in set(sys.modules) - before_mods if m.startswith("_autoopt_model_")]
    assert sys.path == before_path
    for bad in ("bad_sys_exit.py", "bad_raises_at_import.py", "bad_import.py"):
        with pytest.raises(ModelFileError):
            load_model_file(MODELS / bad)
        assert sys.path == before_path
        assert not [m for m in sys.modules if m.startswith("_autoopt_model_")]


def test_two_loads_are_independent_modules():
    a = load_model_file(ROOT / "examples" / "simplenet.py")
    b = load_model_file(ROOT / "examples" / "simplenet.py")
    assert a.module is not b.module and a.module.__name__ != b.module.__name__
    assert a.name == "simplenet" and a.path.is_absolute()


def test_sibling_imports_work(tmp_path, cpu):
    _write(tmp_path, "mylayers.py", """
        import torch.nn as nn
        def head():
            return nn.Linear(6, 2)
    """)
    p = _write(tmp_path, "model.py", """
        import torch
        from mylayers import head
        def build_model():
            return head()
        def make_batch(batch_size):
            return torch.randn(batch_size, 6)
    """)
    w = _load_and_build(p, cpu)
    assert w.facts["model.linear_count"] == 1
    sys.modules.pop("mylayers", None)


def test_keyboard_interrupt_is_not_swallowed(tmp_path):
    p = _write(tmp_path, "ctrl_c.py", """
        raise KeyboardInterrupt
    """)
    with pytest.raises(KeyboardInterrupt):
        load_model_file(p)


def test_prints_from_user_code_do_not_reach_stdout(tmp_path, cpu, capsys):
    p = _write(tmp_path, "chatty.py", """
        import torch, torch.nn as nn
        print("importing chatty")
        def build_model():
            print("building")
            return nn.Linear(4, 2)
        def make_batch(batch_size):
            print("batch")
            return torch.randn(batch_size, 4)
    """)
    _load_and_build(p, cpu)
    out, err = capsys.readouterr()
    assert out == ""
    assert "importing chatty" in err and "building" in err


@pytest.mark.parametrize(
    "body,function,words",
    [
        (
            "def build_model():\n    return Net\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n",
            "build_model",
            ["class Net", "return Net()"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch():\n    return torch.randn(8, 4)\n",
            "make_batch",
            ["cannot be called as make_batch(batch_size)"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4, device='meta')\n",
            "make_batch",
            ["meta", "CPU tensors"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    yield torch.randn(batch_size, 4)\n",
            "make_batch",
            ["iterator", "build_dataloader"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return {'x': torch.randn(batch_size, 4), 'n': object()}\n",
            "make_batch",
            ["batch['n']", "not a tensor"],
        ),
        (
            "build_model = nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n",
            "build_model",
            ["module instance", "def build_model()"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n"
            "def forward(model, batch):\n    with torch.no_grad():\n        return model(batch).pow(2).mean()\n"
            "def build_optimizer(model):\n    return torch.optim.SGD(model.parameters(), lr=0.1)\n",
            "forward",
            ["does not require grad"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n"
            "def build_optimizer(model):\n    return torch.optim.SGD(model.parameters(), lr=0.1)\n",
            "forward (default: model(batch))",
            ["not a scalar", "(32, 2)", "model's outputs"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n"
            "def forward(model, batch):\n    x, y = batch\n    return model(x)\n",
            "forward",
            ["outside any layer", "ValueError"],
        ),
        (
            "def build_model():\n    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 3, 16, 16)\n",
            "forward (default: model(batch))",
            ["`0`", "expects 1 input channels but gets 3", "in_channels=3"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    return torch.randn(batch_size, 4)\n"
            "def build_dataloader(batch_size):\n    return []\n",
            "build_dataloader",
            ["no batch"],
        ),
        (
            "def build_model():\n    return nn.Linear(4, 2)\n"
            "def make_batch(batch_size):\n    raise SystemExit(3)\n",
            "make_batch",
            ["sys.exit(3)"],
        ),
    ],
    ids=[
        "returns-class",
        "wrong-signature",
        "tensor-not-on-cpu",
        "generator",
        "non-tensor-leaf",
        "module-instance",
        "loss-no-grad",
        "logits-as-loss",
        "forward-outside-layer",
        "conv-channels",
        "empty-dataloader",
        "sys-exit-in-function",
    ],
)
def test_more_contract_breaks(tmp_path, cpu, body, function, words):
    p = _write(tmp_path, "m.py", "import torch\nimport torch.nn as nn\nclass Net(nn.Module):\n    pass\n" + body)
    with pytest.raises(ModelFileError) as info:
        _load_and_build(p, cpu)
    msg = info.value.message
    assert f"m.py: {function}:" in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"


def test_batch_size_comes_from_argument_then_file_then_default(tmp_path, cpu):
    body = """
        import torch, torch.nn as nn
        {bs}
        def build_model():
            return nn.Linear(3, 1)
        def make_batch(batch_size):
            return torch.randn(batch_size, 3)
    """
    with_bs = _write(tmp_path, "a.py", body.format(bs="BATCH_SIZE = 12"))
    without = _write(tmp_path, "b.py", body.format(bs=""))
    assert _load_and_build(with_bs, cpu).batch_size == 12
    assert _load_and_build(with_bs, cpu, batch_size=5).batch_size == 5
    w = _load_and_build(without, cpu)
    assert w.batch_size == 32 and w.facts["workload.batch_size"] == 32
    with pytest.raises(UserError):
        _load_and_build(without, cpu, batch_size=0)


def test_seeds_torch_before_build_model_and_make_batch(tmp_path, cpu):
    p = _write(tmp_path, "seeds.py", """
        import torch, torch.nn as nn
        SEEN = []
        def build_model():
            SEEN.append(("build", torch.randint(0, 10**9, (1,)).item()))
            return nn.Linear(3, 1)
        def make_batch(batch_size):
            SEEN.append(("batch", torch.randint(0, 10**9, (1,)).item()))
            return torch.randn(batch_size, 3)
    """)
    spec = load_model_file(p)
    torch.manual_seed(999)
    build_workload(spec, cpu, seed=5)
    first = list(spec.module.SEEN)
    spec.module.SEEN.clear()
    torch.rand(100)  # disturb the global generator
    build_workload(spec, cpu, seed=5)
    assert spec.module.SEEN == first
    torch.manual_seed(5)
    expected = torch.randint(0, 10**9, (1,)).item()
    assert first[0] == ("build", expected) and first[1] == ("batch", expected)
    spec.module.SEEN.clear()
    build_workload(spec, cpu, seed=6)
    assert spec.module.SEEN[0] != first[0]


def test_every_model_and_workload_fact_is_filled(cpu):
    w = _load_and_build(ROOT / "examples" / "simplenet.py", cpu)
    wanted = {k for k in FACTS if k.startswith(("model.", "workload."))}
    assert wanted <= set(w.facts), wanted - set(w.facts)


def test_dynamic_shapes_are_detected(tmp_path, cpu):
    p = _write(tmp_path, "dyn.py", """
        import torch, torch.nn as nn
        def build_model():
            return nn.EmbeddingBag(50, 8)
        def make_batch(batch_size):
            n = int(torch.randint(3, 40, (1,)))
            return torch.randint(0, 50, (batch_size, n))
    """)
    assert _load_and_build(p, cpu).facts["workload.static_shapes"] is False
    q = _write(tmp_path, "dyn_loader.py", """
        import torch, torch.nn as nn
        def build_model():
            return nn.EmbeddingBag(50, 8)
        def make_batch(batch_size):
            return torch.randint(0, 50, (batch_size, 10))
        def build_dataloader(batch_size):
            return [torch.randint(0, 50, (batch_size, n)) for n in (10, 17, 12)]
    """)
    w = _load_and_build(q, cpu)
    assert w.facts["workload.static_shapes"] is False
    assert w.facts["workload.has_dataloader"] is True
    assert w.facts["workload.dataloader_workers"] is None  # not a torch DataLoader


def test_dataloader_facts(tmp_path, cpu):
    p = _write(tmp_path, "dl.py", """
        import torch, torch.nn as nn
        from torch.utils.data import DataLoader, TensorDataset
        def build_model():
            return nn.Linear(5, 2)
        def make_batch(batch_size):
            return torch.randn(batch_size, 5)
        def build_dataloader(batch_size):
            ds = TensorDataset(torch.randn(64, 5))
            return DataLoader(ds, batch_size=batch_size, num_workers=1, persistent_workers=True,
                              collate_fn=lambda items: torch.stack([t[0] for t in items]))
    """)
    f = _load_and_build(p, cpu, batch_size=16).facts
    assert f["workload.dataloader_workers"] == 1
    assert f["workload.persistent_workers"] is True
    assert f["workload.pin_memory"] is False
    assert f["workload.static_shapes"] is True


def test_autocast_channels_last_and_compiled_are_detected(tmp_path, cpu):
    p = _write(tmp_path, "tuned.py", """
        import torch, torch.nn as nn
        def build_model():
            m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
            m(torch.randn(1, 3, 12, 12))
            return m.to(memory_format=torch.channels_last)
        def make_batch(batch_size):
            return torch.randn(batch_size, 3, 12, 12)
        def forward(model, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(batch)
    """)
    f = _load_and_build(p, cpu).facts
    assert f["workload.autocast"] is True
    assert f["workload.channels_last"] is True
    assert f["workload.input_is_4d"] is True
    assert f["workload.compiled"] is False

    q = _write(tmp_path, "plain.py", """
        import torch, torch.nn as nn
        def build_model():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        def make_batch(batch_size):
            return torch.randn(batch_size, 3, 12, 12)
        def forward(model, batch):
            # keep the norm in fp32: torch.autocast("cpu", enabled=False) is not AMP
            with torch.autocast("cpu", enabled=False):
                return model(batch)
    """)
    f = _load_and_build(q, cpu).facts
    assert f["workload.autocast"] is False
    assert f["workload.channels_last"] is False


@pytest.mark.slow
def test_compiled_model_is_detected_without_compiling(tmp_path, cpu):
    p = _write(tmp_path, "compiled.py", """
        import torch, torch.nn as nn
        def build_model():
            return torch.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        def make_batch(batch_size):
            return torch.randn(batch_size, 4)
    """)
    q = _write(tmp_path, "compiled_inplace.py", """
        import torch, torch.nn as nn
        def build_model():
            m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            m.compile()
            return m
        def make_batch(batch_size):
            return torch.randn(batch_size, 4)
    """)
    for path in (p, q):
        w = _load_and_build(path, cpu)
        assert w.facts["workload.compiled"] is True
        assert w.facts["model.linear_count"] == 2


def test_source_autocast_detection():
    def uses(model, batch):
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            return model(batch)

    def disabled(model, batch):
        with torch.autocast("cuda", enabled=False):
            return model(batch)

    def commented(model, batch):
        # with torch.autocast("cuda"):
        return model(batch)

    assert source_uses_autocast(uses)
    assert not source_uses_autocast(disabled)
    assert not source_uses_autocast(commented)


def test_optimizer_implementation_as_torch_picks_it():
    params = list(torch.nn.Linear(3, 3).parameters())
    assert optimizer_impl(torch.optim.SGD(params, lr=0.1)) == "for-loop"  # CPU default
    assert optimizer_impl(torch.optim.SGD(params, lr=0.1, foreach=True)) == "foreach"
    assert optimizer_impl(torch.optim.Adam(params, foreach=False)) == "for-loop"
    assert optimizer_impl(torch.optim.Adam(params, fused=True)) == "fused"
    assert optimizer_impl(torch.optim.LBFGS(params)) == "for-loop"
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    # torch's own default picks foreach only when every parameter is on a foreach-capable device
    from torch.optim.optimizer import _get_foreach_kernels_supported_devices

    expected = "foreach" if "meta" in _get_foreach_kernels_supported_devices() else "for-loop"
    assert optimizer_impl(torch.optim.SGD(meta, lr=0.1)) == expected


def test_repeated_blocks_and_attention_count(tmp_path, cpu):
    p = _write(tmp_path, "enc.py", """
        import torch, torch.nn as nn
        def build_model():
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
            return nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        def make_batch(batch_size):
            return torch.randn(batch_size, 10, 32)
    """)
    f = _load_and_build(p, cpu).facts
    assert f["model.repeated_block_count"] == 3
    assert f["model.attention_count"] == 3  # MultiheadAttention modules
    assert f["model.linear_count"] == 9  # out_proj + 2 FFN linears per layer
    assert f["workload.mode"] == "infer"
    assert f["workload.optimizer"] == "" and f["workload.optimizer_impl"] is None


def test_cpu_count_is_the_affinity_set(cpu):
    f = _load_and_build(ROOT / "examples" / "mlp.py", cpu).facts
    assert f["workload.cpu_count"] == len(os.sched_getaffinity(0))


def test_cuda_capabilities_without_cuda_are_refused(cpu):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    gpu = capabilities_for("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 40960, 108)
    with pytest.raises(UserError):
        _load_and_build(ROOT / "examples" / "mlp.py", gpu)


def test_a_training_script_gets_a_pointer_to_script_and_is_not_imported(tmp_path):
    """`autoopt optimize train.py` on an ordinary training script: exit 2 naming --script, and
    the script is not run (importing a script without a main guard would start its training)."""
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(
        "import argparse, pathlib, torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "parser = argparse.ArgumentParser()\n"
        "model = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for _ in range(3):\n"
        "    model(torch.randn(2, 4)).sum().backward()\n"
        "    opt.step()\n")
    with pytest.raises(ModelFileError) as info:
        load_model_file(script)
    assert "--script" in info.value.message and "training script" in info.value.message
    assert not marker.exists()


def test_sibling_modules_are_fresh_on_every_load(tmp_path, monkeypatch):
    """A model file importing a sibling (`from common import ...`) gets it re-read on each
    load, and a same-named sibling of another folder is never mixed up with it."""
    import sys

    from autoopt.workload.load import load_model_file

    for d, size in (("a", "AUTOOPT_T_SIZE"), ("b", None)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "common.py").write_text(
            "import os\nSIZE = int(os.environ.get('AUTOOPT_T_SIZE', '7'))\n" if size else "SIZE = 99\n")
        (tmp_path / d / "model.py").write_text(
            "import torch\nfrom common import SIZE\nBATCH_SIZE = 2\n"
            "def build_model():\n    return torch.nn.Linear(SIZE, 1)\n"
            "def make_batch(bs):\n    return torch.randn(bs, SIZE)\n"
            "def forward(model, batch):\n    return model(batch).sum()\n")
    monkeypatch.setenv("AUTOOPT_T_SIZE", "3")
    assert load_model_file(str(tmp_path / "a" / "model.py")).module.SIZE == 3
    monkeypatch.setenv("AUTOOPT_T_SIZE", "5")
    assert load_model_file(str(tmp_path / "a" / "model.py")).module.SIZE == 5
    assert load_model_file(str(tmp_path / "b" / "model.py")).module.SIZE == 99
    assert "common" not in sys.modules
