"""Standard output that belongs to one JSON document.

With `--json`, stdout must hold the JSON and nothing else, whatever the model file's code,
a C extension or a child process writes. `json_stdout()` runs the command with file
descriptor 1 pointing at stderr (os.dup2, so C code, subprocesses and data-loader workers
started meanwhile inherit it) and sys.stdout swapped for sys.stderr; `write_json` writes to
the original stdout, kept aside on a duplicate descriptor. Everything is put back on every
way out of the block (return, error, Ctrl-C).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator, Optional, TextIO

_REAL: list[TextIO] = []  # the original stdout while json_stdout() is active (innermost last)


def _flush_all(*more) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, *more):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf in an extension)
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _on_fd1(stream) -> bool:
    try:
        return stream is not None and stream.fileno() == 1
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


def _dup_stdout() -> Optional[int]:
    try:
        return os.dup(1)
    except OSError:
        return None


@contextlib.contextmanager
def json_stdout(active: bool = True) -> Iterator[None]:
    """Inside: fd 1 and sys.stdout lead to stderr; write_json() reaches the real stdout (a
    stream on a duplicate of fd 1; or the sys.stdout object of before when it is not fd 1's,
    as under a test's capture)."""
    saved = _dup_stdout() if active else None
    if saved is None:  # not asked, or no file descriptor 1 to keep aside (stdout closed)
        yield
        return
    _flush_all()
    old_stdout = sys.stdout
    real = open(saved, "w", encoding="utf-8", closefd=False) if _on_fd1(old_stdout) else old_stdout  # noqa: SIM115
    try:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _REAL.append(real)
        yield
    finally:
        _flush_all(old_stdout)  # what was written meanwhile through a kept reference still goes to stderr
        if real in _REAL:
            _REAL.remove(real)
        sys.stdout = old_stdout
        with contextlib.suppress(Exception):
            real.flush()
        os.dup2(saved, 1)
        if real is not old_stdout:
            real.close()
        os.close(saved)


def json_stream() -> TextIO:
    """Where the JSON goes: the real stdout inside json_stdout(), else sys.stdout."""
    return _REAL[-1] if _REAL else sys.stdout


def write_json(text: str, stream: Optional[TextIO] = None) -> None:
    out = stream or json_stream()
    out.write(text)
    out.flush()


__all__ = ["json_stdout", "json_stream", "write_json"]
