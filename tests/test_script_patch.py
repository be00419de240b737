"""autoopt.patching.script_editor: the kept configuration written into the user's own training
script, each edit where a person would write it (asserted on the patched code's structure),
edits that cannot be placed safely skipped with a reason, and patched scripts that run."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoopt.patching.script_editor import ScriptPatch, patch_script, unified_diff

DATA = Path(__file__).parent / "data" / "script_patch"


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def fixture(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def line(source: str, text: str, nth: int = 0) -> int:
    """The 1-based line of the nth line holding `text`."""
    hits = [i + 1 for i, ln in enumerate(source.splitlines()) if text in ln]
    assert len(hits) > nth, f"{text!r} not in the source"
    return hits[nth]


def loop_sites(source: str, *, forward: str, backward: str, step: str, optimizer: str, model_var="model",
               optimizer_var="optimizer", loaders=(), script="train.py") -> dict:
    """Sites as the script's run records them, found by the text of each line."""
    return {
        "script": script,
        "forward": {"line": line(source, forward), "function": "main", "model_var": model_var},
        "backward": {"line": line(source, backward), "function": "main"},
        "step": {"line": line(source, step), "function": "main", "optimizer_var": optimizer_var},
        "optimizer": {"line": line(source, optimizer), "function": "main", "var": optimizer_var},
        "dataloaders": [{"line": line(source, t), "function": "main"} for t in loaders],
        "model_def": None,
        "framework": None,
    }


def plain_sites(source: str) -> dict:
    return loop_sites(source, forward="out = model(x)", backward="loss.backward()", step="optimizer.step()",
                      optimizer="torch.optim.SGD(", loaders=["loader = DataLoader("])


def module_sites(source: str) -> dict:
    return loop_sites(source, forward="pred = model(", backward="loss.backward()", step="opt.step()",
                      optimizer="torch.optim.AdamW(", optimizer_var="opt")


BF16_CPU = {"device_type": "cpu", "dtype": "bfloat16", "scaler": False}


def compiles(code: str) -> ast.Module:
    return ast.parse(code)


def autocast_blocks(code: str) -> list[ast.With]:
    return [n for n in ast.walk(compiles(code)) if isinstance(n, ast.With)
            and any(isinstance(i.context_expr, ast.Call) and ast.unparse(i.context_expr.func) == "torch.autocast"
                    for i in n.items)]


def body_of(node) -> list[str]:
    return [ast.unparse(s) for s in node.body]


def function(code: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(compiles(code)) if isinstance(n, ast.FunctionDef) and n.name == name)


def statements(block: list[ast.stmt]) -> list[str]:
    """The block's statements, the first line of each."""
    return [ast.unparse(s).splitlines()[0] for s in block]


def loop_body(fn_or_module) -> list[ast.stmt]:
    """The innermost `for` loop's body."""
    loops = [n for n in ast.walk(fn_or_module) if isinstance(n, ast.For)]
    return loops[-1].body


def call_kwargs(code: str, callee: str) -> list[dict[str, str]]:
    return [{k.arg: ast.unparse(k.value) for k in n.keywords} for n in ast.walk(compiles(code))
            if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(callee)]


# ---------------------------------------------------------------------------- plain loop in main()
def test_plain_loop_every_edit_where_a_person_writes_it():
    source = fixture("plain_main.py")
    changes = {"amp": BF16_CPU, "channels_last": True, "compile": {"mode": "max-autotune", "backend": "inductor"},
               "optimizer_impl": "fused", "dataloader": {"num_workers": 2, "pin_memory": True,
                                                         "persistent_workers": True, "prefetch_factor": 4},
               "matmul_precision": "high", "cudnn_benchmark": True, "num_threads": 2}
    p = patch_script(source, plain_sites(source), changes)
    assert isinstance(p, ScriptPatch)
    assert p.skipped == []
    assert p.applied == ["amp", "channels_last", "compile", "optimizer_impl", "dataloader", "matmul_precision",
                         "cudnn_benchmark", "num_threads"]
    main = function(p.code, "main")
    body = statements(main.body)
    # the model lines right after the model is built, before the optimizer
    at = body.index("model = Net()")
    assert body[at + 1:at + 4] == ["model = model.to(memory_format=torch.channels_last)",
                                   "model.compile(mode='max-autotune')",
                                   "optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, "
                                   "fused=True)"]
    # autocast holds exactly the forward and the loss; the .item() logging and the backward stay out
    (block,) = autocast_blocks(p.code)
    assert body_of(block) == ["out = model(x)", "loss = criterion(out, y)"]
    assert ast.unparse(block.items[0].context_expr) == "torch.autocast(device_type='cpu', dtype=torch.bfloat16)"
    inner = statements(loop_body(main))
    assert inner[:2] == ["optimizer.zero_grad()", "with torch.autocast(device_type='cpu', dtype=torch.bfloat16):"]
    assert inner[2:5] == ["if step % args.log_every == 0:", "loss.backward()", "optimizer.step()"]
    # the loader's existing num_workers replaced, the others added
    (kw,) = call_kwargs(p.code, "DataLoader")
    assert kw == {"batch_size": "args.batch_size", "shuffle": "True", "num_workers": "2", "pin_memory": "True",
                  "persistent_workers": "True", "prefetch_factor": "4"}
    # the settings right after the imports, in the file's own quotes; formatting elsewhere kept
    top = statements(compiles(p.code).body)
    imports_end = top.index("from torch.utils.data import DataLoader, TensorDataset")
    assert top[imports_end + 1:imports_end + 4] == [
        "torch.set_float32_matmul_precision('high')", "torch.backends.cudnn.benchmark = True",
        "torch.set_num_threads(2)"]
    assert 'torch.set_float32_matmul_precision("high")' in p.code
    assert 'with torch.autocast(device_type="cpu", dtype=torch.bfloat16):\n' in p.code
    assert "    model = Net()  # the model\n" in p.code
    assert "            # forward pass\n            with torch.autocast" in p.code
    # the only lines of the script no longer there: the loader's and optimizer's calls, forward and loss re-indented
    gone = [ln.strip() for ln in source.splitlines() if ln not in p.code.splitlines()]
    assert gone == ["num_workers=0)", "optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)",
                    "out = model(x)", "loss = criterion(out, y)"]


