"""Loading a model file and checking its contract: model file -> ModelSpec.

`load_model_file` imports the file and checks the contract in docs/contracts.md (which functions
exist and are callable, BATCH_SIZE); `check_batch` checks what make_batch returns.
Building the workload on a device is autoopt.workload.build; the facts it collects are
autoopt.workload.inspect.

Every way a model file can break becomes a ModelFileError: one paragraph naming the
file, the function, the problem and the fix, with the original exception as `cause`
(shown by --debug). Output the user's code prints goes to stderr, so `--json` stays clean.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

from autoopt.errors import ModelFileError
from autoopt.types import ModelSpec

DEFAULT_BATCH_SIZE = 32
REQUIRED = ("build_model", "make_batch")
OPTIONAL = ("forward", "build_optimizer", "build_dataloader", "evaluate")
# how each contract function is called, for signature checks and messages
CALL_FORMS = {
    "build_model": "build_model()",
    "make_batch": "make_batch(batch_size)",
    "forward": "forward(model, batch)",
    "build_optimizer": "build_optimizer(model)",
    "build_dataloader": "build_dataloader(batch_size)",
    "evaluate": "evaluate(model)",
}
_ARITY = {"build_model": 0, "make_batch": 1, "forward": 2, "build_optimizer": 1, "build_dataloader": 1, "evaluate": 1}

# import name -> PyPI distribution, where they differ
_PIP_NAMES = {
    "cv2": "opencv-python",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
    "bs4": "beautifulsoup4",
    "Crypto": "pycryptodome",
    "attr": "attrs",
    "google.protobuf": "protobuf",
    "timm": "timm",
}

_counter = itertools.count()


# ---------------------------------------------------------------------------- errors


def _fail(path: Path | str, where: str, problem: str, fix: str, cause: BaseException | None = None) -> ModelFileError:
    """A ModelFileError with the house format: file, function, problem, fix."""
    problem = problem.rstrip()
    if not problem.endswith((".", "?", "!")):
        problem += "."
    prefix = f"{path}: {where}: " if where else f"{path}: "
    err = ModelFileError(f"{prefix}{problem} Fix: {fix}", cause=cause)
    err.path = str(path)  # type: ignore[attr-defined]
    err.function = where  # type: ignore[attr-defined]
    return err


def display_path(path: Path | str) -> str:
    """The path as the user would write it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


