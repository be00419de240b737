"""Tracing with torch.profiler, apart from timing.

Each profiling session writes a gzip Kineto trace into its own run directory
(`<logdir>/<run>/<worker>.<ts>.pt.trace.json.gz`), the layout torch-tb-profiler and
Holistic Trace Analysis read; the plugin loads a run directory once, so a run directory
is never reused.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from autoopt.run.session import Session
from autoopt.settings import ProfileSettings


@dataclass
class TraceRun:
    run_dir: Path
    trace_files: list[Path]
    steps: int
    wall_s: float


def new_run_dir(logdir: Path, name: str) -> Path:
    """A fresh run directory under logdir: `name`, or `name-2`, `name-3`... if taken."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "run"
    logdir.mkdir(parents=True, exist_ok=True)
    d = logdir / safe
    i = 2
    while d.exists():
        d = logdir / f"{safe}-{i}"
        i += 1
    d.mkdir(parents=True)
    return d


def activities_for(device: str) -> list[ProfilerActivity]:
    acts = [ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


@contextlib.contextmanager
def _without_kineto_chatter():
    """Kineto writes `USDT: ... profiler_start/stop` lines to the process's stderr from C++ on
    every profiling session. Capture fd 2 while tracing and pass through everything else."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not ln.startswith("USDT:")]
            if rest:
                os.write(2, "".join(rest).encode())


def trace_session(
    session: Session,
    run_dir: Path,
    settings: Optional[ProfileSettings] = None,
    *,
    worker_name: Optional[str] = None,
) -> TraceRun:
    s = settings or ProfileSettings()
    run_dir.mkdir(parents=True, exist_ok=True)
    total = s.wait + s.warmup + s.active
    t0 = time.perf_counter()
    with _without_kineto_chatter(), profile(
        activities=activities_for(session.device),
        schedule=schedule(wait=s.wait, warmup=s.warmup, active=s.active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir), worker_name=worker_name, use_gzip=True),
        record_shapes=s.record_shapes,
        profile_memory=s.profile_memory,
        with_stack=s.with_stack,
    ) as prof:
        # No synchronisation inside the steps: a training loop does not synchronise either,
        # and a sync of autoopt's own would read as the user's host-device sync. The
        # profiler synchronises the device when it stops, so the last kernels are kept.
        for _ in range(total):
            session.step()
            prof.step()
    wall = time.perf_counter() - t0
    files = sorted(run_dir.glob("*.pt.trace.json.gz"))
    return TraceRun(run_dir=run_dir, trace_files=files, steps=s.active, wall_s=wall)

