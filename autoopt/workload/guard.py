"""The model file's code at any call, not only the first.

build_workload (autoopt.workload.build) checks the first call of every contract function;
after it, autoopt calls them again and again (each Session builds the model, the timed steps
run forward, backward and the optimizer, loaders are iterated). `UserCall` marks an exception
that escapes one of those calls with the file and the function it came from, and changes
nothing else: a configuration a transform broke is still a failed variant with its own
exception (autoopt.search catches it as today). Where no transform is to blame (profile, the
optimize baseline, anything that reaches the command line), `model_file_error` turns the mark
into the one-paragraph ModelFileError (exit 2) instead of "an internal error".
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from autoopt.errors import ModelFileError, UserError

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


def _marked(exc: BaseException) -> BaseException:
    e: Optional[BaseException] = exc
    while e is not None:
        if getattr(e, _MARK, None) is not None:
            return e
        e = e.__cause__
    return exc


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def model_file_error(exc: BaseException) -> Optional[ModelFileError]:
    """The ModelFileError for an exception the model file's code raised at any call (see the
    module docstring), or None when it did not come from the model file's code."""
    from autoopt.workload.load import _at, _exc_summary, _fail, display_path

    found = user_call_of(exc)
    if found is None:
        return None
    path, name = found
    origin = _marked(exc)
    what = CALLS.get(name, name)
    if isinstance(origin, UserExit):
        problem = f"{what} called {origin}{_at(origin, path)} while autoopt was running it"
        fix = f"return from {name.split(' ')[0]} instead of exiting; autoopt calls it many times in one process."
    elif _is_oom(origin):
        problem = f"{what} ran out of memory ({_exc_summary(origin)}){_at(origin, path)}"
        fix = "use a smaller --batch-size (or BATCH_SIZE in the file), or free what the code keeps between calls."
    else:
        problem = f"{what} raised {_exc_summary(origin)}{_at(origin, path)} while autoopt was running it"
        fix = ("the model file's functions must work on every call, not only the first: call them in a loop in a "
               "Python shell to reproduce (state kept between calls — counters, caches, iterators that run out — "
               "is the usual cause); --debug shows the traceback.")
    return _fail(display_path(path), name, problem, fix, origin)


__all__ = ["CALLS", "UserCall", "UserExit", "model_file_error", "user_call_of"]
