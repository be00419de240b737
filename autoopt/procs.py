"""Signals and child processes: what keeps a run's report and its servers in order when the
world stops it.

- `signals_as_interrupts()` (installed by autoopt.cli around a command, the previous
  handlers put back after) turns SIGTERM and SIGHUP into `Signalled`, a KeyboardInterrupt
  that carries the signal's number, so `timeout`, Slurm, Kubernetes, `docker stop` and a
  closed terminal take the same path as Ctrl-C: the partial report is written and the exit
  status is 128 + the signal (130 INT, 143 TERM, 129 HUP). Only the first signal raises.
- `deferred_signals()` holds SIGINT, SIGTERM and SIGHUP back while a report is written, so
  a second signal cannot cut report.json in half; the signal held back is raised after
  (or dropped, when the caller is already on its way out).
- `spawn()` starts a child (TensorBoard, torch.distributed's launcher and its ranks) in its
  own process group, asks Linux to SIGTERM it should autoopt die without a word (SIGKILL),
  and remembers it; `stop_group()` ends the whole group (SIGTERM, then SIGKILL), and at
  exit every group still remembered is stopped.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

# Ctrl-C, then what schedulers and a closed terminal send (no SIGHUP on Windows)
HELD = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
             if s is not None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken like Ctrl-C (a KeyboardInterrupt: every `except Exception`
    lets it through and every Ctrl-C path handles it)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signum_of(exc: BaseException) -> int:
    """The signal behind an interrupt: SIGINT for a plain KeyboardInterrupt."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _FirstRaises:
    """The first of SIGINT, SIGTERM and SIGHUP raises (KeyboardInterrupt, Signalled); the
    ones after it are only noted: the run is already on its way out, writing its report."""

    def __init__(self) -> None:
        self.fired: Optional[int] = None

    def __call__(self, signum, _frame) -> None:
        if self.fired is not None:
            return
        self.fired = signum
        raise KeyboardInterrupt() if signum == signal.SIGINT else Signalled(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM and SIGHUP raise Signalled and Ctrl-C KeyboardInterrupt, the
    first of them only (a second one cannot cut the partial report short); the previous
    handlers after it. Outside the main thread (where Python cannot set handlers) nothing
    changes, and a signal ignored before (`nohup` ignores SIGHUP) stays ignored."""
    if not _main_thread():
        yield
        return
    previous = {s: h for s in HELD if (h := signal.getsignal(s)) != signal.SIG_IGN}
    handler = _FirstRaises()
    try:
        for s in previous:
            signal.signal(s, handler)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _Held:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def deferred_signals(*, reraise: bool = True) -> Iterator[_Held]:
    """SIGINT, SIGTERM and SIGHUP are held back inside the block (the first one is kept in
    the yielded object's `signum`; an ignored one stays ignored). After it the previous
    handlers are back and, with `reraise`, the signal held back is delivered to its handler
    (one left to the default is raised as an interrupt)."""
    held = _Held()
    if not _main_thread():
        yield held
        return
    previous = {s: h for s in HELD if (h := signal.getsignal(s)) != signal.SIG_IGN}
    for s in previous:
        signal.signal(s, held)
    try:
        yield held
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if reraise and held.signum is not None:
        handler = previous[held.signum]
        if callable(handler):
            handler(held.signum, None)
        else:
            raise KeyboardInterrupt() if held.signum == signal.SIGINT else Signalled(held.signum)


# ---------------------------------------------------------------------------- children
_children: dict[int, subprocess.Popen] = {}


def _death_signal():
    """Linux: a preexec_fn that has the child SIGTERMed when the thread that started it ends
    (autoopt killed by SIGKILL included); None elsewhere, or where it cannot be set up. Set
    up in the parent: the child between fork and exec only calls it."""
    if not sys.platform.startswith("linux") or not _main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return preexec


def spawn(cmd: list[str], *, remove_after: Sequence[str] = (), **kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd) as the leader of its own process group (start_new_session: a
    Ctrl-C at the terminal reaches autoopt, which stops the group in order), remembered
    until stop_group() so that no exit path leaves it running; the files in `remove_after`
    (its temporary log) are removed when it is stopped."""
    kwargs["start_new_session"] = True
    preexec = _death_signal()
    if preexec is not None:
        kwargs.setdefault("preexec_fn", preexec)
    proc = subprocess.Popen(cmd, **kwargs)
    proc.autoopt_remove_after = list(remove_after)  # type: ignore[attr-defined]
    _children[proc.pid] = proc
    return proc


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_running(pgid: int) -> bool:
    """Whether a process of group pgid still runs (zombies waiting to be reaped do not count).
    Linux reads /proc; elsewhere a signal 0 to the group answers (zombies included)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return _killpg(pgid, 0)
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _wait_group(pgid: int, timeout_s: float) -> None:
    """Wait until the group's processes have ended (a SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while _group_running(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0, *, reraise: bool = True) -> Optional[int]:
    """End `proc` and everything in its process group: SIGTERM, then SIGKILL after grace_s.
    Members left behind by a leader that already exited are ended too. Returns its exit code.
    A signal that comes meanwhile is raised after (with `reraise`)."""
    _children.pop(proc.pid, None)
    with deferred_signals(reraise=reraise):  # a second Ctrl-C must not leave the group half stopped
        if _killpg(proc.pid, signal.SIGTERM):
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            _killpg(proc.pid, signal.SIGKILL)  # the leader's own children that ignored SIGTERM
            _wait_group(proc.pid, min(grace_s, 5.0))  # ... and gone before we return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (uninterruptible sleep)
            pass
        for path in getattr(proc, "autoopt_remove_after", ()):
            with contextlib.suppress(OSError):
                os.unlink(path)
    return proc.returncode


@atexit.register
def stop_all() -> None:
    """Stop every child group still running (at exit, whatever the path to it)."""
    for proc in list(_children.values()):
        stop_group(proc, grace_s=5.0, reraise=False)
