"""`autoopt profile --script`: unmodified training scripts under the profiler
(autoopt.pipelines.script). The scripts are in tests/scripts/."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autoopt.errors import UserError
from autoopt.pipelines.script import profile_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def test_missing_script_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        profile_script(str(tmp_path / "nope.py"), [], logdir=str(tmp_path))


def test_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        profile_script(str(tmp_path), [], logdir=str(tmp_path))


def test_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef main(:\n    pass\n")
    with pytest.raises(UserError, match=r"line 3"):
        profile_script(str(bad), [], logdir=str(tmp_path))


def test_steps_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        profile_script(str(SCRIPTS / "infer_only.py"), [], steps=0, logdir=str(tmp_path))


@pytest.mark.slow
def test_training_script_is_profiled_for_bounded_steps_with_source_lines(tmp_path, capsys):
    argv = sys.argv[:]
    res = profile_script(str(SCRIPTS / "train_cnn.py"), ["--epochs", "50", "--batch-size", "16"], steps=2,
                         logdir=str(tmp_path))
    assert sys.argv == argv  # restored
    # 50 epochs x 16 batches would be 800 steps: stopped after 1 + 1 warm-up + 2 profiled
    assert res["optimizer_steps"] == 4
    assert res["mode"] == "train" and res["profiled_steps"] == 2
    assert res["metrics"]["steps"] == 2 and res["traces"][0]["steps_from_spans"]
    assert len(list(Path(res["logdir"]).glob("*.pt.trace.json.gz"))) == 1
    assert res["optimizers"] == [{"type": "SGD", "impl": "for-loop", "steps": 4}]
    src = (SCRIPTS / "train_cnn.py").read_text().splitlines()

    def line_of(site: str) -> str:
        return src[int(site.split(" ")[0].rsplit(":", 1)[1]) - 1].strip()

    s = res["sources"]
    assert line_of(s["optimizer_step"][0]) == "opt.step()"
    assert "model(x)" in line_of(s["model_forward"][0])
    assert line_of(s["sync"][0]) == "running = loss.item()"
    assert line_of(s["dataloader"][0]) == "for x, y in loader:"
    # a CNN on 4-D NCHW inputs on the CPU: the channels_last advice points at the model call
    f = next(f for f in res["findings"] if f["code"] == "AO202")
    assert f["sources"] and "train_cnn.py:" in f["message"]
    # the script's prints went to stderr, not stdout; the epoch loop never finished one epoch
    assert capsys.readouterr().out == ""
    json.dumps(res)


@pytest.mark.slow
def test_script_without_an_optimizer_is_profiled_as_a_whole(tmp_path, capsys):
    from autoopt.cli import main

    rc = main(["profile", "--script", str(SCRIPTS / "infer_only.py"), "--logdir", str(tmp_path), "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    res = json.loads(cap.out)  # only JSON on stdout: the script's print went to stderr
    assert "done (32, 4)" in cap.err
    assert res["mode"] == "whole-script" and res["optimizer_steps"] == 0
    assert res["traces"][0]["steps_from_spans"] is False
    assert any("never stepped an optimizer" in n for n in res["notes"])
    assert len(list(Path(res["logdir"]).glob("*.pt.trace.json.gz"))) == 1


@pytest.mark.slow
def test_script_that_raises_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError) as ei:
        profile_script(str(SCRIPTS / "raises.py"), [], logdir=str(tmp_path))
    msg = ei.value.message
    assert "raises.py" in msg and "FileNotFoundError" in msg and "/nonexistent/data.npz" in msg
    assert "raises.py:6 (in load_data)" in msg


@pytest.mark.slow
def test_script_usage_error_exit_status_is_a_user_error(tmp_path, capsys):
    from autoopt.cli import main

    rc = main(["profile", "--script", str(SCRIPTS / "bad_args.py"), "--logdir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "exited with status 2" in err and "bad_args.py" in err
