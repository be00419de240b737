"""The parts of `optimize --script` that need no script run: which transforms are advice on a
script, what the patcher is asked to change, the command-line checks and the report's Script
section."""
from __future__ import annotations

import pytest

from autoopt.cli import main
from autoopt.output import data as D
from autoopt.output.markdown import render_markdown
from autoopt.pipelines.script_optimize import SCRIPT_TRANSFORMS, ScriptCandidateBuilder, advice_reason, script_changes
from autoopt.transforms import TRANSFORMS
from autoopt.types import ExecConfig, Finding, Status


def test_every_transform_is_applied_or_advice_with_a_reason():
    for name in TRANSFORMS:
        reason = advice_reason(name)
        if name in SCRIPT_TRANSFORMS:
            assert reason is None
        else:
            assert reason and reason.startswith("advice only on a script: ") and len(reason) > 40, name


def test_batch_size_finding_becomes_skipped_advice_not_a_candidate():
    from autoopt.transforms import get_transform

    variants: list = []
    builder = ScriptCandidateBuilder(workload=None, caps=None, decide=lambda f, t: True, variants=variants)
    f = Finding(code="AO402", name="larger-batch-cpu", title="t", message="m", evidence={}, safety="manual",
                transform="batch_size", params={"batch_size": 64})
    assert builder._candidate(f, get_transform("batch_size"), {"batch_size": 64}, True) is None
    (v,) = variants
    assert v.status == Status.SKIPPED and v.accepted is True
    assert "advice only on a script" in v.reason and "--batch-size" in v.reason


def test_advice_is_listed_as_advice_not_as_a_manual_finding_to_accept():
    r = {"variants": [
        {"name": "AO402", "status": "skipped", "accepted": False, "safety": "manual",
         "reason": advice_reason("batch_size"), "transforms": [{"name": "batch_size", "params": {}}]},
        {"name": "AO404", "status": "skipped", "accepted": False, "safety": "manual",
         "reason": "not applied: AO404 grad_accumulation changes training; pass --accept AO404 to try it",
         "transforms": [{"name": "grad_accumulation", "params": {}}]}]}
    assert D.manual_skip_lines(r) == ["AO404 (grad_accumulation): changes training; pass --accept AO404 to try it"]
    (line,) = D.advice_lines(r)
    assert line.startswith("AO402 (batch_size): autoopt does not change the batch")


def test_script_changes_names_only_what_the_kept_config_changes():
    base = ExecConfig(device="cpu", batch_size=32)
    assert script_changes(base, base) == {
        "amp": None, "channels_last": False, "compile": None, "optimizer_impl": None, "dataloader": None,
        "matmul_precision": None, "cudnn_benchmark": None, "num_threads": None, "framework_kwargs": None}
    cfg = base.with_(amp_dtype="bfloat16", channels_last=True, compile_mode="default", optimizer_impl="fused",
                     dataloader={"num_workers": 2, "pin_memory": False, "intra_op_threads": 1}, num_threads=1)
    ch = script_changes(cfg, base)
    assert ch["amp"] == {"device_type": "cpu", "dtype": "bfloat16", "scaler": False}
    assert ch["channels_last"] is True
    assert ch["compile"] == {"mode": "default", "backend": "inductor"}
    assert ch["optimizer_impl"] == "fused"
    assert ch["dataloader"] == {"num_workers": 2, "pin_memory": False}
    assert ch["num_threads"] == 1


def test_script_and_model_file_together_is_exit_2(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert main(["optimize", str(script), "--script", str(script), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "both a model file" in err and "--script" in err


def test_arguments_after_dashes_without_script_is_exit_2(tmp_path, capsys):
    assert main(["optimize", "--out", str(tmp_path / "o"), "--", "--epochs", "1"]) == 2
    assert "no --script" in capsys.readouterr().err


def test_missing_script_is_exit_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    assert main(["optimize", "--script", str(missing), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_batch_size_flag_with_script_is_exit_2(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert main(["optimize", "--script", str(script), "--batch-size", "8", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "the script builds its own" in capsys.readouterr().err


@pytest.mark.parametrize("reproducible,spread,expect", [
    (True, 0.0, "repeat exactly"),
    (False, 0.0123, "1.2e-02"),
])
def test_script_section_says_how_reproducible_the_losses_were(reproducible, spread, expect):
    import json
    from pathlib import Path

    from autoopt.output.html import render_html

    r = json.loads((Path(__file__).resolve().parent / "data" / "report_sample.json").read_text())
    r["script"] = {"path": "/w/train.py", "shown": "train.py", "args": ["--epochs", "1"], "cwd": "/w",
                   "framework": None, "reproducible": reproducible, "seed_spread": spread, "sites": {}}
    md = render_markdown(r)
    assert "## Script" in md and "--epochs 1" in md and expect in md
    assert "against the training script" in D.patch_note(r)
    html = render_html(r)
    assert 'id="script"' in html and "--epochs 1" in html
    r.pop("script")
    assert "## Script" not in render_markdown(r)
    assert D.patch_note(r) == D.PATCH_NOTE_FILE


def test_launcher_args_with_a_script_is_exit_2(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert main(["optimize", "--script", str(script), "--nproc", "2", "--launcher-arg=--nnodes=2",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--standalone" in capsys.readouterr().err
