"""The parent's handle on one child running a configuration of a script
(autoopt.scripting.driver): started in its own process group with its output in a log file,
spoken to over a unix socket (autoopt.scripting.protocol), every wait bounded by a timeout
and by the child still being alive.

A child that fails (its error event, a crash, a timeout, a connection lost) raises
WorkerFailed, which carries the kind, the message, the script's line and the log's tail.
"""
from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Optional

from autoopt import procs
from autoopt.scripting import protocol
from autoopt.scripting.target import ScriptTarget
from autoopt.types import ExecConfig

START_TIMEOUT_S = 120.0  # the child connects (Python and torch imported) within this
READY_TIMEOUT_S = 900.0  # the script's own start, data loading, compilation and the first steps
POLL_S = 0.2
WAKE_UP_MS = 20.0  # untimed steps of a measured window: about this long (a child idle in its turn wakes up)


class WorkerFailed(Exception):
    """A child that failed: `kind` is protocol's kind, or "timeout" / "crash"."""

    def __init__(self, kind: str, message: str, *, where: Optional[str] = None, traceback: str = "",
                 log: str = "", steps: Optional[int] = None, exc_type: str = ""):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.where = where
        self.traceback = traceback
        self.log = log
        self.steps = steps
        self.exc_type = exc_type

    def __str__(self) -> str:
        where = f" at {self.where}" if self.where else ""
        return f"{self.message}{where}"


class ScriptEnded(Exception):
    """The script returned (or exited 0) on its own after `steps` optimizer steps."""

    def __init__(self, steps: int, times_ms: list[float], losses: list[float]):
        super().__init__(f"the script ended on its own after {steps} optimizer step(s)")
        self.steps = steps
        self.times_ms = times_ms
        self.losses = losses


def _elementwise_max(rows: list[list[float]]) -> list[float]:
    n = min((len(r) for r in rows), default=0)
    return [max(r[i] for r in rows) for i in range(n)]


def merge_ranks(msgs: list[dict]) -> dict:
    """One message of a job from its ranks' (rank order): rank 0's, with each step's time the
    slowest rank's (a synchronous job runs at its pace), the largest peak memory, every
    rank's trace files and losses ("rank_losses")."""
    if len(msgs) == 1:
        return msgs[0]
    out = dict(msgs[0])
    for key in ("times_ms", "warmup_times_ms"):
        if key in out:
            out[key] = _elementwise_max([list(m.get(key) or []) for m in msgs])
    peaks = [m.get("peak_memory_mb") for m in msgs if m.get("peak_memory_mb") is not None]
    if "peak_memory_mb" in out:
        out["peak_memory_mb"] = max(peaks) if peaks else None
    if "files" in out:
        out["files"] = sorted({f for m in msgs for f in m.get("files") or []})
    if "losses" in out:
        out["rank_losses"] = [list(m.get("losses") or []) for m in msgs]
    return out


def _autoopt_root() -> str:
    import autoopt

    return str(Path(autoopt.__file__).resolve().parent.parent)