def _exc_summary(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _user_line(exc: BaseException, path: Path) -> Optional[int]:
    """Line of the innermost traceback frame that is in the model file."""
    line = None
    target = str(path)
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == target:
            line = lineno
    return line


def _at(exc: BaseException, path: Path) -> str:
    line = _user_line(exc, path)
    return f" (at line {line} of {path.name})" if line else ""


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """Run the user's code with its prints sent to stderr, so stdout stays clean for --json."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------------------- loading


def _suggest_in_dir(d: Path) -> list[str]:
    found = []
    try:
        for p in sorted(d.glob("*.py")):
            try:
                if "def build_model" in p.read_text(errors="replace"):
                    found.append(str(p))
            except OSError:
                continue
    except OSError:
        pass
    return found[:3]


def _check_path(path: Path, shown: str) -> bytes:
    if not path.exists():
        hint = ""
        if path.suffix == "" and path.with_suffix(".py").is_file():
            hint = f" (did you mean {shown}.py?)"
        raise _fail(
            shown,
            "",
            f"no such file{hint}",
            "pass the path of a Python model file (see `autoopt optimize --help` and the model-file "
            "contract in docs/contracts.md); without MODEL, `autoopt optimize` runs the bundled example.",
        )
    if path.is_dir():
        cands = _suggest_in_dir(path)
        hint = f" It holds model files: {', '.join(cands)}." if cands else ""
        raise _fail(
            shown,
            "",
            f"is a directory, not a model file.{hint}",
            "pass one .py file that defines build_model() and make_batch(batch_size).",
        )
    if path.suffix != ".py":
        raise _fail(
            shown,
            "",
            f"is not a Python file (suffix {path.suffix or 'none'!r}); autoopt imports model files as Python modules",
            "pass a .py file that defines build_model() and make_batch(batch_size) "
            "(rename it to .py if it is Python source).",
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(shown, "", f"cannot be read ({_exc_summary(e)})", "check the file's permissions.", e) from e
    if b"\x00" in data:
        raise _fail(
            shown,
            "",
            "is not Python source: it holds binary data (NUL bytes)",
            "pass the .py source file of the model, not a checkpoint, archive or compiled file.",
        )
    return data


def _check_syntax(data: bytes, path: Path, shown: str) -> None:
    try:
        compile(data, str(path), "exec", dont_inherit=True)
    except SyntaxError as e:
        line = e.lineno or 0
        col = e.offset or 0
        text = (e.text or "").strip()
        where = f"line {line}, column {col}"
        snippet = f" near `{text[:80]}`" if text else ""
        kind = "an indentation error" if isinstance(e, IndentationError) else "a syntax error"
        raise _fail(
            shown,
            "",
            f"is not valid Python: {kind} at {where}{snippet}: {e.msg}",
            f"correct the code at line {line} (run `python {shown}` to see it).",
            e,
        ) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(
            shown,
            "",
            f"is not readable Python source ({_exc_summary(e)})",
            "save the file as UTF-8 Python source.",
            e,
        ) from e


def _pip_name(module: str) -> str:
    top = module.split(".")[0]
    return _PIP_NAMES.get(module, _PIP_NAMES.get(top, top.replace("_", "-")))


def _import_error(exc: ImportError, path: Path, shown: str) -> ModelFileError:
    at = _at(exc, path)
    name = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and name:
        sibling = (path.parent / (name.split(".")[0] + ".py")).exists() or (path.parent / name.split(".")[0]).is_dir()
        if sibling:
            fix = (
                f"the module {name!r} sits beside the model file but failed to import; run `python {shown}` "
                "to see why."
            )
        else:
            fix = (
                f"install it into the environment autoopt runs in (`pip install {_pip_name(name)}`), "
                "or remove the import if the model does not need it."
            )
        return _fail(shown, "import", f"importing the file failed: no module named {name!r}{at}", fix, exc)
    return _fail(
        shown,
        "import",
        f"importing the file failed: {_exc_summary(exc)}{at}",
        "check the import at that line: the installed package may be a different version than the code "
        "expects (`pip show` it), or the name is misspelt.",
        exc,
    )


def load_model_file(path: str | os.PathLike) -> ModelSpec:
    """Import a model file and check the contract (docs/contracts.md, "The model file")."""
    shown = str(path)
    p = Path(path).expanduser()
    data = _check_path(p, shown)
    p = p.resolve()
    _check_syntax(data, p, shown)
    _not_a_training_script(data, shown)
    module = _import_file(p, shown)
    funcs = _contract_functions(module, shown)
    bs = _batch_size_setting(module, shown)
    return ModelSpec(
        path=p,
        name=p.stem,
        module=module,
        build_model=funcs["build_model"],
        make_batch=funcs["make_batch"],
        forward=funcs.get("forward"),
        build_optimizer=funcs.get("build_optimizer"),
        build_dataloader=funcs.get("build_dataloader"),
        default_batch_size=bs,
        evaluate=funcs.get("evaluate"),
    )


_SCRIPT_SIGNS = (re.compile(rb"""__name__\s*==\s*['"]__main__['"]"""), re.compile(rb"\bargparse\b"),
                 re.compile(rb"\.backward\s*\("), re.compile(rb"\.step\s*\(\s*\)"))


