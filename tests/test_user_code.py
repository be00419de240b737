"""The model file's code at any call: with --json its output never reaches stdout (print(), a
write to file descriptor 1), and an exception it raises after the first, checked call is the
one-paragraph model-file error (exit 2) naming the file and the function, not "an internal
error"; a failure only a transform causes stays a failed variant."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.cli import main

# a tiny inference model; {forward} and {make_batch} are filled in per test
TEMPLATE = '''
import os
import sys
import torch
import torch.nn as nn

CALLS = {{"forward": 0, "make_batch": 0}}
BATCH_SIZE = 4


def build_model():
    {build_model_extra}
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def make_batch(batch_size):
    CALLS["make_batch"] += 1
    n = CALLS["make_batch"]
    {make_batch}
    return torch.randn(batch_size, 8)


def forward(model, batch):
    CALLS["forward"] += 1
    n = CALLS["forward"]
    {forward}
    return model(batch)
'''


def _model(tmp_path: Path, name: str = "m.py", *, forward: str = "pass", make_batch: str = "pass",
           build_model_extra: str = "pass") -> Path:
    p = tmp_path / name
    p.write_text(TEMPLATE.format(forward=forward, make_batch=make_batch, build_model_extra=build_model_extra))
    return p


def _profile(path: Path, tmp_path: Path, *extra: str) -> int:
    return main(["profile", str(path), "--steps", "1", "--quiet", "--device", "cpu",
                 "--logdir", str(tmp_path / "logs"), *extra])


def _is_model_file_error(err: str, path: Path, function: str) -> None:
    assert "internal error" not in err and "bug in autoopt" not in err, err
    assert "Traceback" not in err, err
    assert path.name in err and f": {function}:" in err, err
    assert "Fix:" in err, err


# ---------------------------------------------------------------- stdout belongs to the JSON
def test_profile_json_stdout_is_only_json_whatever_the_model_prints(tmp_path, capfd):
    m = _model(tmp_path, build_model_extra='print("HELLO-from-build_model")',
               make_batch='print("HELLO-from-make_batch")',
               forward='os.write(1, b"HELLO-fd1-from-forward\\n"); print("HELLO-print-forward")')
    assert _profile(m, tmp_path, "--json") == 0
    out, err = capfd.readouterr()
    doc = json.loads(out)  # the whole of stdout is one JSON document
    assert doc["model"] == "m" and doc["measurement"]["step_time_ms"]["n"] >= 1
    for text in ("HELLO-from-build_model", "HELLO-from-make_batch", "HELLO-fd1-from-forward", "HELLO-print-forward"):
        assert text not in out
        assert text in err


def test_stdout_is_put_back_after_a_json_command(tmp_path, capfd):
    m = _model(tmp_path)
    assert _profile(m, tmp_path, "--json") == 0
    capfd.readouterr()
    print("after")  # sys.stdout and fd 1 are the test's again
    os.write(1, b"fd-after\n")
    out, err = capfd.readouterr()
    assert "after" in out and "fd-after" in out and "after" not in err


def _same_autoopt() -> dict:
    """The environment for a child `python -m autoopt` that imports the autoopt this test imported."""
    import autoopt

    here = str(Path(autoopt.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_subprocess_json_stdout_holds_only_the_document(tmp_path):
    """The real CLI, fd 1 a pipe: C-level and Python writes from the model go to stderr."""
    m = _model(tmp_path, build_model_extra='print("HELLO-build")',
               forward='os.write(1, b"HELLO-fd1\\n")')
    r = subprocess.run([sys.executable, "-m", "autoopt", "profile", str(m), "--json", "--steps", "1", "--quiet",
                        "--device", "cpu", "--logdir", str(tmp_path / "logs")],
                       capture_output=True, text=True, cwd=tmp_path, env=_same_autoopt(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    json.loads(r.stdout)
    assert "HELLO-build" in r.stderr and "HELLO-fd1" in r.stderr


# ---------------------------------------------------------------- errors at later calls
@pytest.mark.parametrize("call", [2, 3, 6])
def test_forward_raising_on_a_later_call_is_the_model_file_error(tmp_path, capfd, call):
    # call 1 is build_workload's check; 2 is the FLOP count; later ones the timed and traced steps
    m = _model(tmp_path, forward=f"if n == {call}: raise RuntimeError('broken on call {call}')")
    assert _profile(m, tmp_path) == 2
    err = capfd.readouterr().err
    _is_model_file_error(err, m, "forward")
    assert f"broken on call {call}" in err and "line " in err


def test_forward_raising_later_with_json_keeps_stdout_empty(tmp_path, capfd):
    m = _model(tmp_path, forward="if n == 4: raise ValueError('late')")
    assert _profile(m, tmp_path, "--json") == 2
    out, err = capfd.readouterr()
    assert out == ""
    _is_model_file_error(err, m, "forward")


def test_make_batch_raising_on_a_later_call_is_the_model_file_error(tmp_path, capfd):
    # build_workload calls make_batch twice; the session's batches come after
    m = _model(tmp_path, make_batch="if n == 3: raise KeyError('no more data')")
    assert _profile(m, tmp_path) == 2
    err = capfd.readouterr().err
    _is_model_file_error(err, m, "make_batch")
    assert "no more data" in err


def test_sys_exit_in_a_later_forward_is_the_model_file_error(tmp_path, capfd):
    m = _model(tmp_path, forward="if n == 3: sys.exit(3)")
    assert _profile(m, tmp_path) == 2
    err = capfd.readouterr().err
    _is_model_file_error(err, m, "forward")
    assert "sys.exit(3)" in err


BACKWARD = '''
import torch
import torch.nn as nn

CALLS = {"backward": 0}
BATCH_SIZE = 4


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        CALLS["backward"] += 1
        if CALLS["backward"] == 3:
            raise RuntimeError("backward gave up")
        return 2 * g


def build_model():
    return nn.Linear(8, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 8)


def forward(model, batch):
    return Twice.apply(model(batch)).pow(2).mean()


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01)
'''


def test_backward_through_a_user_autograd_function_raising_later(tmp_path, capfd):
    m = tmp_path / "bw.py"
    m.write_text(BACKWARD)
    assert _profile(m, tmp_path) == 2
    err = capfd.readouterr().err
    _is_model_file_error(err, m, "backward")
    assert "backward gave up" in err


def test_optimize_baseline_failing_later_is_the_model_file_error(tmp_path, capfd):
    m = _model(tmp_path, forward="if n == 5: raise RuntimeError('baseline broke')")
    rc = main(["optimize", str(m), "--json", "--quick", "--quiet", "--accept", "none", "--device", "cpu",
               "--out", str(tmp_path / "rep")])
    out, err = capfd.readouterr()
    assert rc == 2 and out == ""
    _is_model_file_error(err, m, "forward")
    assert "baseline broke" in err


def test_a_failure_only_under_a_transform_stays_a_failed_variant_and_stdout_stays_json(tmp_path, capfd):
    m = _model(tmp_path, make_batch='print("HELLO-make_batch")',
               forward="os.write(1, b'HELLO-fd1\\n')\n"
                       "    if torch.is_autocast_enabled('cpu'): raise RuntimeError('no autocast for me')")
    rc = main(["optimize", str(m), "--json", "--quick", "--quiet", "--accept", "none", "--device", "cpu",
               "--try", "amp:dtype=bfloat16", "--time-budget", "0", "--out", str(tmp_path / "rep")])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    report = json.loads(out)  # the whole of stdout is the report
    assert "HELLO-make_batch" in err and "HELLO-fd1" in err
    amp = [v for v in report["variants"] if v["name"] == "try-amp"]
    assert amp and amp[0]["status"] == "failed" and amp[0]["failure"]["kind"] == "RuntimeError"
    assert "no autocast for me" in amp[0]["failure"]["message"]


# ---------------------------------------------------------------- the FLOP counter
def _session(path: Path):
    from autoopt.env import capabilities_for
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    caps = capabilities_for("cpu", "test cpu", None, 4096.0, None, ("avx2",))
    wl = build_workload(load_model_file(path), caps)
    return Session(wl, wl.base_config())


def test_count_flops_passes_on_the_models_error(tmp_path):
    from autoopt.run.measure import count_flops

    m = _model(tmp_path, forward="if n == 2: raise RuntimeError('second call')")
    with _session(m) as s, pytest.raises(RuntimeError, match="second call") as info:
        count_flops(s)  # call 1 was build_workload's check
    from autoopt.workload.load import model_file_error

    err = model_file_error(info.value)
    assert err is not None and "m.py: forward:" in err.message


def test_count_flops_tolerates_what_the_counter_cannot_follow(tmp_path, monkeypatch):
    import torch
    from torch.utils import flop_counter

    from autoopt.run.measure import count_flops

    def cannot(*a, **k):
        raise NotImplementedError("this formula is not supported")

    monkeypatch.setitem(flop_counter.flop_registry, torch.ops.aten.addmm, cannot)
    m = _model(tmp_path)
    notes: list[str] = []
    with _session(m) as s:
        assert count_flops(s, notes) is None
    assert notes and "MFU unknown" in notes[0] and "not supported" in notes[0]


def test_a_rank_failing_in_the_models_code_reports_a_model_file_error(tmp_path):
    from autoopt.distributed.worker import describe_error
    from autoopt.workload.guard import UserCall

    m = tmp_path / "m.py"
    try:
        with UserCall(m, "forward"):
            raise RuntimeError("rank broke")
    except RuntimeError as e:
        info = describe_error(e, str(m))
    assert info["kind"] == "user" and "m.py: forward:" in info["message"] and "rank broke" in info["message"]


def test_a_model_failing_at_another_batch_size_fails_the_batch_variant_only(tmp_path, capfd):
    m = _model(tmp_path, forward="if batch.shape[0] != 4: raise RuntimeError('only batches of 4')")
    rc = main(["optimize", str(m), "--json", "--quick", "--quiet", "--accept", "none", "--device", "cpu",
               "--try", "batch_size", "--time-budget", "0", "--out", str(tmp_path / "rep")])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    report = json.loads(out)
    batch = [v for v in report["variants"] if v["name"] == "try-batch_size"]
    assert batch and batch[0]["status"] == "failed", report["variants"]
    assert batch[0]["failure"]["kind"] == "RuntimeError" and "only batches of 4" in batch[0]["failure"]["message"]


# ---------------------------------------------------------------- an error after the baseline keeps the work
@pytest.mark.parametrize("kind", ["model", "bug"])
def test_an_error_after_the_baseline_still_writes_the_report(tmp_path, capfd, monkeypatch, kind):
    from autoopt.errors import ModelFileError
    from autoopt.pipelines import optimize as O

    def final(self, best):
        if kind == "model":
            raise ModelFileError(f"{m}: forward: forward(model, batch) raised RuntimeError: broke in the final "
                                 "re-measurement. Fix: make it work on every call.")
        raise RuntimeError("a planted bug in the final stage")

    monkeypatch.setattr(O.OptimizeRun, "_final", final)
    m = _model(tmp_path)
    out_dir = tmp_path / "rep"
    rc = main(["optimize", str(m), "--quick", "--quiet", "--accept", "none", "--device", "cpu",
               "--time-budget", "0", "--out", str(out_dir)])
    err = capfd.readouterr().err
    assert rc == (2 if kind == "model" else 1), err[-2000:]
    assert str(out_dir / "report.json") in err  # the message says where the work is
    report = json.loads((out_dir / "report.json").read_text())
    assert report["interrupted"] is True
    i = report["interruption"]
    assert i["signal"] is None and i["phase"] == "final" and "baseline" in i["measured"]
    assert ("broke in the final" if kind == "model" else "a planted bug") in i["error"]
    assert any("stopped by an error" in n for n in report["notes"])
    assert (out_dir / "report.md").is_file()
