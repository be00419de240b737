"""Read Kineto / torch.profiler traces into columnar `Trace` objects.

Streaming, typed, columnar decode: the file is read in blocks (gzip decompressed on the
fly), the `traceEvents` array is cut into chunks at event boundaries, each chunk is
decoded with orjson and folded into typed column lists at once, then dropped. Peak
memory is the columns plus one chunk, not the whole decoded JSON, so gigabyte traces fit.

The scanning is autoopt.analyze.scan (event boundaries, the exact fallback scanner, the
document around the events); the columns and the finished Trace are autoopt.analyze.table.
This module is the public side: `load_trace` for one file, `expand_paths` for the files
and directories a user names.

Every schema era is accepted: the legacy autograd-profiler bare list, 2021 capitalised
categories, 2022+ snake_case, fractional-microsecond timestamps, ROCm and CPU-only traces.
Unreadable input raises autoopt.errors.TraceError with one paragraph naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from autoopt.analyze import trace as T
from autoopt.analyze.limits import Limits
from autoopt.analyze.scan import _FIX, BLOCK, PathLike, _err, scan_events
from autoopt.analyze.table import _Columns, _finish
from autoopt.errors import TraceError

FLUSH_ROWS = 1 << 18  # rows gathered in lists before they move into typed arrays


def load_trace(path: PathLike, block: int = BLOCK, limits: Optional[Limits] = None) -> T.Trace:
    """Decode one trace file (.json or .json.gz) into columns, within `limits` (default:
    Limits.default(), sized to this machine's memory)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _err(path, f"cannot be read ({e.strerror}).", "Check the path.") from e
    if size == 0:
        raise _err(path, "is empty (0 bytes).", "The profiler wrote nothing; re-run it and pass the trace it exports.")
    cols = _Columns(FLUSH_ROWS)
    meta = scan_events(path, cols, block, limits or Limits.default())
    return _check(_finish(cols, path, meta, size), path)


def _check(tr: T.Trace, path: Path) -> T.Trace:
    if tr.n == 0:
        if tr.events_total == 0:
            raise _err(path, "holds no trace events (traceEvents is empty).",
                       "The profiler recorded nothing: check that torch.profiler's schedule reaches an active step "
                       "(call prof.step() each iteration) and re-export.")
        raise _err(path, f"holds {tr.events_total} events but none is a timed span (ph 'X'): it is not a Kineto "
                         "operator/kernel trace.", _FIX)
    return tr


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
TRACE_SUFFIXES = (".json", ".json.gz")


def _is_trace_name(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith(TRACE_SUFFIXES) and not n.startswith(".")


def expand_paths(paths: list[PathLike]) -> list[Path]:
    """Files as given; directories give their trace files (recursively, e.g. a TensorBoard run dir)."""
    out: list[Path] = []
    if not paths:
        raise TraceError("No trace given. Pass one or more .json / .json.gz Kineto traces, or a directory of them.")
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_trace_name(q))
            profiler_named = [q for q in found if ".pt.trace.json" in q.name]
            if profiler_named:  # a TensorBoard run dir or a report dir: the profiler's files only
                found = profiler_named
            if not found:
                raise TraceError(f"{p}: the directory holds no .json or .json.gz trace files. Pass the directory "
                                 "torch.profiler wrote (tensorboard_trace_handler's dir_name) or the trace files.")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise TraceError(f"{p}: no such file or directory. Check the path of the trace.")
    seen = set()
    uniq = []
    for p in out:
        rp = os.path.realpath(p)
        if rp not in seen:
            seen.add(rp)
            uniq.append(p)
    return uniq