def test_nothing_to_change_is_the_source_itself():
    source = fixture("plain_main.py")
    p = patch_script(source, plain_sites(source), {"amp": None, "channels_last": False, "compile": None,
                                                   "optimizer_impl": None, "dataloader": None})
    assert (p.code, p.applied, p.skipped) == (source, [], [])


def test_unified_diff_applies_with_patch_p1(tmp_path):
    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed")
    source = fixture("plain_main.py")
    p = patch_script(source, plain_sites(source), {"amp": BF16_CPU, "channels_last": True, "optimizer_impl": "fused",
                                                   "cudnn_benchmark": True})
    (tmp_path / "train.py").write_text(source)
    diff = unified_diff(source, p.code, "train.py")
    r = subprocess.run(["patch", "-p1"], input=diff, text=True, cwd=tmp_path, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "train.py").read_text() == p.code


# ---------------------------------------------------------------------------- module-level loop
def test_module_level_loop_and_fp16_grad_scaler():
    source = fixture("module_loop.py")
    amp = {"device_type": "cuda", "dtype": "float16", "scaler": True}
    p = patch_script(source, module_sites(source), {"amp": amp, "channels_last": True, "optimizer_impl": "foreach"})
    assert p.skipped == [] and p.applied == ["amp", "channels_last", "optimizer_impl"]
    top = statements(compiles(p.code).body)
    at = top.index("model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))")
    assert top[at + 1:at + 4] == ["model = model.to(memory_format=torch.channels_last)",
                                  "opt = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.01, "
                                  "foreach=True)", "scaler = torch.amp.GradScaler('cuda')"]
    (block,) = autocast_blocks(p.code)
    assert body_of(block) == ["pred = model(data[i])", "loss = ((pred - target[i]) ** 2).mean()"]
    assert statements(loop_body(compiles(p.code))) == [
        "with torch.autocast(device_type='cuda', dtype=torch.float16):", "opt.zero_grad(set_to_none=True)",
        "scaler.scale(loss).backward()", "scaler.step(opt)", "scaler.update()",
        "print(f'step {i} loss {loss.item():.6f}')"]


def test_fp16_scaler_goes_before_the_loop_when_the_optimizer_is_built_elsewhere():
    source = src('''
        import torch


        def train(model, optimizer, batches):
            for x, y in batches:
                out = model(x)
                loss = torch.nn.functional.mse_loss(out, y)
                loss.backward()
                optimizer.step(closure=None)
                optimizer.zero_grad()


        def main():
            model = torch.nn.Linear(4, 1)
            train(model, make_optimizer(model), [(torch.randn(2, 4), torch.randn(2, 1))])
    ''')
    sites = loop_sites(source, forward="out = model(x)", backward="loss.backward()", step="optimizer.step(",
                       optimizer="make_optimizer(model)")
    p = patch_script(source, sites, {"amp": {"device_type": "cuda", "dtype": "float16", "scaler": True},
                                     "optimizer_impl": "fused"})
    assert p.applied == ["amp"]
    assert p.skipped[0][0] == "optimizer_impl" and "make_optimizer" in p.skipped[0][1]
    train = function(p.code, "train")
    assert statements(train.body) == ["scaler = torch.amp.GradScaler('cuda')", "for x, y in batches:"]
    assert statements(loop_body(train)) == [
        "with torch.autocast(device_type='cuda', dtype=torch.float16):", "scaler.scale(loss).backward()",
        "scaler.step(optimizer, closure=None)", "scaler.update()", "optimizer.zero_grad()"]


