"""Errors that reach the user as one paragraph, and the exit codes (see autoopt.cli)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `autoopt` exits with."""

    OK = 0
    INTERNAL_ERROR = 1  # a bug in autoopt, not in the input
    BAD_INPUT = 2  # usage, model file, unreadable trace: one paragraph says what and how to fix it
    HANGUP = 129  # SIGHUP (the terminal closed): as Ctrl-C
    INTERRUPTED = 130  # Ctrl-C; what was measured so far is still written
    TERMINATED = 143  # SIGTERM (timeout, Slurm, Kubernetes, docker stop): as Ctrl-C

    @classmethod
    def of_signal(cls, signum: int) -> int:
        """128 + the signal, the shell's convention (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
        return 128 + int(signum)


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
    """Ctrl-C, SIGTERM or SIGHUP during a run (autoopt.procs): the report directory `out`
    holds a report.json with "interrupted": true that says what was measured and what was
    not (`measured` is False when the baseline was not). Exit 128 + the signal."""

    def __init__(self, out: str, signum: int = 2, *, measured: bool = True):
        super().__init__(out)
        self.out = out
        self.signum = int(signum)
        self.measured = measured

    @property
    def exit_code(self) -> int:
        return ExitCode.of_signal(self.signum)