def _not_a_training_script(data: bytes, shown: str) -> None:
    """A training script (a main block, argparse, a loop calling backward / step) that names no
    build_model is refused before it is imported (importing a script without a main guard would
    run its training): it gets a pointer to `autoopt profile --script`."""
    if b"build_model" in data:
        return
    signs = sum(1 for pattern in _SCRIPT_SIGNS if pattern.search(data))
    if signs < 2:
        return
    raise _fail(
        shown, "",
        "looks like a training script (a main block, argparse, backward() and step() calls), not a model file: "
        "it defines no build_model()",
        f"profile the script as it is with `autoopt profile --script {shown} -- ARGS` (its own arguments after "
        "--), or write a model file with build_model() and make_batch(batch_size) (docs/contracts.md, \"The model "
        "file\") to optimize it.")


def _modules_from(folder: str) -> list[str]:
    """Names in sys.modules of modules whose file lies directly in `folder`."""
    out = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.dirname(os.path.abspath(f)) == folder:
            out.append(name)
    return out


def _import_file(p: Path, shown: str):
    """Execute the file as a fresh module (its directory first on sys.path meanwhile). The
    sibling modules it imports for the first time are dropped from sys.modules afterwards, so
    a second load re-reads them (constants they read from the environment at import) and a
    later model file of another folder never gets them for its own same-named modules."""
    stem = re.sub(r"\W", "_", p.stem) or "model"
    modname = f"_autoopt_model_{stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(modname, p)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always get a loader
        raise _fail(shown, "import", "Python cannot create an import spec for it", "pass a regular .py file.")
    module = importlib.util.module_from_spec(spec)
    parent = str(p.parent)
    folder = os.path.abspath(parent)
    before = set(_modules_from(folder))
    added_path = parent not in sys.path
    if added_path:
        sys.path.insert(0, parent)
    sys.modules[modname] = module
    try:
        with user_code():
            spec.loader.exec_module(module)
    except SyntaxError as e:  # a sibling module with a syntax error
        raise _fail(
            shown,
            "import",
            f"a module it imports is not valid Python: {e.filename}, line {e.lineno}: {e.msg}",
            f"correct {e.filename} at line {e.lineno}.",
            e,
        ) from e
    except ImportError as e:
        raise _import_error(e, p, shown) from e
    except SystemExit as e:
        raise _fail(
            shown,
            "import",
            f"the file calls sys.exit({e.code!r}) while being imported{_at(e, p)}; autoopt imports model files, "
            "so script code runs and exits",
            "move script code (argument parsing, training loops, sys.exit) under "
            "`if __name__ == \"__main__\":` so importing the file only defines functions.",
            e,
        ) from e
    except Exception as e:  # noqa: BLE001 - any error the user's top-level code raises
        raise _fail(
            shown,
            "import",
            f"the file raised {_exc_summary(e)} while being imported{_at(e, p)}",
            "importing must only define things: move work that needs files, network or arguments into "
            "build_model() / make_batch(), or under `if __name__ == \"__main__\":`.",
            e,
        ) from e
    finally:
        sys.modules.pop(modname, None)
        for name in set(_modules_from(folder)) - before:
            sys.modules.pop(name, None)
        if added_path:
            with contextlib.suppress(ValueError):
                sys.path.remove(parent)
    return module


def _contract_functions(module, shown: str) -> dict[str, Any]:
    """The contract functions the module defines, each checked; a missing required one is an error."""
    funcs: dict[str, Any] = {}
    defined = [n for n in vars(module) if not n.startswith("_")]
    for name in REQUIRED + OPTIONAL:
        obj = getattr(module, name, None)
        if obj is None:
            if name in REQUIRED:
                close = difflib.get_close_matches(name, defined, n=1, cutoff=0.7)
                hint = f" (it defines {close[0]!r}: a typo?)" if close else ""
                raise _fail(
                    shown,
                    name,
                    f"the required function {name}() is missing{hint}",
                    f"define `def {CALL_FORMS[name]}:` at the top level of the file "
                    + (
                        "returning a torch.nn.Module."
                        if name == "build_model"
                        else "returning a batch of CPU tensors with batch_size samples."
                    ),
                )
            continue
        _check_callable(obj, name, shown)
        funcs[name] = obj
    return funcs