# ---------------------------------------------------------------------------- GradScaler and scheduler present
def test_script_with_its_own_autocast_scaler_and_scheduler():
    source = fixture("scaler_sched.py")
    sites = loop_sites(source, forward="logits = model(x)", backward="scaler.scale(loss).backward()",
                       step="scaler.step(optimizer)", optimizer="optimizer = torch.optim.AdamW(")
    p = patch_script(source, sites, {"amp": BF16_CPU, "compile": {"mode": None, "backend": "inductor"},
                                     "optimizer_impl": "fused"})
    assert p.applied == ["compile", "optimizer_impl"]
    ((name, reason),) = p.skipped
    assert name == "amp" and "already runs under the script's own autocast" in reason
    assert f"` at line {line(source, 'with torch.autocast(')})" in reason
    body = statements(function(p.code, "train").body)
    at = body.index("model = build_model(1000, args.dim).to(device)")
    assert body[at + 1] == "model.compile()"
    (kw,) = call_kwargs(p.code, "optim.AdamW")
    assert kw == {"lr": "0.0003", "fused": "True"}  # foreach removed
    # the multi-line call keeps one argument a line and its trailing comma
    assert "        lr=3e-4,\n        fused=True,\n    )\n" in p.code
    # the user's GradScaler, clipping and scheduler untouched
    for text in ("scaler.scale(loss).backward()", "scaler.unscale_(optimizer)", "scaler.step(optimizer)",
                 "scheduler.step()", "torch.cuda.amp.GradScaler(enabled=args.amp)"):
        assert p.code.count(text) == 1


def test_fp16_with_the_loss_already_scaled_adds_no_second_scaler():
    source = src('''
        import torch

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda")
        for _ in range(3):
            pred = model(torch.randn(2, 4))
            loss = pred.pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    ''')
    sites = loop_sites(source, forward="pred = model(", backward="scaler.scale(loss).backward()",
                       step="scaler.step(opt)", optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": {"device_type": "cuda", "dtype": "float16", "scaler": True}})
    assert p.applied == ["amp"]
    assert p.code.count("GradScaler") == 1 and p.code.count("scaler.update()") == 1
    (block,) = autocast_blocks(p.code)
    assert body_of(block) == ["pred = model(torch.randn(2, 4))", "loss = pred.pow(2).mean()"]


# ---------------------------------------------------------------------------- frameworks
def test_training_arguments_call_gets_the_framework_kwargs():
    source = fixture("hf_trainer.py")
    sites = {"script": "train.py", "forward": None, "backward": None, "step": None, "optimizer": None,
             "dataloaders": [], "model_def": None,
             "framework": {"kind": "transformers", "line": line(source, "TrainingArguments("),
                           "call": "TrainingArguments"}}
    kwargs = {"bf16": "True", "fp16": "False", "dataloader_num_workers": "2", "optim": '"adamw_torch_fused"'}
    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": kwargs}, "channels_last": True})
    assert p.applied == ["framework_kwargs"]
    assert p.skipped == [("channels_last", "the run recorded no call of the model in train.py")]
    (kw,) = call_kwargs(p.code, "TrainingArguments")
    assert kw == {"output_dir": "'out'", "per_device_train_batch_size": "8", "num_train_epochs": "1",
                  "fp16": "False", "report_to": "[]", "bf16": "True", "dataloader_num_workers": "2",
                  "optim": "'adamw_torch_fused'"}
    assert "    fp16=False,  # no GPU here\n" in p.code  # replaced in place, its comment kept
    assert call_kwargs(p.code, "Trainer") == [{"model": "model", "args": "training_args", "train_dataset": "data"}]


def test_lightning_trainer_call_and_an_attribute_model():
    source = fixture("lightning_trainer.py")
    sites = {"script": "train.py",
             "forward": {"line": line(source, "logits = self.model(x)"), "function": "training_step",
                         "model_var": "self.model"},
             "backward": {"line": 10, "function": "backward", "file": "/venv/lightning/core/module.py"},
             "dataloaders": [{"line": line(source, "loader = DataLoader("), "function": "<module>"}],
             "framework": {"kind": "lightning", "line": line(source, "L.Trainer("), "call": "Trainer"}}
    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": {"precision": '"bf16-mixed"'}},
                                     "channels_last": True, "amp": BF16_CPU, "dataloader": {"num_workers": 0,
                                                                                           "pin_memory": False}})
    assert p.applied == ["dataloader", "framework_kwargs"]
    reasons = dict(p.skipped)
    assert "the backward call is at /venv/lightning/core/module.py:10" in reasons["amp"]
    assert "attribute self.model" in reasons["channels_last"] and "in training_step()" in reasons["channels_last"]
    (kw,) = call_kwargs(p.code, "L.Trainer")
    assert kw["precision"] == "'bf16-mixed'" and kw["accelerator"] == "'cpu'"
    assert call_kwargs(p.code, "DataLoader") == [{"batch_size": "32", "num_workers": "0", "pin_memory": "False"}]


