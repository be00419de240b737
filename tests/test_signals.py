"""Clean on any signal: SIGTERM (timeout, Slurm, Kubernetes, docker stop) and SIGHUP take
Ctrl-C's path. A stopped `autoopt optimize` leaves report.json with interrupted: true that
says what was and was not measured, prints one line and exits 128 + the signal; servers and
workers autoopt started (TensorBoard, the ranks of --nproc) die with it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoopt.errors import ExitCode, Interrupted
from autoopt.procs import Signalled, deferred_signals, signals_as_interrupts, spawn, stop_group

ROOT = Path(__file__).resolve().parents[1]

# A tiny model file; AUTOOPT_TEST_HOLD_LOAD=PATH makes build_model touch PATH and wait, so
# a test can stop the run while the model is being loaded.
TINY = '''
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 8


def build_model():
    hold = os.environ.get("AUTOOPT_TEST_HOLD_LOAD")
    if hold:
        open(hold, "w").close()
        time.sleep(120)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def make_batch(batch_size):
    g = torch.Generator().manual_seed(batch_size)
    return torch.randn(batch_size, 16, generator=g), torch.randint(0, 4, (batch_size,), generator=g)


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
'''

SEARCH_LINE = re.compile(r"\] (AO\d+|try-\w+)\S*: (building|verifying|measuring)")


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.py"
    p.write_text(TINY)
    return p


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_optimize(model: Path, out: Path, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autoopt", "optimize", str(model), "--yes", "--quick", "--time-budget", "60",
           "--try", "amp:dtype=bfloat16", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_line(p: subprocess.Popen, pattern: re.Pattern, timeout_s: float = 120) -> str:
    """stderr up to the first line matching `pattern` (progress lines: stderr is not a terminal)."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        seen += line
        if pattern.search(line):
            return seen
        if not line and p.poll() is not None:
            break
    pytest.fail(f"never saw {pattern.pattern!r}:\n{seen}")


def _wait_for_file(p: subprocess.Popen, path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _finish(p: subprocess.Popen, sig: int, seen: str = "") -> str:
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return seen + err


def _interrupted_report(out: Path, code: int, err: str, sig: int) -> dict:
    assert "Traceback" not in err, err
    assert code == 128 + sig, err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    assert report["interruption"]["signal"] == signal.Signals(sig).name
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert "**Interrupted:**" in (out / "report.md").read_text()
    return report


# ---------------------------------------------------------------------------- in process
def test_sigterm_and_sighup_become_an_interrupt_with_the_signal_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt) as e:
            with signals_as_interrupts():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises at the next bytecode
        assert isinstance(e.value, Signalled) and e.value.signum == sig
    assert {s: signal.getsignal(s) for s in before} == before
    assert Interrupted("x", signal.SIGTERM).exit_code == ExitCode.TERMINATED == 143
    assert Interrupted("x", signal.SIGHUP).exit_code == ExitCode.HANGUP == 129
    assert Interrupted("x").exit_code == ExitCode.INTERRUPTED == 130


def test_only_the_first_signal_raises_the_ones_after_cannot_cut_the_way_out_short():
    before = signal.getsignal(signal.SIGINT)
    with signals_as_interrupts():
        with pytest.raises(Signalled):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # writing the partial report now
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_ignored_before_stays_ignored_as_nohup_wants():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_as_interrupts():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_signal_while_a_report_is_written_is_held_until_it_is_written():
    with signals_as_interrupts():
        with pytest.raises(Signalled):
            with deferred_signals() as held:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                finished = True  # not cut short
        assert finished and held.signum == signal.SIGTERM
        with deferred_signals(reraise=False) as held:  # already on the way out: dropped
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
        assert held.signum == signal.SIGHUP


