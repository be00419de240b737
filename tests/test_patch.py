"""autoopt.patching.editor: every edit kind on small sources, diffs that `patch -p1` applies, and
round trips — the patched model file, imported again, runs the optimized configuration
in plain PyTorch."""
from __future__ import annotations

import importlib.util
import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autoopt import torch_helpers as _torch_helpers
from autoopt.patching.editor import PatchError, SourceEditor, unified_diff
from autoopt.transforms import get_transform
from autoopt.transforms.patch import build_patch
from autoopt.types import Capabilities, ModelSpec, Workload
from autoopt.workload.contract import call_forward

CPU = Capabilities("cpu")


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def import_file(path: Path, name: str = None):
    name = name or f"patched_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def spec_of(mod, path: Path) -> ModelSpec:
    return ModelSpec(path=path, name=path.stem, module=mod, build_model=mod.build_model, make_batch=mod.make_batch,
                     forward=getattr(mod, "forward", None), build_optimizer=getattr(mod, "build_optimizer", None),
                     build_dataloader=getattr(mod, "build_dataloader", None),
                     default_batch_size=getattr(mod, "BATCH_SIZE", None))


def resolved(w: Workload, *items):
    out = []
    for name, params in items:
        t = get_transform(name)
        out.append((t, t.resolve_params(w, w.caps, params)))
    return out


# ---------------------------------------------------------------------------- editor operations
def test_ensure_import_after_docstring_future_and_imports():
    ed = SourceEditor(src('''
        """Doc."""
        from __future__ import annotations
        import os

        X = 1
    '''))
    ed.ensure_import("torch")
    ed.ensure_import("torch")
    ed.ensure_import("torch.utils.data", "DataLoader")
    assert ed.code == src('''
        """Doc."""
        from __future__ import annotations
        import os
        import torch
        from torch.utils.data import DataLoader

        X = 1
    ''')
    aliased = SourceEditor("import torch as T\n")
    aliased.ensure_import("torch")
    assert aliased.code == "import torch as T\nimport torch\n"
    empty = SourceEditor('"""Only a docstring."""\n')
    empty.ensure_import("torch")
    assert empty.code == '"""Only a docstring."""\nimport torch\n'


def test_wrap_return_every_return_but_not_nested_functions():
    ed = SourceEditor(src('''
        def build_model(big=False):
            def helper():
                return 1
            if big:
                return Big()
            return Small() if helper() else Tiny()
    '''))
    ed.wrap_return("build_model", "{}.to(memory_format=torch.channels_last)")
    ed.wrap_return("build_model", "torch.compile({}, mode=\"default\")")
    assert "        return 1\n" in ed.code
    assert 'return torch.compile(Big().to(memory_format=torch.channels_last), mode="default")' in ed.code
    assert ('return torch.compile((Small() if helper() else Tiny()).to(memory_format=torch.channels_last), '
            'mode="default")') in ed.code
    compile(ed.code, "m.py", "exec")
    with pytest.raises(PatchError, match="no `return <value>`"):
        SourceEditor("def build_model():\n    pass\n").wrap_return("build_model", "f({})")
    with pytest.raises(PatchError, match="no top-level function build_model"):
        SourceEditor("x = 1\n").wrap_return("build_model", "f({})")


def test_update_return_call_changes_an_existing_compile():
    ed = SourceEditor("def build_model():\n    return torch.compile(Net(), mode='default')\n")
    assert ed.update_return_call("build_model", "torch.compile", {"mode": '"reduce-overhead"'})
    assert ed.code == 'def build_model():\n    return torch.compile(Net(), mode="reduce-overhead")\n'
    plain = SourceEditor("def build_model():\n    return Net()\n")
    assert not plain.update_return_call("build_model", "torch.compile", {"mode": '"x"'})
    assert plain.code == "def build_model():\n    return Net()\n"


def test_wrap_body_keeps_docstring_outside_and_is_idempotent():
    ed = SourceEditor(src('''
        def forward(model, batch):
            """One step."""
            # the loss
            x, y = batch
            return loss(model(x), y)
    '''))
    ed.wrap_body("forward", 'torch.autocast("cpu", dtype=torch.bfloat16)')
    ed.wrap_body("forward", 'torch.autocast("cpu", dtype=torch.bfloat16)')
    assert ed.code == src('''
        def forward(model, batch):
            """One step."""
            # the loss
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x, y = batch
                return loss(model(x), y)
    ''')
    one_line = SourceEditor("def forward(m, b): return m(b)\n")
    one_line.wrap_body("forward", "torch.inference_mode()")
    assert one_line.code == "def forward(m, b):\n    with torch.inference_mode():\n        return m(b)\n"


