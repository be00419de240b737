"""`autoopt optimize --script` end to end, on scripts as people write them (the corpus of
tests/test_script_corpus.py: ours in several styles, and outside scripts copied verbatim from
published packages) and on the Hugging Face / Lightning Trainer scripts.

Which transform wins on this shared 2-core machine is not something a test can assert, so the
patch path is checked apart from the keep decision: each script's baseline is driven as in a
run, a transform is verified on it (its own child process, the script's losses compared), and
the patch written for that configuration must be checked by running the patched script under
autoopt (its losses match the variant's) — then the diff must apply to a copy of the script
and `python script ARGS` must exit 0. One full `autoopt optimize --script` run goes through
the command line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.cli import main
from autoopt.pipelines.script_optimize import ScriptOptimizeRun
from autoopt.search.trial import Candidate, Point
from autoopt.settings import MeasureSettings, OptimizeSettings, SearchSettings
from autoopt.transforms import get_transform
from autoopt.types import Finding
from tests.test_script_corpus import CORPUS, command, run_env

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK_SCRIPTS = ROOT / "tests" / "data" / "scripts"
BY_NAME = {e["name"]: e for e in CORPUS}

# (corpus entry, transform, params, what the diff must contain, what the notes must say or None)
CASES = [
    ("example_cnn", "amp", {"dtype": "bfloat16"}, "torch.autocast(", None),
    ("opacus_char_lstm", "fused_optimizer", {"impl": "foreach"}, "foreach=True", None),
    ("lm_memmap", "threads", {"num_threads": 1}, "torch.set_num_threads(1)", None),
    ("opacus_mnist", "amp", {"dtype": "bfloat16"}, "with torch.autocast(", None),
    # aot_eager: the patch's placement and note, not Inductor (tests/test_script_driver.py has a real one)
    ("sophia_gpt", "compile", {"backend": "aot_eager"}, "+model.compile(backend='aot_eager')\n",
     "patch: compile: the script has its own `model = torch.compile(model)` at line 185 "
     "under `if compile` (line 182), off in this run"),
]


def _settings(argv: list[str], cwd: Path, out: Path) -> OptimizeSettings:
    return OptimizeSettings(script_path=argv[1], script_args=argv[2:], script_cwd=str(cwd), out_dir=str(out),
                            measure=MeasureSettings.quick(), search=SearchSettings(time_budget_s=120))


def _prepared(entry: dict, tmp_path: Path, monkeypatch) -> tuple[list[str], Path]:
    work = tmp_path / "work"
    work.mkdir()
    argv, cwd = command(entry, work)
    for k, v in run_env(entry, work).items():
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)
    return argv, Path(cwd)


def _verified_patch(run: ScriptOptimizeRun, name: str, params: dict):
    """The configuration of one transform, verified in its own child, and the patch for it."""
    t = get_transform(name)
    params = t.resolve_params(run.workload, run.caps, params)
    cfg = t.apply(run.base_cfg, params, run.workload)
    out = run.evaluator.trial(f"try-{name}", cfg, tolerance=t.tolerance_for(params), anchor=None, trace=False)
    assert out.failure is None and out.verification is not None and out.verification.ok, (out.failure,
                                                                                          out.verification)
    finding = Finding(code=f"try-{name}", name=name, title=name, message="", evidence={}, safety=t.safety_for(params),
                      transform=name, params=params)
    best = Point(cfg, [Candidate(finding.code, finding, t, params)], out.measurement)
    run._patch(best, expected=list(out.verification.losses_variant))
    return out


def _apply_and_run(script_dir: Path, script_name: str, diff: str, argv_args: list[str], cwd: Path,
                   env: dict) -> subprocess.CompletedProcess:
    copy = cwd / "patched_copy"
    shutil.copytree(script_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run(["patch", "-p1", "--quiet"], input=diff, text=True, cwd=copy, capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return subprocess.run([sys.executable, str(copy / script_name), *argv_args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env))


@pytest.mark.slow
@pytest.mark.parametrize("entry_name,name,params,expect,note", CASES, ids=[c[0] for c in CASES])
def test_a_verified_transform_patches_the_script_which_then_runs(entry_name, name, params, expect, note, tmp_path,
                                                                  monkeypatch):
    entry = BY_NAME[entry_name]
    argv, cwd = _prepared(entry, tmp_path, monkeypatch)
    run = ScriptOptimizeRun(_settings(argv, cwd, tmp_path / "out"), decide=lambda f, t: False)
    try:
        run._setup()
        run._baseline()
        assert run.base.measurement.step_time_ms.n >= 5
        assert run.evaluator.sites["backward"] and run.evaluator.sites["step"]
        _verified_patch(run, name, params)
    finally:
        run.evaluator.close()
    check = run.patch_check
    assert check and check["ok"], (check, run.notes)
    assert check["losses"] == pytest.approx(check["expected"], rel=check["tolerance"] * 1.01)
    assert expect in run.patch_text and run.patch_text.startswith(f"--- a/{entry['script']}")
    assert note is None or any(n.startswith(note) for n in run.notes), run.notes
    done = _apply_and_run(entry["dir"], entry["script"], run.patch_text, argv[2:], cwd, run_env(entry, cwd))
    assert done.returncode == 0, done.stderr[-3000:]


def _framework_patch(tmp_path, folder: str, args: list[str], kind: str, call: str):
    """Our Trainer script in `folder`, driven with bf16 verified: the patch, checked by running
    the patched script, then applied to a copy that runs plain."""
    d = FRAMEWORK_SCRIPTS / folder
    run = ScriptOptimizeRun(_settings(["python", str(d / "train.py"), *args], tmp_path, tmp_path / "out"),
                            decide=lambda f, t: False)
    try:
        run._setup()
        run._baseline()
        assert run.evaluator.framework == kind
        assert run.evaluator.sites["framework"]["call"] == call
        _verified_patch(run, "amp", {"dtype": "bfloat16"})
    finally:
        run.evaluator.close()
    assert run.patch_check["ok"], (run.patch_check, run.notes)
    done = _apply_and_run(d, "train.py", run.patch_text, args, tmp_path, {})
    assert done.returncode == 0, done.stderr[-3000:]
    return run.patch_text


@pytest.mark.slow
def test_hf_trainer_script_gets_its_training_arguments_patched(tmp_path, monkeypatch):
    """Our HF Trainer script: bf16 goes into its TrainingArguments(...) call, checked by running it."""
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    patch = _framework_patch(tmp_path, "hf_trainer", ["--max-steps", "60", "--output-dir", str(tmp_path / "hf_out")],
                             "transformers", "TrainingArguments")
    assert "bf16=True" in patch and "torch.autocast" not in patch


@pytest.mark.slow
def test_lightning_script_gets_its_trainer_precision_patched(tmp_path):
    """Our Lightning script: bf16 becomes the Trainer's precision="bf16-mixed" in its L.Trainer(...)
    call, checked by running the patched script."""
    patch = _framework_patch(tmp_path, "lightning", ["--max-steps", "60"], "lightning", "Trainer")
    assert "precision='bf16-mixed'" in patch and "torch.autocast" not in patch


@pytest.mark.slow
def test_outside_trl_script_gets_its_parsed_arguments_defaulted(tmp_path, monkeypatch):
    """trl's sft.py builds its TrainingArguments from the command line (TrlParser): the variant is
    driven and verified, and the patch sets the kept argument as the parser's default before
    its parse call (the command line still rules), checked by running the patched script; the
    diff applies to a copy that then runs plain with the same arguments."""
    entry = BY_NAME["trl_sft"]
    argv, cwd = _prepared(entry, tmp_path, monkeypatch)
    run = ScriptOptimizeRun(_settings(argv, cwd, tmp_path / "out"), decide=lambda f, t: False)
    try:
        run._setup()
        run._baseline()
        _verified_patch(run, "fused_optimizer", {"impl": "fused"})
    finally:
        run.evaluator.close()
    assert run.evaluator.framework == "transformers"  # SFTTrainer / SFTConfig are transformers' subclasses
    assert run.evaluator.sites["framework"]["direct"] is False
    assert run.patch_check["ok"], (run.patch_check, run.notes)
    assert "+    parser.set_defaults(optim='adamw_torch_fused')\n" in run.patch_text, run.patch_text
    done = _apply_and_run(entry["dir"], entry["script"], run.patch_text, argv[2:], cwd, run_env(entry, cwd))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_optimize_script_command_end_to_end(tmp_path):
    """The whole loop through the command line on the bundled example script: a baseline, findings,
    variants verified and measured side by side, the final line, a report with its Script
    section, and a patch.diff that applies and runs when something was kept."""
    out = tmp_path / "report"
    script = ROOT / "examples" / "train_script.py"
    cmd = [sys.executable, "-m", "autoopt", "optimize", "--script", str(script), "--yes", "--json", "--quick",
           "--time-budget", "90", "--out", str(out), "--", "--epochs", "4", "--log-every", "50"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)
    assert r["script"]["args"] == ["--epochs", "4", "--log-every", "50"] and r["script"]["reproducible"] is True
    assert r["baseline"]["step_time_ms"]["n"] >= 5 and r["final"]["fixed_batch_speedup"] is not None
    tried = [v for v in r["variants"] if v["name"] not in ("baseline", "final") and v["status"] != "skipped"]
    assert tried, r["variants"]
    side_by_side = [v for v in tried if (v.get("verification") or {}).get("ok")
                    and ((v.get("decision") or {}).get("rounds") or 0) >= 2]
    assert side_by_side, [(v["name"], v["status"], v["reason"]) for v in tried]
    assert any(v["status"] == "skipped" and v["reason"].startswith("advice only on a script")
               for v in r["variants"]) or not any(f["transform"] == "batch_size" for f in r["findings"])
    md = (out / "report.md").read_text()
    assert "## Script" in md and "train_script.py" in md
    if r["final"]["codes"]:
        assert r["patch_check"]["ok"] or r["patch"] == "", r["patch_check"]
    if r["patch"]:
        done = _apply_and_run(script.parent, script.name, r["patch"], ["--epochs", "1", "--steps-per-epoch", "5"],
                              tmp_path, {})
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_outside_cnn_script_through_the_command_line(tmp_path, monkeypatch):
    """opacus' MNIST example, unmodified, through `autoopt optimize --script`: variants verified
    and measured side by side with the baseline, channels_last failing with the reason in the
    script's terms (it flattens a convolution's output with .view()), a report, and a patch
    that applies and runs when something was kept."""
    entry = BY_NAME["opacus_mnist"]
    argv, cwd = _prepared(entry, tmp_path, monkeypatch)
    args = list(argv[2:])
    args[args.index("--epochs") + 1] = "40"  # long enough for every round of the search
    out = tmp_path / "report"
    env = run_env(entry, cwd)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "autoopt", "optimize", "--script", argv[1], "--yes", "--json", "--quick",
           "--time-budget", "60", "--try", "channels_last", "--out", str(out), "--", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)
    tried = {v["name"]: v for v in r["variants"]}
    side_by_side = [v for v in tried.values() if (v.get("verification") or {}).get("ok")
                    and ((v.get("decision") or {}).get("rounds") or 0) >= 2]
    assert side_by_side, [(v["name"], v["status"], v["reason"]) for v in tried.values()]
    cl = [v for v in tried.values() if "channels_last" in [t["name"] for t in v.get("transforms") or []]]
    assert cl and cl[0]["status"] == "failed", cl
    assert "mnist.py:52" in cl[0]["reason"] and "torch.flatten(x, 1) at that line" in cl[0]["reason"]
    assert "## Script" in (out / "report.md").read_text()
    if r["patch"]:
        assert r["patch_check"]["ok"], r["patch_check"]
        done = _apply_and_run(entry["dir"], entry["script"], r["patch"], argv[2:], cwd, env)
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_style_script_with_nproc(tmp_path):
    """A DDP script (it joins the process group itself) as two ranks per configuration: a variant
    verified on both and measured beside the baseline in rounds, each step the slower rank's."""
    out = tmp_path / "report"
    ddp = ROOT / "tests" / "data" / "script_core" / "ddp.py"
    cmd = [sys.executable, "-m", "autoopt", "optimize", "--script", str(ddp), "--nproc", "2", "--yes", "--json",
           "--quick", "--time-budget", "90", "--try", "fused_optimizer:impl=foreach", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)
    assert r["script"]["nproc"] == 2
    assert r["baseline"]["samples_per_step"] == 16  # batch 8 on each of the two ranks
    (v,) = [v for v in r["variants"] if v["name"] == "try-fused_optimizer"]
    assert v["verification"]["ok"] and v["decision"]["rounds"] >= 2, v
    assert "2 ranks per configuration" in (out / "report.md").read_text()


def test_a_script_that_fails_on_its_own_is_exit_2_naming_its_line(tmp_path, capsys):
    bad = tmp_path / "train.py"
    bad.write_text("import torch\n\nmodel = torch.nn.Linear(4, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                   "for i in range(10):\n    x = torch.randn(8, 4)\n    raise ValueError('my data is broken')\n")
    rc = main(["optimize", "--script", str(bad), "--out", str(tmp_path / "o"), "--quiet", "--time-budget", "30"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "train.py:7" in err and "my data is broken" in err
    assert "autoopt/scripting" not in err and "Traceback" not in err
