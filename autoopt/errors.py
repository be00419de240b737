"""Errors that reach the user as one paragraph, and the exit codes (see autoopt.cli)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `autoopt` exits with."""

    OK = 0
    INTERNAL_ERROR = 1  # a bug in autoopt, not in the input
    BAD_INPUT = 2  # usage, model file, unreadable trace: one paragraph says what and how to fix it
    INTERRUPTED = 130  # Ctrl-C; what was measured so far is still written


class UserError(Exception):
    """Bad input: a model file, a trace, a flag. The message is one paragraph that names the
    file, the problem and the fix; the CLI prints it and exits 2. `cause` keeps the original
    exception for --debug."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, cause: BaseException | None = None):
        super().__init__(message)
        self.message = " ".join(message.split())
        self.cause = cause

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ModelFileError(UserError):
    """The model file breaks the model-file contract (README, "The model file")."""


class TraceError(UserError):
    """A trace file cannot be read as a Kineto / torch.profiler trace."""


class Interrupted(Exception):
    """Ctrl-C during a run; what was measured so far is still written (exit 130)."""

    exit_code = ExitCode.INTERRUPTED