def test_framework_call_with_kwargs_splat_is_skipped():
    source = 'from transformers import TrainingArguments\nargs = TrainingArguments(**cfg)\n'
    sites = {"framework": {"kind": "transformers", "line": 2, "call": "TrainingArguments"}}
    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": {"bf16": "True"}}})
    assert p.code == source and p.applied == []
    assert "passes **kwargs" in p.skipped[0][1]


# ---------------------------------------------------------------------------- finding the model's binding
def test_model_bound_in_main_and_trained_in_a_function_found_through_the_optimizer():
    source = src('''
        import torch


        def train(model, optimizer, batches):
            for x in batches:
                loss = model(x).sum()
                loss.backward()
                optimizer.step()


        def main():
            net = torch.nn.Linear(4, 4)
            net.train()
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            train(net, optimizer, [torch.randn(2, 4)])
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="optimizer.step()",
                       optimizer="torch.optim.SGD(")
    p = patch_script(source, sites, {"channels_last": True, "compile": {"mode": "reduce-overhead",
                                                                       "backend": "cudagraphs"}})
    assert p.applied == ["channels_last", "compile"]
    assert statements(function(p.code, "main").body) == [
        "net = torch.nn.Linear(4, 4)", "net = net.to(memory_format=torch.channels_last)",
        "net.compile(mode='reduce-overhead', backend='cudagraphs')", "net.train()",
        "optimizer = torch.optim.SGD(net.parameters(), lr=0.1)", "train(net, optimizer, [torch.randn(2, 4)])"]


def test_model_bound_in_branches_gets_its_edits_after_the_if():
    source = src('''
        import torch


        def main(arch):
            if arch == "wide":
                model = torch.nn.Linear(4, 64)
            else:
                model = torch.nn.Linear(4, 8)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                model(torch.randn(1, 4)).sum().backward()
                opt.step()
    ''')
    sites = loop_sites(source, forward="model(torch.randn", backward="model(torch.randn", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"channels_last": True, "amp": BF16_CPU})
    assert p.applied == ["channels_last"]
    assert "share one statement" in dict(p.skipped)["amp"]
    assert statements(function(p.code, "main").body) == [
        "if arch == 'wide':", "model = model.to(memory_format=torch.channels_last)",
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)", "for _ in range(2):"]


def test_model_def_site_given_and_module_global_model():
    source = src('''
        import torch

        model = torch.nn.Linear(4, 4)  # built at import
        opt = torch.optim.SGD(model.parameters(), lr=0.1)


        def step(x):
            loss = model(x).sum()
            loss.backward()
            opt.step()
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    found = patch_script(source, sites, {"channels_last": True})
    given = patch_script(source, {**sites, "model_def": {"line": 3, "var": "model"}}, {"channels_last": True})
    assert found.code == given.code
    assert statements(compiles(found.code).body)[1:4] == [
        "model = torch.nn.Linear(4, 4)", "model = model.to(memory_format=torch.channels_last)",
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)"]
    wrong = patch_script(source, {**sites, "model_def": {"line": 4, "var": "model"}}, {"channels_last": True})
    assert wrong.skipped == [("channels_last", "line 4 of train.py does not assign the model's variable model")]


def test_model_from_another_file_is_skipped():
    source = src('''
        import torch
        from models import model

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in [torch.randn(2, 4)]:
            loss = model(x).sum()
            loss.backward()
            opt.step()
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"channels_last": True})
    assert p.code == source
    assert p.skipped == [("channels_last", "no assignment to model precedes the forward (line 6) in its scope, "
                                           "nor one to the variable the optimizer takes .parameters() of; add the "
                                           "change where the model is built")]
    other = {**sites, "model_def": {"line": 12, "var": "model", "file": "/work/models.py"}}
    p = patch_script(source, other, {"compile": {"mode": None, "backend": "inductor"}})
    assert p.skipped == [("compile", "the model's definition is at /work/models.py:12, not in train.py; "
                                     "make that change there")]


# ---------------------------------------------------------------------------- edits that cannot be placed
def test_forward_and_backward_in_different_functions_or_branches_are_skipped():
    source = src('''
        import torch


        def compute_loss(model, x):
            out = model(x)
            return out.sum()


        def main(model, opt, batches, accumulate):
            for x in batches:
                loss = compute_loss(model, x)
                loss.backward()
                if accumulate:
                    out = model(x)
                else:
                    out.sum().backward()
                opt.step()
    ''')
    sites = loop_sites(source, forward="out = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="opt.step()", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": BF16_CPU})
    assert p.code == source
    assert p.skipped == [("amp", "the forward (line 5, in compute_loss()) and the backward (line 12, in main()) "
                                 "are in different functions; put the code that computes the loss under "
                                 "torch.autocast by hand")]
    sites = {**sites, "forward": {**sites["forward"], "line": line(source, "out = model(x)", 1)},
             "backward": {**sites["backward"], "line": line(source, "out.sum().backward()")}}
    p = patch_script(source, sites, {"amp": BF16_CPU})
    assert p.skipped == [("amp", "the forward (line 14, in main()) and the backward (line 16, in main()) are in "
                                 "different blocks")]


def test_forward_in_a_branch_before_the_backward_wraps_the_whole_if():
    source = src('''
        import torch


        def main(model, opt, batches, mixup):
            for x, y in batches:
                if mixup:
                    x = x.flip(0) * 0.5 + x * 0.5
                    out = model(x)
                else:
                    out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                loss.backward()
                opt.step()
    ''')
    sites = loop_sites(source, forward="out = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="opt.step()", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": BF16_CPU})
    (block,) = autocast_blocks(p.code)
    assert statements(block.body) == ["if mixup:", "loss = torch.nn.functional.cross_entropy(out, y)"]
    assert statements(loop_body(function(p.code, "main")))[1:] == [
        "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)", "loss.backward()", "opt.step()"]


def test_sites_in_other_files_and_helpers_are_skipped_with_reasons():
    source = fixture("plain_main.py")
    sites = plain_sites(source)
    sites["optimizer"] = {"line": 3, "function": "make", "file": "/work/optim_utils.py"}
    sites["dataloaders"].append({"line": 40, "function": "loaders", "file": "/work/data.py"})
    p = patch_script(source, sites, {"optimizer_impl": "fused", "dataloader": {"num_workers": 2}})
    assert p.code == source and p.applied == []
    assert p.skipped == [
        ("optimizer_impl", "the optimizer construction is at /work/optim_utils.py:3, not in train.py; "
                           "make that change there"),
        ("dataloader", "the DataLoader construction is at /work/data.py:40, not in train.py; make that change there"),
    ]
    # the same path as the script itself is not another file
    same = {**plain_sites(source), "script": "/work/x/train.py"}
    same["optimizer"] = {**same["optimizer"], "file": "/work/x/../x/train.py"}
    assert patch_script(source, same, {"optimizer_impl": "fused"}).applied == ["optimizer_impl"]


def test_existing_settings_are_changed_in_place():
    source = src('''
        import torch


        def main():
            torch.backends.cudnn.benchmark = False
            torch.set_num_threads(8)
            torch.set_float32_matmul_precision("highest")
    ''')
    p = patch_script(source, {}, {"cudnn_benchmark": True, "num_threads": 2, "matmul_precision": "high"})
    assert p.applied == ["matmul_precision", "cudnn_benchmark", "num_threads"]
    assert statements(function(p.code, "main").body) == [
        "torch.backends.cudnn.benchmark = True", "torch.set_num_threads(2)",
        "torch.set_float32_matmul_precision('high')"]
    assert statements(compiles(p.code).body) == ["import torch", "def main():"]
    # the script's own setting runs only on a flag: changed, and set after the imports too
    flagged = source.replace("    torch.set_num_threads(8)\n", "    if THREADS:\n        torch.set_num_threads(8)\n")
    p = patch_script(flagged, {}, {"num_threads": 2, "cudnn_benchmark": True})
    assert statements(compiles(p.code).body) == ["import torch", "torch.set_num_threads(2)", "def main():"]
    assert "    if THREADS:\n        torch.set_num_threads(2)\n" in p.code
    assert "    torch.backends.cudnn.benchmark = True\n" in p.code


def test_import_torch_is_ensured_and_dataloader_threads_written():
    source = src('''
        """Doc."""
        from torch.utils.data import DataLoader

        loader = DataLoader(range(10), batch_size=2, num_workers=4, persistent_workers=True, prefetch_factor=2)
    ''')
    sites = {"dataloaders": [{"line": 4, "function": "<module>"}]}
    p = patch_script(source, sites, {"dataloader": {"num_workers": 0, "pin_memory": True, "intra_op_threads": 1}})
    assert p.applied == ["dataloader"]
    assert statements(compiles(p.code).body) == [
        "'Doc.'", "from torch.utils.data import DataLoader", "import torch", "torch.set_num_threads(1)",
        "loader = DataLoader(range(10), batch_size=2, num_workers=0, pin_memory=True)"]


def test_unparseable_script_and_unknown_values_are_skipped():
    bad = patch_script("def main(:\n", {}, {"channels_last": True, "optimizer_impl": "fused"})
    assert bad.code == "def main(:\n" and bad.applied == []
    assert [n for n, _ in bad.skipped] == ["channels_last", "optimizer_impl"]
    assert "cannot be parsed" in bad.skipped[0][1]
    source = fixture("plain_main.py")
    p = patch_script(source, plain_sites(source), {"amp": {"device_type": "cpu", "dtype": "int8"},
                                                   "dataloader": {"batch_sampler": None}})
    assert p.code == source
    assert p.skipped == [("amp", "unknown autocast dtype 'int8'"),
                         ("dataloader", "batch_sampler is not a DataLoader argument")]


def test_attribute_model_given_as_model_def_is_skipped():
    source = src('''
        import torch


        class Runner:
            def __init__(self):
                self.model = torch.nn.Linear(2, 2)
    ''')
    p = patch_script(source, {"model_def": {"line": 6, "var": None}}, {"channels_last": True})
    assert p.skipped == [("channels_last", "the model is the attribute self.model (line 6, in __init__()); autoopt "
                                           "edits a plain variable only: add the change where self.model is "
                                           "assigned")]


# ---------------------------------------------------------------------------- patched scripts run
def run_script(path: Path, *args: str) -> list[float]:
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120,
                       cwd=path.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return [float(ln.rsplit(" ", 1)[1]) for ln in r.stdout.splitlines() if " loss " in ln]


@pytest.mark.slow
def test_patched_plain_script_runs_with_bf16_autocast_on_cpu(tmp_path):
    source = fixture("plain_main.py")
    changes = {"amp": BF16_CPU, "channels_last": True, "compile": {"mode": None, "backend": "eager"},
               "optimizer_impl": "fused", "dataloader": {"num_workers": 1, "pin_memory": False,
                                                         "persistent_workers": True, "prefetch_factor": 2},
               "matmul_precision": "high", "num_threads": 1}
    p = patch_script(source, plain_sites(source), changes)
    assert p.skipped == []
    (tmp_path / "train.py").write_text(source)
    (tmp_path / "patched.py").write_text(p.code)
    base = run_script(tmp_path / "train.py", "--steps", "4")
    ours = run_script(tmp_path / "patched.py", "--steps", "4")
    assert len(base) == len(ours) == 2
    assert ours != base  # bf16 autocast really ran
    assert ours == pytest.approx(base, rel=2e-2)


@pytest.mark.slow
def test_patched_module_loop_runs_with_fp16_scaler_on_cpu(tmp_path):
    source = fixture("module_loop.py")
    amp = {"device_type": "cpu", "dtype": "float16", "scaler": True}
    p = patch_script(source, module_sites(source), {"amp": amp, "optimizer_impl": "foreach",
                                                    "cudnn_benchmark": True})
    assert p.skipped == []
    (tmp_path / "train.py").write_text(source)
    (tmp_path / "patched.py").write_text(p.code)
    base = run_script(tmp_path / "train.py", "3")
    ours = run_script(tmp_path / "patched.py", "3")
    assert len(base) == len(ours) == 3
    assert ours != base
    assert ours == pytest.approx(base, rel=2e-2)


def test_model_bound_in_the_main_block_and_read_as_a_global_stays_in_that_block():
    source = src('''
        import torch


        def train(batches):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for x in batches:
                loss = model(x).sum()
                loss.backward()
                opt.step()


        if __name__ == "__main__":
            model = torch.nn.Linear(4, 4)
            train([torch.randn(2, 4)])
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"channels_last": True,
                                     "amp": {"device_type": "cuda", "dtype": "float16", "scaler": True}})
    assert p.applied == ["amp", "channels_last"]
    main_block = compiles(p.code).body[-1]
    assert statements(main_block.body) == ["model = torch.nn.Linear(4, 4)",
                                           "model = model.to(memory_format=torch.channels_last)",
                                           "train([torch.randn(2, 4)])"]
    assert statements(function(p.code, "train").body) == [
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)", "scaler = torch.amp.GradScaler('cuda')",
        "for x in batches:"]


