"""Hugging Face Trainer / Lightning Trainer scripts optimized through their own arguments
(autoopt.scripting.frameworks). The scripts are in tests/data/scripts/hf_trainer/ and
tests/data/scripts/lightning/; each run is a fresh process (a runner calls install() before
the script imports its framework, then runs the script as `__main__`)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.scripting import frameworks as fw
from autoopt.types import Capabilities, ExecConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "data" / "scripts"
HF_SCRIPT = SCRIPTS / "hf_trainer" / "train.py"
PL_SCRIPT = SCRIPTS / "lightning" / "train.py"
CPU = Capabilities(device_type="cpu")
GPU = Capabilities(device_type="cuda", bf16=True, fp16=True, tf32=True)
LOADER = {"num_workers": 1, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 2}
CFG = ExecConfig(amp_dtype="bfloat16", optimizer_impl="fused", dataloader=dict(LOADER))

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                              or importlib.util.find_spec("accelerate") is None,
                              reason="transformers and accelerate are not installed")
needs_pl = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")


# ---------------------------------------------------------------------------- detect
def test_detect_reads_the_framework_from_the_scripts():
    assert fw.detect(HF_SCRIPT.read_text()) == "transformers"
    assert fw.detect(PL_SCRIPT.read_text()) == "lightning"


@pytest.mark.parametrize("source, kind", [
    ("import transformers\nargs = transformers.TrainingArguments('out')\n", "transformers"),
    ("from transformers import Seq2SeqTrainer as T\nT(model=m)\n", "transformers"),
    ("import pytorch_lightning as pl\npl.Trainer(max_epochs=1).fit(m)\n", "lightning"),
    ("from lightning.pytorch import Trainer\nTrainer()\n", "lightning"),
    ("import lightning.pytorch as pl\nclass MyTrainer(pl.Trainer):\n    pass\nMyTrainer()\n", "lightning"),
    # a plain loop that uses transformers only for its model: the generic hooks drive it
    ("from transformers import GPT2LMHeadModel, GPT2Config\nm = GPT2LMHeadModel(GPT2Config())\n", None),
    ("import lightning as L\nclass M(L.LightningModule):\n    pass\n", None),
    ("Trainer()\n", None),  # not the framework's Trainer
    ("def f(:\n", None),
])
def test_detect_needs_an_import_and_a_trainer_call(source, kind):
    assert fw.detect(source) == kind


# ---------------------------------------------------------------------------- plans
def test_transformers_plan_maps_amp_fused_and_loader_on_cpu():
    p = fw.plan("transformers", CFG.with_(channels_last=True), CPU)
    assert p.kwargs == {"bf16": True, "fp16": False, "use_cpu": True, "optim": "adamw_torch_fused",
                        "dataloader_num_workers": 1, "dataloader_pin_memory": False,
                        "dataloader_persistent_workers": True, "dataloader_prefetch_factor": 2}
    assert p.fields == {"amp_dtype", "optimizer_impl", "dataloader"}
    assert set(p.reasons) == {"channels_last"}
    assert fw.knob_exprs("transformers", CFG, CPU) == {
        "bf16": "True", "use_cpu": "True", "optim": "'adamw_torch_fused'", "dataloader_num_workers": "1",
        "dataloader_pin_memory": "False", "dataloader_persistent_workers": "True", "dataloader_prefetch_factor": "2"}


def test_transformers_plan_on_cuda_compile_fp16_and_tf32():
    cfg = ExecConfig(device="cuda", amp_dtype="float16", grad_scaler=True, compile_mode="max-autotune-no-cudagraphs",
                     matmul_precision="high", dataloader={"num_workers": 2, "pin_memory": True, "non_blocking": True})
    p = fw.plan("transformers", cfg, GPU)
    assert p.kwargs == {"fp16": True, "bf16": False, "torch_compile": True,
                        "torch_compile_mode": "max-autotune-no-cudagraphs", "torch_compile_backend": "inductor",
                        "tf32": True, "dataloader_num_workers": 2, "dataloader_pin_memory": True,
                        "accelerator_config": {"non_blocking": True}}
    assert p.fields == {"amp_dtype", "grad_scaler", "compile_mode", "compile_backend", "matmul_precision",
                        "dataloader"}
    exprs = p.exprs()
    assert "torch_compile_backend" not in exprs and "bf16" not in exprs and exprs["tf32"] == "True"
    # on a CPU TF32 is not a TrainingArguments knob: the driver's process-wide setting stands
    cpu = fw.plan("transformers", ExecConfig(matmul_precision="high"), CPU)
    assert cpu.kwargs == {} and "matmul_precision" not in cpu.fields and "CUDA" in cpu.reasons["matmul_precision"]


def test_fused_needs_adamw_and_a_dropped_field_leaves_the_patch():
    p = fw.plan("transformers", CFG, CPU, optim="sgd")
    assert "optim" not in p.kwargs and "optimizer_impl" not in p.fields
    assert "not AdamW" in p.reasons["optimizer_impl"]
    foreach = fw.plan("transformers", ExecConfig(optimizer_impl="foreach"), CPU)
    assert foreach.kwargs == {} and "foreach" in foreach.reasons["optimizer_impl"]
    site = {"optim": "adamw_torch", "dropped": {"optimizer_impl": "the script gives the Trainer its own optimizer"}}
    assert "optim" not in fw.knob_exprs("transformers", CFG, CPU, site=site)
    assert "optim" in fw.knob_exprs("transformers", CFG, CPU, site={"optim": "adamw_torch"})


def test_lightning_plan_applies_precision_only_and_says_why_not_the_rest():
    cfg = CFG.with_(compile_mode="default")
    p = fw.plan("lightning", cfg, CPU)
    assert p.kwargs == {"precision": "bf16-mixed"} and p.fields == {"amp_dtype"}
    assert set(p.reasons) == {"compile_mode", "optimizer_impl", "dataloader"}
    assert "no compile argument" in p.reasons["compile_mode"]
    assert fw.knob_exprs("lightning", cfg, CPU) == {"precision": "'bf16-mixed'"}
    # fp16: "16-mixed" on CUDA (with its scaler); on a CPU Lightning would run bf16 instead
    fp16 = ExecConfig(amp_dtype="float16", grad_scaler=True)
    assert fw.plan("lightning", fp16, GPU).kwargs == {"precision": "16-mixed"}
    assert fw.plan("lightning", fp16, GPU).fields == {"amp_dtype", "grad_scaler"}
    assert fw.plan("lightning", fp16, CPU).fields == frozenset() and "bf16" in fw.unexpressed("lightning", fp16, CPU)[
        "amp_dtype"]
    assert fw.knobs("lightning", ExecConfig(cudnn_benchmark=True), GPU) == {"benchmark": True}


def test_install_reads_the_framework_from_the_recorded_script_and_plain_scripts_get_nothing(tmp_path):
    plain = tmp_path / "train.py"
    plain.write_text("import torch\nmodel = torch.nn.Linear(2, 2)\n")
    assert fw.install(CFG, CPU, {"script": str(plain)}) == set()
    with pytest.raises(ValueError, match="framework"):
        fw.install(CFG, CPU, {})


def test_call_site_is_the_users_call_or_marked_indirect(tmp_path, monkeypatch):
    lib = tmp_path / "site-packages"  # an installed package's folder: not the user's code
    lib.mkdir()
    (lib / "fakelib_builder.py").write_text("def build(cls):\n    return cls()\n")
    monkeypatch.syspath_prepend(str(lib))
    import fakelib_builder

    class Args:
        def __init__(self):
            self.site = fw._call_site(self)

    first = sys._getframe().f_lineno + 1
    direct = Args()
    assert direct.site == {"file": str(Path(__file__).resolve()), "line": first,
                           "function": "test_call_site_is_the_users_call_or_marked_indirect", "direct": True}
    indirect = fakelib_builder.build(Args)  # a library builds it for the script (HfArgumentParser, a Trainer)
    assert indirect.site["direct"] is False and indirect.site["line"] == first + 3


def test_accelerator_config_is_merged_not_replaced(tmp_path):
    assert fw._merge_accelerator_config(None, {"non_blocking": True}) == {"non_blocking": True}
    assert fw._merge_accelerator_config({"split_batches": True}, {"non_blocking": True}) == {
        "split_batches": True, "non_blocking": True}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"even_batches": False}))
    assert fw._merge_accelerator_config(str(path), {"non_blocking": True}) == {
        "even_batches": False, "non_blocking": True}

    class Config:
        split_batches = True
        non_blocking = False

    cfg = Config()
    assert fw._merge_accelerator_config(cfg, {"non_blocking": True}) is cfg and cfg.non_blocking is True


# ---------------------------------------------------------------------------- the scripts, run
RUNNER = r'''
import json, runpy, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

spec = json.loads(sys.argv[1])
record = {"script": spec["script"]}
applied = None
if spec["install"]:
    from autoopt.scripting import frameworks
    from autoopt.types import Capabilities, ExecConfig
    applied = frameworks.install(ExecConfig.from_json(spec["config"]), Capabilities(device_type="cpu"), record)
# the point: install() ran before the script imported its framework
early = sorted(m for m in ("transformers", "lightning", "pytorch_lightning") if m in sys.modules)
seen = {"autocast": None}

def on_forward(module, args):  # the dtype of the first module call under autocast (accelerate's is inside the model)
    if seen.get("autocast") is None and torch.is_autocast_enabled("cpu"):
        seen["autocast"] = str(torch.get_autocast_dtype("cpu"))

def frame_objects():
    f = sys._getframe(2)
    trainer = loader = None
    while f is not None:
        for v in list(f.f_locals.values()):
            if trainer is None and type(v).__name__ == "Trainer" and hasattr(v, "fit" if spec["kind"] == "lightning"
                                                                           else "train"):
                trainer = v
            if loader is None and isinstance(v, DataLoader):
                loader = v
        f = f.f_back
    return trainer, loader

def on_step(opt, args, kwargs):
    if "optimizer" in seen:
        return
    trainer, loader = frame_objects()
    seen["optimizer"] = {"type": type(opt).__name__, "fused": bool(opt.param_groups[0].get("fused"))}
    seen["loader"] = {k: getattr(loader, k) for k in ("num_workers", "pin_memory", "persistent_workers",
                                                      "prefetch_factor")}
    if spec["kind"] == "transformers":
        a = trainer.args
        seen["args"] = {k: getattr(a, k) for k in ("bf16", "fp16", "use_cpu", "dataloader_num_workers",
                        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                        "learning_rate", "max_steps", "per_device_train_batch_size", "logging_steps")}
        seen["args"]["optim"] = str(getattr(a.optim, "value", a.optim))
        seen["mixed_precision"] = trainer.accelerator.mixed_precision
    else:
        seen["precision"] = str(trainer.precision)
        seen["max_steps"] = trainer.max_steps

torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
register_optimizer_step_post_hook(on_step)
sys.argv = [spec["script"], *spec["args"]]
runpy.run_path(spec["script"], run_name="__main__")
out = {"early": early, "seen": seen, "record": record.get("framework"),
       "applied": None if applied is None else sorted(applied)}
print("@@RESULT@@" + json.dumps(out, default=str))
'''


def _run(tmp_path: Path, script: Path, kind: str, args: list[str], *, install: bool, cfg: ExecConfig = CFG) -> dict:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    spec = {"script": str(script), "args": args, "kind": kind, "install": install, "config": cfg.to_json()}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DISABLE_TQDM="1")
    proc = subprocess.run([sys.executable, str(runner), json.dumps(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@"):])


def _line_of(script: Path, text: str) -> int:
    return next(i for i, ln in enumerate(script.read_text().splitlines(), 1) if text in ln)


@needs_hf
@pytest.mark.slow
def test_hf_trainer_script_carries_the_knobs_and_the_call_site(tmp_path):
    res = _run(tmp_path, HF_SCRIPT, "transformers", ["--max-steps", "3", "--output-dir", str(tmp_path / "o")],
               install=True)
    assert res["early"] == []
    assert res["applied"] == ["amp_dtype", "dataloader", "optimizer_impl"]
    args = res["seen"]["args"]
    assert args["bf16"] is True and args["use_cpu"] is True and args["optim"] == "adamw_torch_fused"
    assert {k: args[f"dataloader_{k}"] for k in LOADER} == LOADER
    # the user's other arguments are the script's
    assert (args["learning_rate"], args["max_steps"], args["per_device_train_batch_size"], args["logging_steps"]) \
        == (5e-4, 3, 4, 5)
    # and the framework applied them: autocast in the forward, fused AdamW, the loader's workers
    assert res["seen"]["mixed_precision"] == "bf16" and res["seen"]["autocast"] == "torch.bfloat16"
    assert res["seen"]["optimizer"] == {"type": "AdamW", "fused": True}
    assert res["seen"]["loader"]["num_workers"] == 1 and res["seen"]["loader"]["persistent_workers"] is True
    site = res["record"]
    assert site["kind"] == "transformers" and site["call"] == "TrainingArguments" and site["direct"] is True
    assert Path(site["file"]) == HF_SCRIPT.resolve() and site["function"] == "main"
    assert site["line"] == _line_of(HF_SCRIPT, "training_args = TrainingArguments(")
    assert site["optim"] == "adamw_torch" and site["dropped"] == {}
    assert site["kwargs"]["optim"] == "'adamw_torch_fused'"


@needs_hf
@pytest.mark.slow
def test_hf_trainer_script_without_install_keeps_the_users_arguments(tmp_path):
    res = _run(tmp_path, HF_SCRIPT, "transformers", ["--max-steps", "2", "--output-dir", str(tmp_path / "o")],
               install=False)
    args = res["seen"]["args"]
    assert args["bf16"] is False and args["use_cpu"] is False and args["optim"] == "adamw_torch"
    assert args["dataloader_num_workers"] == 0 and args["dataloader_prefetch_factor"] is None
    assert res["seen"]["autocast"] is None and res["seen"]["mixed_precision"] == "no"
    assert res["seen"]["optimizer"] == {"type": "AdamW", "fused": False}
    assert res["record"] is None and res["applied"] is None


@needs_pl
@pytest.mark.slow
def test_lightning_script_gets_bf16_mixed_and_leaves_the_rest_to_the_generic_hooks(tmp_path):
    res = _run(tmp_path, PL_SCRIPT, "lightning", ["--max-steps", "3"], install=True)
    assert res["early"] == []
    assert res["applied"] == ["amp_dtype"]  # fused and the loader settings are the driver's generic hooks'
    assert res["seen"]["precision"] == "bf16-mixed" and res["seen"]["autocast"] == "torch.bfloat16"
    assert res["seen"]["max_steps"] == 3
    assert res["seen"]["optimizer"] == {"type": "AdamW", "fused": False}  # the script's own, untouched here
    site = res["record"]
    assert site["kind"] == "lightning" and site["call"] == "Trainer" and site["direct"] is True
    assert Path(site["file"]) == PL_SCRIPT.resolve()
    assert site["line"] == _line_of(PL_SCRIPT, "trainer = L.Trainer(")
    assert site["kwargs"] == {"precision": "'bf16-mixed'"}


@needs_pl
@pytest.mark.slow
def test_lightning_baseline_configuration_changes_nothing_but_records_the_call_site(tmp_path):
    # the baseline's child installs with a configuration that sets nothing: the patch needs the call site
    res = _run(tmp_path, PL_SCRIPT, "lightning", ["--max-steps", "2"], install=True, cfg=ExecConfig())
    assert res["seen"]["precision"] == "32-true" and res["seen"]["autocast"] is None
    assert res["applied"] == [] and res["record"]["kwargs"] == {}
    assert res["record"]["line"] == _line_of(PL_SCRIPT, "trainer = L.Trainer(")


# ---------------------------------------------------------------------------- corner cases, one process
CORNERS = r'''
import json, sys
import torch
from autoopt.scripting import frameworks
from autoopt.types import Capabilities, ExecConfig

out = {}
record = {}
cfg = ExecConfig(amp_dtype="bfloat16", optimizer_impl="fused", compile_mode="default")
applied = frameworks.install(cfg, Capabilities(device_type="cpu"), record, framework="transformers")
out["installed"] = sorted(applied)
import transformers.training_args as ta  # imported after install(): patched by the import hook
from transformers import Trainer, TrainingArguments
ta.is_torch_tf32_available = lambda: True  # as on an Ampere GPU: transformers would switch TF32 on with compile

a = TrainingArguments(output_dir="o1", report_to="none", optim="sgd")
out["ours"] = {"torch_compile": a.torch_compile, "bf16": a.bf16, "optim": str(a.optim.value),
               "fp32_precision": torch.backends.fp32_precision}
out["after_sgd"] = sorted(applied)
out["site"] = json.loads(json.dumps(record["framework"]))
b = TrainingArguments(output_dir="o2", report_to="none", torch_compile=True)  # the user's own compile
out["users_compile_fp32_precision"] = torch.backends.fp32_precision
applied.add("optimizer_impl")
model = torch.nn.Linear(4, 2)
Trainer(model=model, args=b, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
out["after_own_optimizer"] = sorted(applied)
out["dropped"] = record["framework"]["dropped"]
print("@@RESULT@@" + json.dumps(out, default=str))
'''


@needs_hf
@pytest.mark.slow
def test_training_arguments_corner_cases(tmp_path):
    runner = tmp_path / "corners.py"
    runner.write_text(CORNERS)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(runner)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1][len("@@RESULT@@"):])
    assert res["installed"] == ["amp_dtype", "compile_backend", "compile_mode", "optimizer_impl"]
    # optim="sgd" is the user's and stays; fused is then left to the generic hook, and said why
    assert res["ours"]["optim"] == "sgd" and res["ours"]["bf16"] is True and res["ours"]["torch_compile"] is True
    assert res["after_sgd"] == ["amp_dtype", "compile_backend", "compile_mode"]
    assert "not AdamW" in res["site"]["dropped"]["optimizer_impl"] and res["site"]["optim"] == "sgd"
    assert res["site"]["line"] == _line_of(runner, 'a = TrainingArguments(') and res["site"]["direct"] is True
    # autoopt's torch_compile does not bring transformers' TF32 switch with it; the user's own compile does
    assert res["ours"]["fp32_precision"] == "none"
    assert res["users_compile_fp32_precision"] == "tf32"
    # a Trainer given the script's own optimizer: TrainingArguments' optim does not choose it
    assert res["after_own_optimizer"] == ["amp_dtype", "compile_backend", "compile_mode"]
    assert "its own optimizer" in res["dropped"]["optimizer_impl"]
