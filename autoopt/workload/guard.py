"""The model file's code at any call, not only the first.

build_workload (autoopt.workload.build) checks the first call of every contract function;
after it, autoopt calls them again and again (each Session builds the model, the timed steps
run forward, backward and the optimizer, loaders are iterated). `UserCall` marks an exception
that escapes one of those calls with the file and the function it came from, and changes
nothing else: a configuration a transform broke is still a failed variant with its own
exception (autoopt.search catches it as today). Where no transform is to blame (profile, the
optimize baseline, anything that reaches the command line), `model_file_error` turns the mark
into the one-paragraph ModelFileError (exit 2) instead of "an internal error"
(autoopt.workload.load.model_file_error).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from autoopt.errors import UserError

_MARK = "_autoopt_user_call"

# what autoopt calls, as the message names it
CALLS = {
    "build_model": "build_model()",
    "make_batch": "make_batch(batch_size)",
    "forward": "forward(model, batch)",
    "forward (default: model(**batch))": "the model's forward (called as model(**batch))",
    "forward (default: model(*batch))": "the model's forward (called as model(*batch))",
    "forward (default: model(batch))": "the model's forward (called as model(batch))",
    "backward": "loss.backward() (through the model's backward, its autograd functions and hooks)",
    "build_optimizer": "the optimizer from build_optimizer(model), in optimizer.step()",
    "build_dataloader": "iterating the data loader from build_dataloader(batch_size)",
    "evaluate": "evaluate(model)",
}


class UserExit(Exception):
    """The model file's code called sys.exit() (or raised SystemExit) after its first call."""


class UserCall:
    """`with UserCall(path, name):` around a call into the model file's code. An exception
    leaving it is marked with (path, name) — the innermost call wins — and re-raised as it
    is; SystemExit becomes UserExit, so one sys.exit() in a variant cannot end autoopt."""

    __slots__ = ("path", "name")

    def __init__(self, path, name: str):
        self.path = path
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception) and not isinstance(exc, SystemExit):
            return False  # KeyboardInterrupt and autoopt's own BaseExceptions pass untouched
        if isinstance(exc, UserError):
            return False  # already one paragraph
        if isinstance(exc, SystemExit):
            new = UserExit(f"sys.exit({exc.code!r})")
            new.__traceback__ = tb
            _mark(new, self.path, self.name)
            raise new from exc
        _mark(exc, self.path, self.name)
        return False


def _mark(exc: BaseException, path, name: str) -> None:
    if getattr(exc, _MARK, None) is None:
        try:
            setattr(exc, _MARK, (Path(path), name))
        except (AttributeError, TypeError):  # an exception type that takes no attributes
            pass


def user_call_of(exc: BaseException) -> Optional[tuple[Path, str]]:
    """(model file, function) when exc, or an exception it was raised from, left the model
    file's code; None for anything else."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        mark = getattr(e, _MARK, None)
        if mark is not None:
            return mark
        e = e.__cause__
    return None


def marked(exc: BaseException) -> BaseException:
    """The exception in exc's __cause__ chain that carries the mark (exc itself without one)."""
    e: Optional[BaseException] = exc
    while e is not None:
        if getattr(e, _MARK, None) is not None:
            return e
        e = e.__cause__
    return exc


__all__ = ["CALLS", "UserCall", "UserExit", "marked", "user_call_of"]
