"""--out never destroys a report, and every flag is checked before any work starts: bad
flags end in exit 2 with one paragraph naming the flag before the model file is imported
(a tripwire model file records an import), and a report directory is reused only with
--force (which removes the old report's files and tb/ first)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from autoopt.cli import main
from autoopt.errors import UserError

import autoopt  # noqa: E402 - the subprocesses run this same autoopt, whichever tree it is

ENV = {**os.environ, "PYTHONPATH": str(Path(autoopt.__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}

TRIPWIRE = '''
"""Records that it was imported, then stops: nothing past the flags may get this far."""
import pathlib

pathlib.Path(__file__).with_suffix(".imported").write_text("imported")
raise RuntimeError("the model file was imported")


def build_model():
    pass


def make_batch(batch_size):
    pass
'''


@pytest.fixture
def tripwire(tmp_path):
    path = tmp_path / "tripwire.py"
    path.write_text(TRIPWIRE)
    return path


def _read_only_dir(tmp_path: Path) -> str:
    """A directory nobody can create files in: a chmod-ed one, or /proc where permission bits
    do not bind (root)."""
    if os.geteuid() == 0:
        return "/proc/autoopt-test-out"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "out")


def _one_paragraph_exit_2(capsys, argv, *expected):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------- --try, --accept, --reject
@pytest.mark.parametrize("spec, expected", [
    ("amp:dtype=", "amp's dtype is empty"),
    ("amp:dtype=float128", "float128"),
    ("amp:colour=blue", "no parameter 'colour'"),
    ("amp:dtype", "KEY=VALUE"),
    ("channels_last:x=1", "takes no parameters"),
    ("compile:mode=fastest", "mode must be one of"),
    ("grad_accumulation:steps=1", "2 or more"),
    ("threads:num_threads=-3", "1 or more"),
    ("dataloader:pin_memory=maybe", "true or false"),
    ("no_such_transform", "there is no transform"),
])
def test_bad_try_specs_are_refused_before_the_model_file_is_imported(tripwire, capsys, spec, expected):
    _one_paragraph_exit_2(capsys, ["optimize", str(tripwire), "--try", spec, "--quiet"], f"--try {spec}", expected)
    assert not tripwire.with_suffix(".imported").exists()


def test_valid_try_specs_parse_to_typed_parameters():
    from autoopt.validate import parse_try

    assert parse_try("amp:dtype=float16,grad_scaler=true") == ("amp", {"dtype": "float16", "grad_scaler": True})
    assert parse_try("compile:mode=default,backend=aot_eager") == (
        "compile", {"mode": "default", "backend": "aot_eager"})
    assert parse_try("threads:num_threads=4") == ("threads", {"num_threads": 4})
    assert parse_try("channels_last") == ("channels_last", {})


def test_every_transform_declares_its_try_parameters():
    from autoopt.catalog import PARAMS, single_process_names

    assert set(PARAMS) == set(single_process_names())


@pytest.mark.parametrize("flag", ["--accept", "--reject"])
def test_unknown_accept_and_reject_codes_name_the_code_and_autoopt_rules(tripwire, capsys, flag):
    _one_paragraph_exit_2(capsys, ["optimize", str(tripwire), flag, "AO101,AO999", "--quiet"],
                          f"{flag} AO101,AO999", "AO999", "autoopt rules")
    assert not tripwire.with_suffix(".imported").exists()


def test_rule_codes_transform_names_and_none_are_valid_consent_codes():
    from autoopt.validate import check_codes

    check_codes("--accept", "AO101, amp,compile")
    check_codes("--accept", "none")
    check_codes("--reject", "ao201,ddp_static_graph")
    with pytest.raises(UserError, match="name of rule AO101"):
        check_codes("--accept", "enable-bf16-autocast")


# ---------------------------------------------------------------- paths and numbers
def test_out_that_is_a_file_is_refused(tripwire, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("mine")
    _one_paragraph_exit_2(capsys, ["optimize", str(tripwire), "--out", str(f), "--quiet"], "--out", "is a file")
    assert f.read_text() == "mine" and not tripwire.with_suffix(".imported").exists()


def test_export_never_overwrites_an_onnx_file_without_force(tripwire, tmp_path, capsys):
    f = tmp_path / "model.onnx"
    f.write_text("an older export")
    _one_paragraph_exit_2(capsys, ["export", str(tripwire), "--onnx", str(f)], "--onnx", "already exists",
                          "--force")
    assert f.read_text() == "an older export" and not tripwire.with_suffix(".imported").exists()
    # with --force the flags pass and the model file is imported (the tripwire fires: exit 2, model-file error)
    assert main(["export", str(tripwire), "--onnx", str(f), "--force"]) == 2
    assert tripwire.with_suffix(".imported").exists()


def test_out_that_is_not_writable_is_refused(tripwire, tmp_path, capsys):
    ro = _read_only_dir(tmp_path)
    try:
        _one_paragraph_exit_2(capsys, ["optimize", str(tripwire), "--out", ro, "--quiet"], "--out", "not writable")
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    assert not tripwire.with_suffix(".imported").exists()


def test_logdir_that_is_not_writable_is_refused(tripwire, tmp_path, capsys):
    ro = _read_only_dir(tmp_path)
    try:
        _one_paragraph_exit_2(capsys, ["profile", str(tripwire), "--logdir", ro, "--quiet"], "--logdir",
                              "not writable")
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o700)
    assert not tripwire.with_suffix(".imported").exists()


def test_profile_logdir_inside_a_report_needs_force(tripwire, tmp_path, capsys):
    report = tmp_path / "rep"
    report.mkdir()
    (report / "report.json").write_text("{}")
    _one_paragraph_exit_2(capsys, ["profile", str(tripwire), "--logdir", str(report / "tb"), "--quiet"],
                          "--logdir", "--force")
    assert not tripwire.with_suffix(".imported").exists()


@pytest.mark.parametrize("argv, expected", [
    (["optimize", "{m}", "--batch-size", "0"], "--batch-size 0"),
    (["profile", "{m}", "--batch-size", "-4"], "--batch-size -4"),
    (["profile", "{m}", "--steps", "0"], "--steps 0"),
    (["optimize", "{m}", "--nproc", "-1"], "--nproc -1"),
])
def test_zero_and_negative_numbers_are_refused(tripwire, capsys, argv, expected):
    _one_paragraph_exit_2(capsys, [a.format(m=tripwire) for a in argv] + ["--quiet"], expected)
    assert not tripwire.with_suffix(".imported").exists()


def test_view_port_out_of_range_is_refused_at_once(tmp_path, capsys):
    t0 = time.monotonic()
    _one_paragraph_exit_2(capsys, ["view", str(tmp_path / "no-such-dir"), "--port", "70000"], "--port 70000",
                          "65535")
    _one_paragraph_exit_2(capsys, ["view", str(tmp_path / "no-such-dir"), "--port", "-1"], "--port -1")
    assert time.monotonic() - t0 < 5


def test_view_port_0_picks_a_free_port(tmp_path, monkeypatch, capsys):
    import autoopt.output.view as view

    seen = {}

    def fake_start(logdir, port=None, **kw):
        seen["port"] = port
        return SimpleNamespace(poll=lambda: 0, returncode=0), "http://127.0.0.1:1234/"

    monkeypatch.setattr(view, "resolve_logdir", lambda p: Path(p))
    monkeypatch.setattr(view, "start_tensorboard", fake_start)
    monkeypatch.setattr(view, "stop", lambda proc: 0)
    assert main(["view", str(tmp_path), "--port", "0"]) == 0
    assert seen["port"] is None  # start_tensorboard picks a free port and the URL names it
    assert "http://127.0.0.1:1234/" in capsys.readouterr().out


# ---------------------------------------------------------------- the output directory rule
def test_new_report_dir_refuses_a_report_and_force_clears_only_the_report(tmp_path):
    from autoopt.pipelines.optimize import new_report_dir

    out = tmp_path / "rep"
    (out / "tb" / "old-run").mkdir(parents=True)
    (out / "tb" / "old-run" / "events.out.tfevents.1").write_text("old")
    for name in ("report.json", "report.md", "report.html", "plan.json", "patch.diff"):
        (out / name).write_text("old")
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a report"):
        new_report_dir(str(tmp_path / "reports"), "m", str(out))
    assert (out / "report.json").read_text() == "old"
    got = new_report_dir(str(tmp_path / "reports"), "m", str(out), force=True)
    assert got == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["my-notes.txt"]


def test_default_report_dirs_are_always_new(tmp_path):
    from autoopt.pipelines.optimize import new_report_dir

    made = {new_report_dir(str(tmp_path / "reports"), "m", None) for _ in range(3)}
    assert len(made) == 3 and all(d.is_dir() and not any(d.iterdir()) for d in made)


CHDIR_MODEL = '''
"""A tiny model file that changes the working directory while it is imported."""
import os

import torch

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "elsewhere"))
BATCH_SIZE = 4


def build_model():
    return torch.nn.Linear(8, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 8)
'''


def _optimize(model: Path, out: str, cwd: Path, *extra: str):
    return subprocess.run([sys.executable, "-m", "autoopt", "optimize", str(model), "--quick", "--accept", "none",
                           "--time-budget", "0.01", "--out", out, "--quiet", *extra],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


def test_a_relative_out_is_the_startup_directorys_even_when_the_model_file_chdirs(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(CHDIR_MODEL)
    (tmp_path / "elsewhere").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    r = _optimize(model, "rep", work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "rep" / "report.json").is_file() and not (tmp_path / "elsewhere" / "rep").exists()


@pytest.mark.slow
def test_out_is_never_overwritten_without_force_and_force_never_mixes_runs(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(CHDIR_MODEL.replace('os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '
                                         '"elsewhere"))\n', ""))
    out = tmp_path / "rep"
    first = _optimize(model, str(out), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (out / "report.json").read_text()
    runs_before = sorted(p.name for p in (out / "tb").iterdir())

    again = _optimize(model, str(out), tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "already holds a report" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in (out / "tb").iterdir()) == runs_before  # the refused run touched nothing

    (out / "tb" / "stray-run").mkdir()
    forced = _optimize(model, str(out), tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (out / "report.json").read_text() != before
    # the new run's only: a folder per variant of the new report (which findings fire depends on
    # the measured trace, so the two runs' variants may differ: AO104 did on a busy CI), no stray-run
    r = json.loads((out / "report.json").read_text())
    variants = {v["name"] for v in r["variants"]}
    after = sorted(p.name for p in (out / "tb").iterdir())
    assert "stray-run" not in after and "baseline" in after and set(after) <= variants, (after, variants)
    assert r["artifacts"]["report_json"] == str(out.resolve() / "report.json")