def test_an_interrupt_before_the_model_is_loaded_still_leaves_a_true_report(tmp_path, tiny):
    from autoopt.pipelines.optimize import OptimizeRun
    from autoopt.settings import OptimizeSettings

    run = OptimizeRun(OptimizeSettings(model_path=str(tiny), out_dir=str(tmp_path / "rep")), lambda *a: True)

    def stopped():
        raise Signalled(signal.SIGTERM)

    run._setup = stopped
    with pytest.raises(Interrupted) as e:
        run.run()
    assert e.value.exit_code == 143 and e.value.measured is False
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["interrupted"] is True and report["baseline"] is None and report["model"] == "tiny"
    assert report["interruption"] == {"signal": "SIGTERM", "phase": "load", "measured": [],
                                      "not_measured": ["baseline"]}
    assert any("nothing" in n and "SIGTERM" in n for n in report["notes"])


def test_a_second_signal_while_the_interrupted_report_is_written_does_not_lose_it(tmp_path, tiny, monkeypatch):
    from autoopt.output import report as render
    from autoopt.pipelines.optimize import OptimizeRun
    from autoopt.settings import OptimizeSettings

    run = OptimizeRun(OptimizeSettings(model_path=str(tiny), out_dir=str(tmp_path / "rep")), lambda *a: True)
    run._setup = lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5)
    real = render.render_markdown

    def markdown_then_a_second_signal(data):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return real(data)

    monkeypatch.setattr(render, "render_markdown", markdown_then_a_second_signal)
    with signals_as_interrupts(), pytest.raises(Interrupted):
        run.run()
    out = tmp_path / "rep"
    assert json.loads((out / "report.json").read_text())["interrupted"] is True
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


def test_a_distributed_run_interrupted_before_its_job_starts_still_leaves_a_report(tmp_path, tiny, monkeypatch):
    from autoopt.pipelines import distributed
    from autoopt.settings import DistributedSettings, OptimizeSettings

    def stopped(*_a, **_k):
        raise Signalled(signal.SIGHUP)

    monkeypatch.setattr(distributed, "check_args", stopped)
    settings = OptimizeSettings(model_path=str(tiny), out_dir=str(tmp_path / "rep"),
                                distributed=DistributedSettings(nproc=2))
    with pytest.raises(Interrupted) as e:
        distributed.optimize_distributed(settings)
    assert e.value.exit_code == 129 and e.value.measured is False
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["interrupted"] is True and report["interruption"]["phase"] == "load"
    assert report["interruption"]["measured"] == [] and "baseline" in report["interruption"]["not_measured"]