def _batch_size_setting(module, shown: str) -> Optional[int]:
    """The file's BATCH_SIZE, when it sets one (a positive integer)."""
    bs = getattr(module, "BATCH_SIZE", None)
    if bs is not None:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise _fail(
                shown,
                "BATCH_SIZE",
                f"BATCH_SIZE = {bs!r} is not a positive integer",
                "set BATCH_SIZE to a whole number of samples, e.g. `BATCH_SIZE = 32`, or remove it "
                f"(the default is {DEFAULT_BATCH_SIZE}).",
            )
    return bs


def _check_callable(obj: Any, name: str, shown: str) -> None:
    form = CALL_FORMS[name]
    try:
        import torch

        is_module = isinstance(obj, torch.nn.Module)
    except ImportError:  # pragma: no cover - torch is a dependency
        is_module = False
    if is_module:
        raise _fail(
            shown,
            name,
            f"{name} is a module instance ({type(obj).__name__}), not a function",
            f"wrap it: `def {form}: return {type(obj).__name__}(...)` so autoopt can build a fresh model per variant."
            if name == "build_model"
            else f"define `def {form}:` as a function.",
        )
    if not callable(obj):
        raise _fail(
            shown,
            name,
            f"{name} is a {type(obj).__name__}, not a function",
            f"define it as a function: `def {form}: ...`.",
        )
    if inspect.isclass(obj):
        raise _fail(
            shown,
            name,
            f"{name} is a class ({obj.__name__}), not a function",
            f"define `def {form}:` as a function that returns what the contract asks for.",
        )
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*([None] * _ARITY[name]))
    except TypeError as e:
        raise _fail(
            shown,
            name,
            f"{name}{sig} cannot be called as {form} ({e})",
            f"give it the signature `def {form}:` (extra parameters need default values).",
            e,
        ) from e


# ---------------------------------------------------------------------------- batches


def _describe(obj: Any) -> str:
    import torch

    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(v) for v in list(obj)[:4])
        more = ", ..." if len(obj) > 4 else ""
        return f"{type(obj).__name__}({inner}{more})" if isinstance(obj, tuple) else f"[{inner}{more}]"
    if isinstance(obj, dict):
        inner = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(obj.items())[:4])
        return "{" + inner + (", ..." if len(obj) > 4 else "") + "}"
    return type(obj).__name__


_ALLOWED_SCALARS = (int, float, bool, str, type(None))