def test_autograd_backward_call_and_settings_turned_off():
    source = src('''
        import torch

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in [torch.randn(2, 4)]:
            out = model(x)
            loss = out.pow(2).mean()
            print(loss.item())
            torch.autograd.backward(loss)
            opt.step()
    ''')
    sites = loop_sites(source, forward="out = model(x)", backward="torch.autograd.backward(", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": BF16_CPU, "cudnn_benchmark": False,
                                     "dataloader": {"non_blocking": True}})
    assert p.applied == ["amp", "cudnn_benchmark"]
    (block,) = autocast_blocks(p.code)
    assert body_of(block) == ["out = model(x)", "loss = out.pow(2).mean()"]
    assert "torch.backends.cudnn.benchmark = False" in statements(compiles(p.code).body)
    assert p.skipped == [("dataloader", "none of these loader settings is an argument of DataLoader(...) "
                                        "(non_blocking)")]
    fp16 = patch_script(source, sites, {"amp": {"device_type": "cuda", "dtype": "float16", "scaler": True}})
    assert fp16.code == source
    assert fp16.skipped == [("amp", "the loss is backpropagated with torch.autograd.backward(...) (line 9); the "
                                    "fp16 GradScaler needs `scaler.scale(loss).backward()` written by hand")]


def test_a_model_call_before_the_training_loop_is_not_taken_for_the_forward():
    source = src('''
        import torch

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        print(model(torch.zeros(1, 4)))  # a sanity check before training
        for x in [torch.randn(2, 4)]:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
    ''')
    sites = loop_sites(source, forward="print(model(", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": BF16_CPU})
    assert p.code == source
    assert p.skipped == [("amp", "the model call recorded (line 5) runs outside the loop (line 6) that holds the "
                                 "backward (line 8); put the training forward under torch.autocast by hand")]


def test_autocast_through_a_context_variable_is_the_scripts_own():
    source = src('''
        from contextlib import nullcontext

        import torch

        dtype = "float32"
        ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in [torch.randn(2, 4)]:
            with ctx:
                loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": BF16_CPU})
    assert p.skipped == [("amp", "the forward (line 11) already runs under the script's own autocast context "
                                 "(`with ctx` at line 10; it is assigned at line 6: `ctx = nullcontext() if dtype == "
                                 "\"float32\" else torch.autocast(device_type=\"cp...`); autoopt does "
                                 "not nest a second one: make that one torch.autocast(device_type=\"cpu\", "
                                 "dtype=torch.bfloat16) in this run's case instead")]
    plain = source.replace("with ctx:", "with nullcontext():")
    assert patch_script(plain, sites, {"amp": BF16_CPU}).applied == ["amp"]


def test_long_loader_calls_wrap_and_a_loader_built_each_epoch_is_edited_once():
    source = src('''
        import torch
        from torch.utils.data import DataLoader


        def main(data):
            for epoch in range(2):
                loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True, num_workers=0)
                for batch in loader:
                    pass
    ''')
    site = {"line": 7, "function": "main"}
    p = patch_script(source, {"dataloaders": [site, dict(site)]},
                     {"dataloader": {"num_workers": 2, "pin_memory": True, "persistent_workers": False}})
    assert p.applied == ["dataloader"]
    assert p.code == source.replace(
        "num_workers=0)\n",
        "num_workers=2,\n                            pin_memory=True, persistent_workers=False)\n")


def test_a_model_rebound_in_an_optional_branch_gets_its_edits_after_the_branch():
    source = src('''
        import torch


        def main(resume, batches):
            model = torch.nn.Linear(4, 4)
            if resume:
                model.load_state_dict(torch.load(resume))
                model = model.double()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for x in batches:
                model(x).sum().backward()
                opt.step()
    ''')
    sites = loop_sites(source, forward="model(x).sum()", backward="model(x).sum()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"channels_last": True})
    assert statements(function(p.code, "main").body)[:4] == [
        "model = torch.nn.Linear(4, 4)", "if resume:", "model = model.to(memory_format=torch.channels_last)",
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)"]
    # bound at import as a placeholder, then in the main block with more work after it: right after it
    source = src('''
        import torch

        model = None


        def train(batches):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for x in batches:
                model(x).sum().backward()
                opt.step()


        if __name__ == "__main__":
            model = torch.nn.Linear(4, 4)
            train([torch.randn(2, 4)])
    ''')
    sites = loop_sites(source, forward="model(x).sum()", backward="model(x).sum()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"channels_last": True})
    assert statements(compiles(p.code).body[-1].body) == [
        "model = torch.nn.Linear(4, 4)", "model = model.to(memory_format=torch.channels_last)",
        "train([torch.randn(2, 4)])"]


def test_training_arguments_from_the_command_line_become_the_parsers_defaults():
    """HfArgumentParser / TrlParser scripts: `parser.set_defaults(...)` before the parse call, so
    the command line still rules; a flag the script's own arguments set is a remark naming what
    to pass; a line with no parse call keeps the reason with the flags."""
    source = src('''
        from transformers import HfArgumentParser, TrainingArguments

        parser = HfArgumentParser(TrainingArguments)
        (training_args,) = parser.parse_args_into_dataclasses()
    ''')
    sites = {"framework": {"kind": "transformers", "line": 4, "call": "TrainingArguments"}}
    kwargs = {"bf16": "True", "optim": "'adamw_torch_fused'"}
    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": kwargs, "argv": ["--output_dir", "out"]}})
    assert p.applied == ["framework_kwargs"] and p.skipped == [] and p.remarks == []
    assert statements(compiles(p.code).body)[-2:] == [
        "parser.set_defaults(bf16=True, optim='adamw_torch_fused')",
        "training_args, = parser.parse_args_into_dataclasses()"]

    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": kwargs, "argv": ["--bf16", "false"]}})
    assert "parser.set_defaults(optim='adamw_torch_fused')" in p.code and "bf16=True" not in p.code
    assert p.remarks == [("framework_kwargs", "the script parses its arguments from the command line, and yours "
                                              "already set --bf16, which a default cannot change: pass --bf16 True "
                                              "instead")]

    p = patch_script(source, sites, {"framework_kwargs": {"kwargs": kwargs, "argv": ["--bf16=false", "--optim",
                                                                                     "adamw_torch"]}})
    assert p.code == source and p.applied == []
    assert p.skipped == [("framework_kwargs", "line 4 of train.py holds no TrainingArguments(...) call that autoopt "
                                              "can edit (it calls parser.parse_args_into_dataclasses(...)); if the "
                                              "script reads TrainingArguments from its command line, pass --bf16 True "
                                              "--optim adamw_torch_fused")]


def test_fp16_in_a_step_function_without_the_optimizer_is_skipped_and_unknown_changes_named():
    source = src('''
        import torch


        def train_step(model, opt, x):
            loss = model(x).sum()
            loss.backward()
            opt.step()


        def main():
            model = torch.nn.Linear(4, 4)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                train_step(model, opt, torch.randn(2, 4))
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"amp": {"device_type": "cuda", "dtype": "float16", "scaler": True},
                                     "grad_accum_steps": 4, "weights_dtype": None})
    assert p.code == source
    assert p.skipped == [
        ("amp", "the backward (line 6, in train_step()) runs in no loop of its own and the optimizer is built "
                "elsewhere; create `scaler = torch.amp.GradScaler(...)` once where the optimizer is built"),
        ("grad_accum_steps", "autoopt does not know how to write grad_accum_steps into a script")]
    bf16 = patch_script(source, sites, {"amp": BF16_CPU})
    (block,) = autocast_blocks(bf16.code)
    assert body_of(block) == ["loss = model(x).sum()"]