def test_spawned_group_is_stopped_whole_and_its_files_removed(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("")
    pidfile = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    proc = spawn([sys.executable, "-c", code], remove_after=[str(log)])
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    stop_group(proc, grace_s=5)
    assert proc.poll() is not None and not log.exists()
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


# ---------------------------------------------------------------------------- autoopt optimize
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_while_the_model_loads_leaves_a_report_that_says_nothing_was_measured(tmp_path, tiny, sig):
    out, hold = tmp_path / "rep", tmp_path / "holding"
    p = _start_optimize(tiny, out, AUTOOPT_TEST_HOLD_LOAD=str(hold))
    _wait_for_file(p, hold)
    err = _finish(p, sig)
    report = _interrupted_report(out, p.returncode, err, sig)
    assert report["baseline"] is None and report["variants"] == []
    assert report["interruption"]["phase"] == "load"
    assert report["interruption"]["not_measured"] == ["baseline"]
    assert "report.json" in err and "before anything measured reached the report" in err


@pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout")
def test_under_timeout_sigterm_leaves_the_report(tmp_path, tiny):
    """`timeout -s TERM N autoopt optimize ...`: whenever it fires (here while the model
    loads, or still while Python starts on a slow machine) there is a report."""
    out = tmp_path / "rep"
    r = subprocess.run(["timeout", "--preserve-status", "-s", "TERM", "6", sys.executable, "-m", "autoopt", "optimize",
                        str(tiny), "--yes", "--quick", "--out", str(out)], cwd=ROOT,
                       env=_env(AUTOOPT_TEST_HOLD_LOAD=str(tmp_path / "holding")), capture_output=True, text=True,
                       timeout=120)
    report = _interrupted_report(out, r.returncode, r.stderr, signal.SIGTERM)
    assert report["interruption"]["not_measured"] == ["baseline"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_while_the_baseline_is_traced_leaves_a_report(tmp_path, tiny, sig):
    out = tmp_path / "rep"
    p = _start_optimize(tiny, out)
    seen = _wait_for_line(p, re.compile(r"baseline: (tracing|verifying and measuring)"))
    err = _finish(p, sig, seen)
    report = _interrupted_report(out, p.returncode, err, sig)
    assert report["interruption"]["phase"] in ("baseline", "diagnose", "search")
    if report["baseline"] is None:
        assert "baseline" in report["interruption"]["not_measured"]
    else:
        assert "baseline" in report["interruption"]["measured"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_search_keeps_the_baseline_and_names_what_was_not_measured(tmp_path, tiny, sig):
    out = tmp_path / "rep"
    p = _start_optimize(tiny, out)
    seen = _wait_for_line(p, SEARCH_LINE)
    err = _finish(p, sig, seen)
    report = _interrupted_report(out, p.returncode, err, sig)
    assert report["baseline"]["step_time_ms"]["median"] > 0
    i = report["interruption"]
    assert i["phase"] in ("search", "final") and "baseline" in i["measured"]
    assert i["not_measured"], i  # the variant it was on, or the final re-measurement
    assert set(i["measured"]) == {v["name"] for v in report["variants"] if v["step_time_ms"]}
    assert "What was measured so far is in" in err and str(out / "report.json") in err


# ---------------------------------------------------------------------------- autoopt view
def _children_of(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds TensorBoard's pid through /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_view_stopped_by_a_signal_stops_tensorboard_and_removes_its_log(tmp_path, sig):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "report" / "tb" / "baseline"
    tb.mkdir(parents=True)
    (tb / "host.1.pt.trace.json.gz").write_bytes(b"")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "autoopt", "view", str(tmp_path / "report")], cwd=ROOT,
                         env=_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # printed once TensorBoard answers
        assert "TensorBoard on http://127.0.0.1:" in line, line + p.stderr.read()
        servers = _children_of(p.pid)
        assert servers and list(tmp.glob("autoopt-tensorboard-*.log"))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while any(_alive(s) for s in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [s for s in servers if _alive(s)]
    for s in left:  # a failing run must not leave a server behind either
        os.kill(s, signal.SIGKILL)
    assert not left, "TensorBoard still running after autoopt view exited"
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert not list(tmp.glob("autoopt-tensorboard-*.log"))


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children_of(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' pids through /proc")
def test_sigterm_during_a_distributed_job_stops_every_rank_and_writes_the_report(tmp_path, tiny):
    out = tmp_path / "rep"
    p = subprocess.Popen([sys.executable, "-m", "autoopt", "optimize", str(tiny), "--nproc", "2", "--device", "cpu",
                          "--yes", "--quick", "--out", str(out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        seen = _wait_for_line(p, re.compile(r"2 ranks running"))
        deadline = time.monotonic() + 60
        while len(workers) < 3 and time.monotonic() < deadline:  # the launcher and its two ranks
            workers = _descendants(p.pid)
            time.sleep(0.2)
        assert len(workers) >= 3, workers
        err = _finish(p, signal.SIGTERM, seen)
    finally:
        if p.poll() is None:
            p.kill()
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
    assert not left, "ranks still running after autoopt exited"
    report = _interrupted_report(out, p.returncode, err, signal.SIGTERM)
    assert report["baseline"] is None and report["interruption"]["measured"] == []
    assert "baseline" in report["interruption"]["not_measured"]
