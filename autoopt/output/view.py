"""`autoopt view`: TensorBoard over a report or log directory, bound to 127.0.0.1.

start_tensorboard() runs TensorBoard as a child process on a free local port and returns
once it answers HTTP; stop() ends its process group and removes its log. The CLI prints the
URL, waits, and calls stop() on every way out (Ctrl-C, SIGTERM, SIGHUP, an error). TensorBoard
runs in its own session (autoopt.procs.spawn), so the terminal's Ctrl-C reaches the CLI only
and the shutdown stays orderly; whatever autoopt misses is stopped at its exit, and on Linux
TensorBoard gets SIGTERM should autoopt be killed outright.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from autoopt.errors import UserError
from autoopt.procs import spawn, stop_group

INSTALL_HINT = 'pip install "tensorboard>=2.16" torch-tb-profiler'
TRACE_GLOBS = ("*.pt.trace.json", "*.pt.trace.json.gz")
EVENT_GLOB = "events.out.tfevents.*"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def profiler_plugin_available() -> bool:
    """torch-tb-profiler (the PyTorch Profiler tab) is installed."""
    return importlib.util.find_spec("torch_tb_profiler") is not None


def _has_runs(d: Path) -> bool:
    for pattern in (EVENT_GLOB,) + TRACE_GLOBS:
        if next(d.rglob(pattern), None) is not None:
            return True
    return False


def resolve_logdir(path) -> Path:
    """The TensorBoard log directory for PATH: a report directory -> its tb/, a log
    directory (event files or profiler traces in it or below) as it is."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such directory. Pass a report directory (reports/<model>-<time>/) or a "
                        "TensorBoard log directory, e.g. `autoopt view reports/simplenet-20250101-120000`.")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a directory. Pass the report directory that holds it "
                        f"(`autoopt view {p.parent}`) or a TensorBoard log directory.")
    if (p / "tb").is_dir() and _has_runs(p / "tb"):
        return (p / "tb").resolve()
    if _has_runs(p):
        return p.resolve()
    raise UserError(f"{p} holds no TensorBoard runs (no event files and no *.pt.trace.json(.gz) profiler "
                    "traces in it or in its tb/ folder). Run `autoopt optimize` or `autoopt profile` first and "
                    "pass the report or log directory it prints.")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "data/environment", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: str, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def start_tensorboard(logdir, host: str = "127.0.0.1", port: Optional[int] = None,
                      timeout_s: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on LOGDIR (a report directory means its tb/, see resolve_logdir)
    at http://HOST:PORT/ (a free port when none is given) and wait until it answers.
    Returns (process, url). Raises UserError when TensorBoard is not installed, the port is
    taken, or it does not come up within timeout_s."""
    if host == "localhost":
        host = "127.0.0.1"
    if host != "127.0.0.1":
        raise UserError(f"autoopt view binds TensorBoard to this machine only; {host!r} is not a loopback "
                        "address. Use 127.0.0.1 and forward the port (ssh -L) to look from elsewhere.")
    if not tensorboard_available():
        raise UserError(f"TensorBoard is not installed in this Python environment ({sys.executable}). "
                        f"Install it with `{INSTALL_HINT}` and run `autoopt view` again.")
    logdir = resolve_logdir(logdir)
    if port is None:
        port = free_port(host)
    elif not _port_free(host, port):
        raise UserError(f"Port {port} on {host} is already in use. Pick another with --port, or leave it out "
                        "for a free one.")
    log = tempfile.NamedTemporaryFile(prefix="autoopt-tensorboard-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port),
           # the Python loader: no extra data-server child process to track, same dashboards
           "--load_fast", "false", "--reload_interval", "2"]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                     remove_after=[log.name])
    except BaseException:
        os.unlink(log.name)
        raise
    finally:
        log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    url = f"http://{host}:{port}/"
    try:
        _wait_until_it_answers(proc, url, logdir, timeout_s)
    except BaseException:  # it did not come up, or Ctrl-C / SIGTERM / SIGHUP meanwhile: no server left behind
        stop(proc)
        raise
    return proc, url


def _wait_until_it_answers(proc: subprocess.Popen, url: str, logdir: Path, timeout_s: float) -> None:
    log = proc.log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = _log_tail(log)
            raise UserError(f"TensorBoard exited at start (exit code {proc.returncode}) for {logdir}: "
                            f"{out or 'no output'}. Check that `{INSTALL_HINT}` installs cleanly in this "
                            "environment.")
        if _answers(url):
            return
        time.sleep(0.25)
    raise UserError(f"TensorBoard did not answer on {url} within {timeout_s:.0f} s "
                    f"({_log_tail(log, 500) or 'no output'}). Try again, or run "
                    f"`tensorboard --logdir {logdir}` to see what it reports.")


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """Stop a TensorBoard started by start_tensorboard: SIGTERM to its process group, SIGKILL
    after timeout_s; its log file is removed. Returns its exit code. Stopping twice is harmless."""
    return stop_group(proc, timeout_s)