def _bad_leaves(obj: Any, path: str = "batch") -> Iterator[tuple[str, Any]]:
    """Leaves of a batch that are neither tensors nor plain scalars (extra keyword args)."""
    import torch

    if isinstance(obj, torch.Tensor) or isinstance(obj, _ALLOWED_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _bad_leaves(v, f"{path}[{k!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _bad_leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


_METRICS_FIX = ("evaluate(model) must return a dict of metric names to numbers, e.g. "
                "`return {\"accuracy\": correct / total}` (higher is better unless the name says loss); "
                "compute them under the model's own forward on a held-out set it builds itself.")


def check_metrics(result: Any, shown: str) -> dict[str, float]:
    """What evaluate(model) returned, as {name: float}: a non-empty dict of string keys to real
    numbers (Python numbers or one-element tensors). Anything else is a ModelFileError."""
    import torch

    if not isinstance(result, dict) or not result:
        what = "an empty dict" if isinstance(result, dict) else _describe(result)
        raise _fail(shown, "evaluate", f"evaluate(model) returned {what}, not a dict of metrics", _METRICS_FIX)
    out: dict[str, float] = {}
    for k, v in result.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex:
            v = v.detach().cpu().item()
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(shown, "evaluate", f"evaluate(model) returned {{{k!r}: {_describe(v)}}}: a metric must be a "
                        "number under a string name", _METRICS_FIX)
        out[k] = float(v)
    return out


def check_batch(batch: Any, batch_size: int, shown: str, where: str) -> None:
    """A batch is tensors (a tensor, a tuple/list or dict of them, nested) on the CPU, with
    a batch dimension of batch_size."""
    import torch

    from autoopt.workload.contract import iter_tensors

    fix_shape = (
        f"{where} must return CPU tensors — a tensor, a tuple/list or a dict of tensors — holding "
        "batch_size samples along the first dimension, e.g. `return torch.randn(batch_size, 3, 32, 32), "
        "torch.randint(0, 10, (batch_size,))`."
    )
    if batch is None:
        raise _fail(shown, where, f"{where} returned None", fix_shape)
    if inspect.isgenerator(batch) or (hasattr(batch, "__next__") and not isinstance(batch, torch.Tensor)):
        raise _fail(
            shown,
            where,
            f"{where} returned an iterator ({type(batch).__name__}), not a batch",
            fix_shape + " Use build_dataloader(batch_size) to supply a stream of batches.",
        )
    bad = list(_bad_leaves(batch))
    if bad:
        p, leaf = bad[0]
        kind = type(leaf).__module__ + "." + type(leaf).__name__
        if type(leaf).__module__ == "numpy":
            fix = "convert it with torch.from_numpy(array) (or torch.as_tensor) before returning. " + fix_shape
        elif isinstance(leaf, torch.utils.data.Dataset):
            fix = "return the tensors of one batch; a Dataset or DataLoader belongs in build_dataloader(batch_size)."
        else:
            fix = fix_shape
        raise _fail(shown, where, f"{where} returned {_describe(batch)}; {p} is a {kind}, not a tensor", fix)
    tensors = list(iter_tensors(batch))
    if not tensors:
        raise _fail(shown, where, f"{where} returned {_describe(batch)}, which holds no tensor", fix_shape)
    off = [t for t in tensors if t.device.type != "cpu"]
    if off:
        raise _fail(
            shown,
            where,
            f"{where} returned a tensor on {off[0].device}; batches must be CPU tensors (autoopt moves them "
            "to the device, and pins or changes their layout when a transform asks)",
            f"create the tensors on the CPU in {where} (drop .to(device) / .cuda() / device=...).",
        )
    leading = [int(t.shape[0]) for t in tensors if t.dim() > 0]
    if batch_size in leading:
        return
    if any(batch_size in t.shape for t in tensors):  # sequence-first layouts, e.g. (T, B, F)
        return
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:6])
    raise _fail(
        shown,
        where,
        f"{where} was asked for {batch_size} samples but returned tensors of shapes {shapes}: none has a "
        f"dimension of {batch_size}, so autoopt cannot change or count the batch size",
        "build batch_size samples (use the argument, e.g. torch.randn(batch_size, ...)) instead of a fixed size.",
    )


def _shape_signature(batch: Any) -> list[tuple]:
    from autoopt.workload.contract import iter_tensors

    return [(tuple(t.shape), str(t.dtype)) for t in iter_tensors(batch)]


# ---------------------------------------------------------------------------- later calls


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def model_file_error(exc: BaseException) -> Optional[ModelFileError]:
    """The ModelFileError for an exception the model file's code raised at any call, marked by
    autoopt.workload.guard.UserCall (here, or in an exception it was raised from); None when it
    did not come from the model file's code."""
    from autoopt.workload.guard import CALLS, UserExit, marked, user_call_of

    found = user_call_of(exc)
    if found is None:
        return None
    path, name = found
    origin = marked(exc)
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


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "check_batch",
    "check_metrics",
    "display_path",
    "load_model_file",
    "model_file_error",
    "user_code",
]