class ScriptWorker:
    """One child running `target` under `cfg`; `start()` then `wait_ready()`, then measure /
    trace, and `stop()` (or `kill()`)."""

    def __init__(self, target: ScriptTarget, cfg: ExecConfig, *, name: str, seed: int, verify_steps: int,
                 warmup_steps: int, log_dir: Path, framework_knobs: bool = True,
                 start_timeout_s: float = START_TIMEOUT_S, ready_timeout_s: float = READY_TIMEOUT_S,
                 nproc: int = 1):
        self.target = target
        self.cfg = cfg
        self.name = name
        self.seed = seed
        self.verify_steps = verify_steps
        self.warmup_steps = warmup_steps
        self.framework_knobs = framework_knobs
        self.start_timeout_s = start_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.nproc = max(1, int(nproc))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.conns: list[Connection] = []  # one per rank
        self.ready: Optional[dict] = None
        self.step_ms: Optional[float] = None  # a step's time, from the warm-up (bounds the waits)
        self._tmp: Optional[str] = None
        self._sock: Optional[socket.socket] = None
        self._log = None

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "ScriptWorker":
        self._tmp = tempfile.mkdtemp(prefix="autoopt-script-")
        address = os.path.join(self._tmp, "s")
        authkey = secrets.token_bytes(32)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address)
        self._sock.listen(self.nproc)
        self._sock.settimeout(POLL_S)
        spec = protocol.make_spec(script=self.target.path, args=self.target.args, cwd=self.target.cwd, cfg=self.cfg,
                                  seed=self.seed, address=address, authkey=authkey, verify_steps=self.verify_steps,
                                  warmup_steps=self.warmup_steps, framework_knobs=self.framework_knobs,
                                  nproc=self.nproc, sys_path0=self.target.sys_path0)
        spec_path = Path(self._tmp) / "spec.json"
        import json

        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        root = _autoopt_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        # one str/bytes hash order in every configuration's process (the driver seeds the rest): a
        # script that numbers its classes by iterating a set of strings (opacus' char-LSTM example
        # does) numbers them alike, or its losses differ between any two processes
        env.setdefault("PYTHONHASHSEED", str(self.seed % 2**32))
        self._log = open(self.log_path, "wb")
        launcher = [sys.executable]
        if self.nproc > 1:  # torchrun's engine: every rank runs the driver, with RANK / WORLD_SIZE set
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}"]
        self.proc = procs.spawn([*launcher, "-m", "autoopt.scripting.driver", str(spec_path)],
                                cwd=str(self.target.cwd), stdout=self._log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        self._accept(authkey)
        return self

    def _accept(self, authkey: bytes) -> None:
        """Every rank's connection (one without --nproc), each saying its rank first."""
        deadline = time.monotonic() + self.start_timeout_s
        conns: dict[int, Connection] = {}
        while len(conns) < self.nproc:
            try:
                s, _ = self._sock.accept()
            except socket.timeout:
                self._check_alive("before it connected")
                if time.monotonic() > deadline:
                    self._fail("timeout", f"the script's process did not start within {self.start_timeout_s:.0f} s")
                continue
            s.setblocking(True)
            conn = Connection(s.detach())
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
            self.conns.append(conn)  # closed with the others, whatever happens next
            hello = self._recv_one(conn, max(1.0, deadline - time.monotonic()), "starting")
            conns[int(hello.get("rank") or 0)] = conn
        self.conns = [conns[r] for r in sorted(conns)]
        self._sock.close()
        self._sock = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask the child to stop at its next step boundary, then end its process group."""
        if self.conns and self.alive():
            try:
                self.send({"cmd": "stop"})
            except OSError:
                pass
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
        self.kill()

    def kill(self) -> None:
        """End the child's process group now and clean up."""
        if self.proc is not None:
            procs.stop_group(self.proc, grace_s=3.0)
        for closable in (*self.conns, self._sock, self._log):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self.conns = []
        self._sock = self._log = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "ScriptWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # ------------------------------------------------------------------ messages
    def log_tail(self, chars: int = 2000) -> str:
        if self._log is not None:
            try:
                self._log.flush()
            except (OSError, ValueError):
                pass
        return protocol.log_tail(self.log_path, chars)

    def _fail(self, kind: str, message: str, **kw) -> None:
        log = self.log_tail()
        self.kill()
        raise WorkerFailed(kind, message, log=log, **kw)

    def _check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            self._fail("crash", f"the script's process {how} {when}")

    def _recv_one(self, conn: Connection, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if conn.poll(POLL_S):
                    return conn.recv()
            except (EOFError, OSError):
                self._check_alive(f"while {what}")
                self._fail("crash", f"the script's process closed its connection while {what}")
            self._check_alive(f"while {what}")
            if time.monotonic() > deadline:
                self._fail("timeout", f"no answer within {timeout_s:.0f} s while {what}")

    def _check_message(self, msg: dict, rank: int) -> None:
        on = f"rank {rank}: " if self.nproc > 1 else ""
        if msg.get("event") == "error":
            self._fail(msg.get("kind", protocol.SCRIPT), on + msg.get("message", ""), where=msg.get("where"),
                       traceback=msg.get("traceback", ""), steps=msg.get("steps"), exc_type=msg.get("type", ""))
        if msg.get("event") == "ended":
            self.kill()
            raise ScriptEnded(int(msg.get("steps") or 0), list(msg.get("times_ms") or []),
                              list(msg.get("losses") or []))

    def receive(self, timeout_s: float, what: str) -> dict[str, Any]:
        """The next message of every rank, merged (merge_ranks); WorkerFailed on an error of
        any rank, a crash or the timeout, ScriptEnded when the script ended on its own."""
        deadline = time.monotonic() + timeout_s
        got: dict[int, dict] = {}
        while len(got) < len(self.conns):
            for rank, conn in enumerate(self.conns):
                if rank in got:
                    continue
                try:
                    if conn.poll(POLL_S / len(self.conns)):
                        got[rank] = conn.recv()
                        self._check_message(got[rank], rank)
                except (EOFError, OSError):
                    self._check_alive(f"while {what}")
                    self._fail("crash", f"the script's process closed its connection while {what}")
            self._check_alive(f"while {what}")
            if len(got) < len(self.conns) and time.monotonic() > deadline:
                self._fail("timeout", f"no answer within {timeout_s:.0f} s while {what}")
        return merge_ranks([got[r] for r in sorted(got)])

    def send(self, cmd: dict) -> None:
        """A command to every rank."""
        for conn in self.conns:
            conn.send(cmd)

    def wait_ready(self) -> dict[str, Any]:
        msg = self.receive(self.ready_timeout_s, "running the verification and warm-up steps")
        if msg.get("event") != "ready":
            self._fail("setup", f"unexpected message {msg.get('event')!r} instead of ready")
        self.ready = msg
        times = msg.get("warmup_times_ms") or []
        if times:
            self.step_ms = sorted(times)[len(times) // 2]
        return msg

    def _step_timeout(self, steps: int) -> float:
        per = (self.step_ms or 1000.0) / 1000.0
        return 120.0 + 20.0 * per * steps

    def measure(self, steps: int, warmup: Optional[int] = None) -> tuple[list[float], Optional[float]]:
        """`steps` timed optimizer steps after `warmup` untimed ones (a child that waited for
        its turn wakes up first; default: steps enough for ~20 ms, 1 to 5): their times (ms)
        and the peak memory (MB)."""
        if warmup is None:
            warmup = max(1, min(5, math.ceil(WAKE_UP_MS / max(self.step_ms or WAKE_UP_MS, 1e-3))))
        self.send({"cmd": "measure", "steps": int(steps), "warmup": int(warmup)})
        msg = self.receive(self._step_timeout(steps + warmup), f"measuring {steps} step(s)")
        if msg.get("event") != "measured":
            self._fail("setup", f"unexpected message {msg.get('event')!r} instead of measured")
        times = [float(t) for t in msg["times_ms"]]
        if times:
            self.step_ms = sorted(times)[len(times) // 2]
        return times, msg.get("peak_memory_mb")

    def trace(self, run_dir: Path, worker: str, warmup: int, active: int, *, record_shapes: bool = True,
              profile_memory: bool = True, with_stack: bool = False) -> list[str]:
        """`warmup` + `active` steps under torch.profiler into run_dir; the trace files."""
        self.send({"cmd": "trace", "dir": str(run_dir), "worker": worker, "warmup": int(warmup),
                        "active": int(active), "record_shapes": record_shapes, "profile_memory": profile_memory,
                        "with_stack": with_stack})
        msg = self.receive(self._step_timeout(warmup + active) + 120.0, "tracing")
        if msg.get("event") != "traced":
            self._fail("setup", f"unexpected message {msg.get('event')!r} instead of traced")
        return list(msg.get("files") or [])