def test_missing_forward_is_added_with_the_contract_default():
    ed = SourceEditor(src('''
        import torch

        def build_model():
            return Net()

        def make_batch(n):
            return torch.randn(n, 3)

        if __name__ == "__main__":
            print(build_model())
    '''))
    ed.wrap_body("forward", "torch.inference_mode()")
    code = ed.code
    assert code.index("def make_batch") < code.index("def forward(model, batch)") < code.index("__main__")
    ns: dict = {}
    exec(compile(code.split("if __name__")[0], "m.py", "exec"), ns)  # noqa: S102 - our generated code

    class Echo(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return args, kwargs

    spec = ModelSpec(path=Path("m.py"), name="m", module=None, build_model=Echo, make_batch=lambda n: None)
    for batch in (torch.ones(2), (torch.ones(1), torch.zeros(1)), [torch.ones(1)], {"x": torch.ones(1)}):
        got = ns["forward"](Echo(), batch)
        want = call_forward(spec, Echo(), batch)
        assert repr(got) == repr(want)
        assert not torch.is_inference_mode_enabled()
    assert ed.forward_params() == ("model", "batch")
    bad = SourceEditor("def forward(x):\n    return x\n")
    with pytest.raises(PatchError, match="model, batch"):
        bad.forward_params()


def test_prepend_after_docstring_once():
    ed = SourceEditor('def forward(m, b):\n    """Doc."""\n    return m(b)\n')
    ed.prepend("forward", "b = f(b)\n")
    ed.prepend("forward", "b = f(b)\n")
    assert ed.code == 'def forward(m, b):\n    """Doc."""\n    b = f(b)\n    return m(b)\n'


def test_set_constant_replaces_or_adds():
    ed = SourceEditor("import torch\nBATCH_SIZE = 32  # per step\nLR: float = 0.1\n\ndef f():\n    BATCH_SIZE = 3\n")
    ed.set_constant("BATCH_SIZE", "128")
    ed.set_constant("LR", "0.4")
    ed.set_constant("GRAD_ACCUM_STEPS", "4", comment="autoopt: accumulate")
    assert ed.get_constant("BATCH_SIZE") == "128"
    assert "BATCH_SIZE = 128  # per step\n" in ed.code
    assert "LR: float = 0.4\n" in ed.code
    assert "    BATCH_SIZE = 3\n" in ed.code  # only module level
    assert ed.code.index("import torch") < ed.code.index("# autoopt: accumulate\nGRAD_ACCUM_STEPS = 4")
    assert ed.code.index("GRAD_ACCUM_STEPS") < ed.code.index("def f")
    assert SourceEditor("x = 1\n").get_constant("BATCH_SIZE") is None


def test_add_statements_after_imports_in_order_without_duplicates():
    ed = SourceEditor("import torch\nimport torch.nn as nn\n\nX = 1\n\n\ndef f():\n    pass\n")
    ed.add_statements("torch.backends.cudnn.benchmark = True\n", comment="autoopt: a")
    ed.add_statements('torch.set_float32_matmul_precision("high")\ntorch.backends.cudnn.benchmark = True\n')
    code = ed.code
    assert code.count("torch.backends.cudnn.benchmark = True") == 1
    assert code.index("import torch.nn") < code.index("benchmark") < code.index("set_float32") < code.index("X = 1")


def test_add_call_kwargs_styles():
    ed = SourceEditor(src('''
        from torch.optim import SGD

        def build_optimizer(model):
            return SGD(model.parameters(), lr=0.1, foreach=True)

        def build_dataloader(bs):
            return torch.utils.data.DataLoader(
                ds,
                batch_size=bs,
                num_workers=0,
            )
    '''))
    assert ed.add_call_kwargs("build_optimizer", {"SGD"}, {"fused": "True"}, remove={"foreach"}) == 1
    assert "return SGD(model.parameters(), lr=0.1, fused=True)" in ed.code
    ed.add_call_kwargs("build_dataloader", {"DataLoader"}, {"num_workers": "2", "pin_memory": "True"})
    assert (
        "    return torch.utils.data.DataLoader(\n        ds,\n        batch_size=bs,\n        num_workers=2,\n"
        "        pin_memory=True,\n    )\n"
    ) in ed.code
    compile(ed.code, "m.py", "exec")
    with pytest.raises(PatchError, match="no DataLoader"):
        ed.add_call_kwargs("build_optimizer", {"DataLoader"}, {"x": "1"})
    splat = SourceEditor("def build_optimizer(m):\n    return torch.optim.Adam(m.parameters(), **CFG)\n")
    with pytest.raises(PatchError, match=r"\*\*kwargs"):
        splat.add_call_kwargs("build_optimizer", {"Adam"}, {"fused": "True"})
    one = SourceEditor("def build_dataloader(b):\n    return DataLoader(\n        ds,\n    )\n")
    one.add_call_kwargs("build_dataloader", {"DataLoader"}, {"num_workers": "2"})
    assert one.code == "def build_dataloader(b):\n    return DataLoader(\n        ds,\n        num_workers=2,\n    )\n"


def test_add_function_once_before_first_def():
    ed = SourceEditor("import torch\n\n\nclass Net:\n    pass\n")
    helper = inspect.getsource(_torch_helpers._autoopt_channels_last)
    ed.add_function(helper)
    ed.add_function(helper)
    assert ed.code.count("def _autoopt_channels_last") == 1
    assert ed.code.index("def _autoopt_channels_last") < ed.code.index("class Net")


def test_syntax_error_is_a_patch_error():
    with pytest.raises(PatchError, match="cannot be parsed"):
        SourceEditor("def f(:\n", "bad.py")


def test_plain_pytorch_helpers_are_self_contained():
    """The helpers copied into patched files need nothing but torch."""
    ns = {"torch": torch}
    for fn in (_torch_helpers._autoopt_repeated_blocks, _torch_helpers._autoopt_checkpoint_blocks,
               _torch_helpers._autoopt_channels_last, _torch_helpers._autoopt_cast_floats):
        exec(inspect.getsource(fn), ns)  # noqa: S102
    batch = {"img": torch.randn(2, 3, 4, 4), "ids": (torch.ones(2, dtype=torch.long), [torch.randn(2, 3)])}
    out = ns["_autoopt_channels_last"](batch)
    assert out["img"].is_contiguous(memory_format=torch.channels_last) and not out["img"].is_contiguous()
    assert out["ids"][0].dtype == torch.long and isinstance(out["ids"][1], list)
    cast = ns["_autoopt_cast_floats"](batch, torch.bfloat16)
    assert cast["img"].dtype == torch.bfloat16 and cast["ids"][0].dtype == torch.long


# ---------------------------------------------------------------------------- diffs
@pytest.mark.skipif(shutil.which("patch") is None, reason="the patch tool is not installed")
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_unified_diff_applies_with_patch(tmp_path, trailing_newline):
    old = "import torch\n\ndef build_model():\n    return Net()" + ("\n" if trailing_newline else "")
    ed = SourceEditor(old)
    ed.wrap_return("build_model", "torch.compile({})")
    (tmp_path / "m.py").write_text(old)
    diff = unified_diff(old, ed.code, "m.py")
    assert diff.startswith("--- a/m.py\n+++ b/m.py\n")
    subprocess.run(["patch", "-p1", "--quiet"], input=diff, text=True, cwd=tmp_path, check=True)
    assert (tmp_path / "m.py").read_text() == ed.code
    assert unified_diff(old, old, "m.py") == ""


# ---------------------------------------------------------------------------- round trips
TRAIN_FILE = '''
"""A small CNN trained with SGD; forward records whether autocast is on."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 16
SEEN = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        SEEN["autocast"] = torch.is_autocast_enabled(x.device.type)
        SEEN["input_channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
        x = F.relu(self.conv(x))
        return self.fc(self.blocks(x).mean((2, 3)))


def build_model():
    return Net()


def make_batch(batch_size):
    return torch.randn(batch_size, 3, 8, 8), torch.randint(0, 10, (batch_size,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(
        model.parameters(),
        lr=0.01,
        momentum=0.9,
    )


def build_dataloader(batch_size):
    ds = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    return DataLoader(ds, batch_size=batch_size, shuffle=True)
'''


@pytest.fixture
def train_file(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    path = d / "cnn.py"
    path.write_text(TRAIN_FILE.lstrip())
    return path


def _workload(path: Path, caps=CPU, facts=None) -> Workload:
    mod = import_file(path, f"orig_{path.stem}_{abs(hash(str(path)))}")
    return Workload(spec_of(mod, path), caps, mod.BATCH_SIZE, facts=dict(facts or {}))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("patch") is None, reason="the patch tool is not installed")
def test_round_trip_training_file_runs_the_optimized_configuration(train_file):
    w = _workload(train_file, facts={"workload.cpu_count": 2})
    items = resolved(
        w,
        ("amp", {"dtype": "bfloat16"}), ("channels_last", {}), ("compile", {"backend": "aot_eager"}),
        ("fused_optimizer", {}), ("dataloader", {}), ("batch_size", {"batch_size": 64}),
        ("grad_accumulation", {"steps": 2}), ("activation_checkpointing", {}),
    )
    res = build_patch(train_file, items, w)
    assert res.skipped == []
    assert sorted(res.applied) == sorted(t.name for t, _ in items)
    assert train_file.read_text() == TRAIN_FILE.lstrip()  # the user's file is not touched
    subprocess.run(["patch", "-p1", "--quiet"], input=res.diff, text=True, cwd=train_file.parent, check=True)
    assert train_file.read_text() == res.new_source

    threads = torch.get_num_threads()
    try:
        m = import_file(train_file)
        assert torch.get_num_threads() == 1  # the dataloader's thread budget, at import
    finally:
        torch.set_num_threads(threads)
    assert m.BATCH_SIZE == 32 and m.GRAD_ACCUM_STEPS == 2  # batch 64 in 2 micro-batches
    model = m.build_model()
    assert type(model).__name__ == "OptimizedModule"
    inner = model._orig_mod
    assert inner.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(getattr(b, "_autoopt_checkpointed", False) for b in inner.blocks)
    opt = m.build_optimizer(model)
    # batch 16 -> 64 carries its learning-rate rule into the file: SGD, linear scaling, x4
    assert opt.defaults["fused"] is True and opt.defaults["momentum"] == 0.9
    assert opt.defaults["lr"] == pytest.approx(0.01 * 4)
    loss = m.forward(model, m.make_batch(4))
    assert m.SEEN == {"autocast": True, "input_channels_last": True}
    loss.backward()
    opt.step()
    dl = m.build_dataloader(m.BATCH_SIZE)
    assert (dl.num_workers, dl.persistent_workers, dl.prefetch_factor, dl.pin_memory) == (2, True, 4, False)

    # autoopt loads the patched file like any other (importing it sets the thread budget again)
    from autoopt.workload.load import load_model_file

    try:
        spec = load_model_file(train_file)
    finally:
        torch.set_num_threads(threads)
    assert spec.default_batch_size == 32 and spec.forward is not None


def test_round_trip_fp16_training_adds_a_grad_scaler(train_file, tmp_path):
    caps = Capabilities("cuda", name="Tesla V100", compute_capability=(7, 0), fp16=True, tensor_cores=True)
    w = _workload(train_file, caps=caps, facts={"model.conv2d_count": 4, "workload.channels_last": False,
                                                "workload.compiled": False, "model.conv_count": 4,
                                                "model.repeated_block_count": 3, "workload.optimizer": "SGD",
                                                "workload.optimizer_impl": "foreach"})
    items = resolved(w, ("amp", {}), ("tf32", {}), ("cudnn_benchmark", {}), ("cuda_graphs", {}),
                     ("compile", {"mode": "default"}))
    assert items[0][1] == {"dtype": "float16", "grad_scaler": True}
    res = build_patch(train_file, items, w)
    assert res.skipped == []
    code = res.new_source
    assert 'GRAD_SCALER = torch.amp.GradScaler("cuda")' in code
    assert 'with torch.autocast("cuda", dtype=torch.float16):' in code
    assert code.count("torch.compile(") == 1 and 'mode="reduce-overhead"' in code  # one call, graphs mode
    assert 'torch.set_float32_matmul_precision("high")' in code and "cudnn.benchmark = True" in code
    compile(code, "cnn.py", "exec")


def test_round_trip_inference_file_without_forward(tmp_path):
    path = tmp_path / "infer.py"
    path.write_text(src('''
        import torch
        import torch.nn as nn


        def build_model():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


        def make_batch(batch_size):
            return torch.randn(batch_size, 3, 6, 6)
    '''))
    w = Workload(spec_of(import_file(path), path), CPU, 4)
    items = resolved(w, ("inference_mode", {"weights_dtype": "bfloat16"}), ("channels_last", {}))
    res = build_patch(path, items, w)
    assert res.skipped == []
    path.write_text(res.new_source)
    m = import_file(path)
    torch.manual_seed(0)
    model = m.build_model()
    assert next(model.parameters()).dtype == torch.bfloat16
    out = m.forward(model, m.make_batch(2))
    assert out.dtype == torch.bfloat16 and out.is_inference() and out.shape == (2, 5)
    assert not torch.is_inference_mode_enabled()


def test_build_patch_skips_what_the_file_cannot_express(tmp_path):
    path = tmp_path / "odd.py"
    path.write_text(src('''
        import torch

        OPTS = {"lr": 0.1}


        def build_model():
            return torch.nn.Linear(4, 2)


        def make_batch(batch_size):
            return torch.randn(batch_size, 4)


        def build_optimizer(model):
            return torch.optim.Adam(model.parameters(), **OPTS)
    '''))
    w = Workload(spec_of(import_file(path), path), CPU, 8)
    items = resolved(w, ("fused_optimizer", {}), ("compile", {}), ("batch_size", {"batch_size": 32}))
    res = build_patch(path, items, w)
    assert [n for n, _ in res.skipped] == ["fused_optimizer"]
    assert "**kwargs" in res.skipped[0][1]
    assert set(res.applied) == {"compile", "batch_size"}
    assert "BATCH_SIZE = 32" in res.new_source and "torch.compile(torch.nn.Linear(4, 2)" in res.new_source
    assert res.to_json()["skipped"][0]["name"] == "fused_optimizer"


def test_build_patch_on_an_unparsable_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def build_model(:\n")
    res = build_patch(path, [(get_transform("compile"), {"mode": "default", "backend": "inductor"})], None)
    assert res.diff == "" and res.skipped[0][0] == "compile" and "cannot be parsed" in res.skipped[0][1]


@pytest.mark.slow
def test_patched_file_with_real_inductor_compile_matches_eager(tmp_path):
    """A real Inductor compile (C++ code generation on the CPU) from the patched file."""
    path = tmp_path / "mlp.py"
    path.write_text(src('''
        import torch


        def build_model():
            return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


        def make_batch(batch_size):
            return torch.randn(batch_size, 16)
    '''))
    w = Workload(spec_of(import_file(path), path), CPU, 8)
    res = build_patch(path, resolved(w, ("compile", {})), w)
    path.write_text(res.new_source)
    m = import_file(path)
    torch.manual_seed(0)
    compiled = m.build_model()
    assert type(compiled).__name__ == "OptimizedModule"
    x = torch.randn(8, 16)
    with torch.no_grad():
        got = compiled(x)
        want = compiled._orig_mod(x)
    torch.testing.assert_close(got, want, rtol=get_transform("compile").tolerance, atol=1e-5)


# ---------------------------------------------------------------------------- any file name, any file
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("name", ["my model.py", "two  spaces .py", 'we"ird.py', "back\\slash.py", "ünïcode model.py",
                                  "tab\there.py"])
def test_diff_headers_apply_with_git_apply_and_patch_for_any_file_name(tmp_path, name):
    old = "import torch\n\n\ndef build_model():\n    return Net()\n"
    ed = SourceEditor(old, name)
    ed.wrap_return("build_model", "torch.compile({})")
    (tmp_path / name).write_text(old)
    diff = unified_diff(old, ed.code, name)
    (tmp_path.parent / f"{tmp_path.name}.diff").write_text(diff)
    patch_file = str(tmp_path.parent / f"{tmp_path.name}.diff")
    subprocess.run(["git", "apply", "--check", patch_file], cwd=tmp_path, check=True, capture_output=True)
    if shutil.which("patch") is not None:
        subprocess.run(["patch", "-p1", "--dry-run", "-i", patch_file], cwd=tmp_path, check=True, capture_output=True)
        subprocess.run(["patch", "-p1", "--quiet", "-i", patch_file], cwd=tmp_path, check=True)
    else:
        subprocess.run(["git", "apply", patch_file], cwd=tmp_path, check=True)
    assert (tmp_path / name).read_text() == ed.code
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no other file created


LIB = '''
import torch

STATE = {}


def build_model():
    return torch.nn.Linear(4, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 4), torch.randint(0, 2, (batch_size,))


def forward(model, batch):
    x, y = batch
    STATE["autocast"] = torch.is_autocast_enabled("cpu")
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)
'''


@pytest.fixture
def sibling_project(tmp_path):
    """A model file that takes every contract function from lib.py beside it."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / "lib.py").write_text(LIB.lstrip())
    (d / "model.py").write_text('"""Contract functions from lib.py."""\n'
                                "from lib import build_model, build_optimizer, forward, make_batch  # noqa: F401\n\n"
                                "BATCH_SIZE = 8\n")
    return d


def _loaded_workload(path: Path) -> Workload:
    from autoopt.workload.load import load_model_file

    return Workload(load_model_file(path), CPU, 8)


def test_a_file_importing_its_contract_functions_keeps_them_in_the_patch(sibling_project):
    from autoopt.workload.load import load_model_file

    path = sibling_project / "model.py"
    w = _loaded_workload(path)
    items = resolved(w, ("amp", {"dtype": "bfloat16"}), ("channels_last", {}), ("compile", {"backend": "aot_eager"}))
    res = build_patch(path, items, w)
    path.write_text(res.new_source)
    spec = load_model_file(path)
    torch.manual_seed(0)
    model = spec.build_model()
    assert type(model).__name__ == "OptimizedModule"
    loss = spec.forward(model, spec.make_batch(4))  # lib's forward (not a default one), under autocast
    assert loss.dim() == 0 and spec.module._autoopt_user_forward.__globals__["STATE"] == {"autocast": True}
    assert spec.module._autoopt_user_forward.__module__ == "lib" and "model(*batch)" not in res.new_source
    assert sorted(res.applied) == ["amp", "channels_last", "compile"] and res.diff
    assert res.check_failure is None and res.check_json() == {"checked": True, "ok": True, "reason": None}
    assert sorted(p.name for p in sibling_project.iterdir()) == ["lib.py", "model.py"]  # the check left nothing


def test_a_patch_the_check_rejects_is_not_written_and_says_why(sibling_project):
    path = sibling_project / "model.py"
    path.write_text('"""Contract functions by a star import."""\nfrom lib import *  # noqa: F401,F403\n')
    w = _loaded_workload(path)
    res = build_patch(path, resolved(w, ("amp", {"dtype": "bfloat16"})), w)
    assert res.diff == "" and res.applied == []
    assert "forward()" in res.check_failure and "lib.py" in res.check_failure
    assert res.check_json() == {"checked": True, "ok": False, "reason": res.check_failure}
    assert sorted(p.name for p in sibling_project.iterdir()) == ["lib.py", "model.py"]

    from autoopt.output.markdown import patch as md_patch

    text = "\n".join(md_patch({"patch": "", "patch_check": res.check_json()}))
    assert "failed autoopt's check" in text and "plan.json" in text


def test_the_check_works_from_a_temporary_folder_when_the_model_folder_is_read_only(sibling_project, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def no_write_beside(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == sibling_project.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", no_write_beside)
    path = sibling_project / "model.py"
    w = _loaded_workload(path)
    res = build_patch(path, resolved(w, ("amp", {"dtype": "bfloat16"})), w)
    assert res.check_failure is None and res.diff
    assert str(sibling_project) not in sys.path and "lib" not in sys.modules


def test_the_diff_names_the_model_path_the_user_gave_not_a_symlinks_target(sibling_project):
    from types import SimpleNamespace

    from autoopt.pipelines.optimize import OptimizeRun
    from autoopt.settings import OptimizeSettings
    from autoopt.workload.load import load_model_file

    link = sibling_project / "my link.py"
    link.symlink_to(sibling_project / "model.py")
    spec = load_model_file(link)
    assert spec.path.name == "model.py"
    w = Workload(spec, CPU, 8)
    run = object.__new__(OptimizeRun)
    run.settings, run.spec, run.workload, run.caps = OptimizeSettings(model_path=str(link)), spec, w, CPU
    run.notes, run.final, run.base_cfg, run.given_path = [], None, w.base_config(), link
    t = get_transform("amp")
    params = t.resolve_params(w, CPU, {"dtype": "bfloat16"})
    best = SimpleNamespace(chosen=[SimpleNamespace(transform=t, params=params, code="AO104",
                                                   transform_json=lambda: {"name": "amp", "params": params})])
    run._patch_and_plan(best)
    assert run.patch_text.startswith("--- a/my link.py\t\n+++ b/my link.py\t\n")
    assert run.patch_check == {"checked": True, "ok": True, "reason": None}
    assert any("--follow-symlinks" in n for n in run.notes)  # neither tool writes through a link by default
    if shutil.which("patch") is not None:
        out = subprocess.run(["patch", "-p1", "--follow-symlinks", "--dry-run"], input=run.patch_text, text=True,
                             cwd=sibling_project, capture_output=True)
        assert out.returncode == 0, out.stdout + out.stderr