def test_model_found_through_the_parameters_the_optimizer_is_given():
    source = src('''
        import torch


        def train_one_epoch(net, optimizer, batches):
            for x in batches:
                loss = net(x).sum()
                loss.backward()
                optimizer.step()


        def main(args):
            model = torch.nn.Linear(4, 4)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=args.lr)
            train_one_epoch(model, optimizer, [torch.randn(2, 4)])
    ''')
    sites = loop_sites(source, forward="loss = net(x)", backward="loss.backward()", step="optimizer.step()",
                       optimizer="torch.optim.SGD(", model_var="net")
    p = patch_script(source, sites, {"channels_last": True})
    assert statements(function(p.code, "main").body)[:2] == [
        "model = torch.nn.Linear(4, 4)", "model = model.to(memory_format=torch.channels_last)"]
    # two models' parameters in one optimizer: which to edit is not known
    two = source.replace("params = [p for p in model.parameters() if p.requires_grad]",
                         "params = [*model.parameters(), *head.parameters()]")
    assert "no assignment to net precedes" in patch_script(two, sites, {"channels_last": True}).skipped[0][1]


def test_a_script_with_its_own_compile_switch_is_told_so_beside_the_diff():
    """nanoGPT's shape: `if compile: model = torch.compile(model)`, off in the run; the diff
    compiles the model where it is bound, and a remark names the script's own switch."""
    source = src('''
        import torch

        compile = False
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if compile:
            model = torch.compile(model)
        for x in [torch.randn(2, 4)]:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
    ''')
    sites = loop_sites(source, forward="loss = model(x)", backward="loss.backward()", step="opt.step()",
                       optimizer="torch.optim.SGD(", optimizer_var="opt")
    p = patch_script(source, sites, {"compile": {"mode": None, "backend": "inductor"}})
    assert p.applied == ["compile"] and "model.compile()" in p.code
    assert p.remarks == [("compile", "the script has its own `model = torch.compile(model)` at line 7 under `if "
                                     "compile` (line 6), off in this run; the diff compiles the model where it is "
                                     "built instead, and turning the script's own switch on would do the same")]
    plain = source.replace("if compile:\n    model = torch.compile(model)\n", "")
    assert patch_script(plain, sites, {"compile": {"mode": None, "backend": "inductor"}}).remarks == []
