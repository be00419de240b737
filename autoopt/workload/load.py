"""Loading a model file and binding it to a device: model file -> ModelSpec -> Workload.

`load_model_file` imports the file and checks the contract in DESIGN.md (which functions
exist and are callable, BATCH_SIZE). `build_workload` calls the functions once on the
device — build_model, make_batch, the first forward (and in train mode the loss, backward,
build_optimizer and a step), build_dataloader — and fills the model.* / workload.* facts.

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
from typing import Any, Callable, Iterator, Optional

from autoopt.errors import ModelFileError, UserError
from autoopt.types import Capabilities, ModelSpec, Workload

DEFAULT_BATCH_SIZE = 32
REQUIRED = ("build_model", "make_batch")
OPTIONAL = ("forward", "build_optimizer", "build_dataloader")
# how each contract function is called, for signature checks and messages
CALL_FORMS = {
    "build_model": "build_model()",
    "make_batch": "make_batch(batch_size)",
    "forward": "forward(model, batch)",
    "build_optimizer": "build_optimizer(model)",
    "build_dataloader": "build_dataloader(batch_size)",
}
_ARITY = {"build_model": 0, "make_batch": 1, "forward": 2, "build_optimizer": 1, "build_dataloader": 1}

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
            "pass the path of a Python model file (see `autoopt optimize --help` and DESIGN's model-file "
            "contract); without MODEL, `autoopt optimize` runs the bundled example.",
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
    """Import a model file and check the contract (DESIGN.md, "The model file")."""
    shown = str(path)
    p = Path(path).expanduser()
    data = _check_path(p, shown)
    p = p.resolve()
    _check_syntax(data, p, shown)

    stem = re.sub(r"\W", "_", p.stem) or "model"
    modname = f"_autoopt_model_{stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(modname, p)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always get a loader
        raise _fail(shown, "import", "Python cannot create an import spec for it", "pass a regular .py file.")
    module = importlib.util.module_from_spec(spec)
    parent = str(p.parent)
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
        if added_path:
            with contextlib.suppress(ValueError):
                sys.path.remove(parent)

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
    )


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


# ---------------------------------------------------------------------------- first forward


class _ModuleTracker:
    """Tracks the innermost running module during a forward (forward pre-hooks push, forward
    hooks pop), so an exception can be pinned to the layer that raised it. Also records
    which modules call scaled_dot_product_attention and whether autocast is active."""

    def __init__(self, model):
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[tuple[Any, list[tuple[int, ...]]]] = []
        self.failed: Optional[tuple[Any, list[tuple[int, ...]]]] = None
        self.sdpa_callers: set[int] = set()
        self.autocast_seen = False
        self.handles = []
        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, module, args):
        import torch

        from autoopt.workload.contract import iter_tensors

        shapes = [tuple(t.shape) for t in iter_tensors(args)]
        self.stack.append((module, shapes))
        if not self.autocast_seen:
            for dev in ("cpu", "cuda"):
                try:
                    if torch.is_autocast_enabled(dev):
                        self.autocast_seen = True
                except (TypeError, RuntimeError):
                    if dev == "cuda" and torch.is_autocast_enabled():
                        self.autocast_seen = True

    def _post(self, module, args, output):
        # always_call: also runs when the module raised. Keep the innermost failing entry;
        # a module that completes afterwards means that failure was caught by the model.
        exc = sys.exc_info()[1]
        entry = None
        while self.stack:
            entry = self.stack.pop()
            if entry[0] is module:
                break
        if exc is None:
            self.failed = None
        elif self.failed is None:
            self.failed = entry

    def innermost(self):
        if self.failed is not None:
            return self.failed
        return self.stack[-1] if self.stack else None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _sdpa_mode(tracker: _ModuleTracker):
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention and tracker.stack:
                tracker.sdpa_callers.add(id(tracker.stack[-1][0]))
            return func(*args, **(kwargs or {}))

    return _Count()


def _layer_problem(module, name: str, shapes: list[tuple[int, ...]]) -> Optional[tuple[str, str]]:
    """(what is wrong, how to fix it) for a shape mismatch in common layers, or None."""
    import torch.nn as nn

    x = shapes[0] if shapes else None
    if not x:
        return None
    before = "or change the layers before it (or the input shape make_batch builds) so they produce"
    if isinstance(module, nn.Linear) and x[-1] != module.in_features:
        return (
            f"it expects {module.in_features} input features but gets {x[-1]} (input shape {x})",
            f"build {name} as nn.Linear({x[-1]}, {module.out_features}), {before} {module.in_features} features.",
        )
    if isinstance(module, nn.modules.conv._ConvNd) and len(x) >= 2:
        cdim = 1 if len(x) == module.weight.dim() else 0
        if x[cdim] != module.in_channels:
            return (
                f"it expects {module.in_channels} input channels but gets {x[cdim]} (input shape {x})",
                f"build {name} with in_channels={x[cdim]}, {before} {module.in_channels} channels.",
            )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(x) >= 2 and x[1] != module.num_features:
        return (
            f"it expects {module.num_features} channels but gets {x[1]} (input shape {x})",
            f"build {name} with num_features={x[1]}, {before} {module.num_features} channels.",
        )
    if isinstance(module, nn.LayerNorm):
        ns = tuple(module.normalized_shape)
        if tuple(x[-len(ns):]) != ns:
            return (
                f"it normalizes over {ns} but its input has shape {x}",
                f"build {name} as nn.LayerNorm({x[-1]}), {before} a last dimension of {ns[-1]}.",
            )
    if isinstance(module, nn.RNNBase) and x[-1] != module.input_size:
        return (
            f"it expects input_size {module.input_size} but gets {x[-1]} (input shape {x})",
            f"build {name} with input_size={x[-1]}, {before} {module.input_size} features.",
        )
    if isinstance(module, nn.Embedding):
        return (
            f"it has {module.num_embeddings} rows and its input (shape {x}) holds an index out of range or a non-integer",
            f"make make_batch build integer indices below {module.num_embeddings}, or enlarge {name}.",
        )
    return None


def _forward_name(spec: ModelSpec, batch: Any) -> str:
    if spec.forward is not None:
        return "forward"
    if isinstance(batch, dict):
        return "forward (default: model(**batch))"
    if isinstance(batch, (tuple, list)):
        return "forward (default: model(*batch))"
    return "forward (default: model(batch))"


def _forward_error(exc: BaseException, spec: ModelSpec, tracker: _ModuleTracker, batch, shown: str) -> ModelFileError:
    import torch

    where = _forward_name(spec, batch)
    inner = tracker.innermost()
    at = _at(exc, spec.path)
    from autoopt.workload.contract import shapes_of

    in_shapes = ", ".join(str(s) for _, s in shapes_of(batch)[:6])
    if isinstance(exc, torch.OutOfMemoryError):
        return _fail(
            shown,
            where,
            f"the first forward ran out of device memory at batch size {batch_len_safe(batch)}",
            "use a smaller --batch-size (or BATCH_SIZE in the file).",
            exc,
        )
    if inner is not None:
        module, shapes = inner
        name = tracker.names.get(module) or "(the model)"
        layer = f"`{name}` ({_module_repr(module)})"
        shape_s = ", ".join(str(s) for s in shapes) or "none"
        known = _layer_problem(module, name, shapes)
        if known:
            why, fix = known
            problem = (
                f"the first forward failed in layer {layer}: {why}{at}. Batch shapes: {in_shapes}. "
                f"Error: {_exc_summary(exc)}"
            )
        else:
            fix = (
                f"check layer {name}: the input it gets ({shape_s}) must match what it was built for; "
                "adjust it in build_model(), or the layers before it, or the batch make_batch returns."
            )
            problem = (
                f"the first forward failed in layer {layer} with input shapes {shape_s}{at}: {_exc_summary(exc)}. "
                f"Batch shapes: {in_shapes}"
            )
        return _fail(shown, where, problem, fix, exc)
    return _fail(
        shown,
        where,
        f"the first forward raised {_exc_summary(exc)}{at}, outside any layer. Batch: {_describe(batch)}",
        (
            "forward(model, batch) must unpack the batch make_batch returns and call the model on it."
            if spec.forward is not None
            else "the model's forward must accept the batch as make_batch returns it (a dict as keyword "
            "arguments, a tuple/list as positional arguments), or define forward(model, batch)."
        ),
        exc,
    )


def _module_repr(module) -> str:
    r = repr(module)
    if "\n" in r:
        return type(module).__name__
    return r if len(r) <= 120 else type(module).__name__


def batch_len_safe(batch) -> Optional[int]:
    from autoopt.workload.contract import batch_len

    try:
        return batch_len(batch)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------- facts


def _repeated_block_count(model) -> int:
    """Longest run of identical children (same type and parameter shapes) in any
    ModuleList / Sequential; only children with parameters count."""
    import torch.nn as nn

    best = 0
    for m in model.modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        run, prev = 0, None
        for child in m.children():
            params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in child.named_parameters())
            if not params:
                run, prev = 0, None
                continue
            sig = (type(child).__qualname__, params)
            run = run + 1 if sig == prev else 1
            prev = sig
            best = max(best, run)
    return best


def _param_dtype(model) -> Optional[str]:
    counts: dict[str, int] = {}
    for p in model.parameters():
        k = str(p.dtype).replace("torch.", "")
        counts[k] = counts.get(k, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def optimizer_impl(opt) -> str:
    """What optimizer.step() runs: 'fused', 'foreach' or 'for-loop' (torch's own defaults
    for the device the parameters are on when the optimizer leaves it open)."""
    import torch

    groups = opt.param_groups
    if any(g.get("fused") for g in groups):
        return "fused"
    if any(g.get("foreach") is True for g in groups):
        return "foreach"
    if "foreach" not in opt.defaults or all(g.get("foreach") is False for g in groups):
        return "for-loop"
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # pragma: no cover - very old torch
        return "for-loop"
    params = [p for g in groups for p in g["params"]]
    differentiable = any(g.get("differentiable", False) for g in groups)
    _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    # Adam-family: torch does not flip on foreach for a tensor lr without capturable
    if foreach and any(isinstance(g.get("lr"), torch.Tensor) and not g.get("capturable", False) for g in groups):
        if type(opt).__name__ in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam"):
            foreach = False
    return "foreach" if foreach else "for-loop"


_AUTOCAST_RE = re.compile(r"autocast\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def source_uses_autocast(fn) -> bool:
    """The function's source enters torch.autocast (not `enabled=False`)."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    src = "\n".join(line.split("#", 1)[0] for line in src.splitlines())
    for m in _AUTOCAST_RE.finditer(src):
        if re.search(r"enabled\s*=\s*False", m.group(1)):
            continue
        return True
    return False


def _is_compiled(model, spec: ModelSpec) -> bool:
    import torch

    # only a process that imported torch._dynamo can hold a compiled module; importing it
    # here would cost seconds
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    OptimizedModule = getattr(dynamo, "OptimizedModule", None)
    if OptimizedModule is not None and any(isinstance(m, OptimizedModule) for m in model.modules()):
        return True
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return True
    if spec.forward is not None and hasattr(spec.forward, "_torchdynamo_orig_callable"):
        return True
    return isinstance(model, torch.jit.ScriptModule)


def _strict_channels_last(t) -> bool:
    import torch

    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def model_facts(model) -> dict[str, Any]:
    """model.* facts of a built module (attention_count without SDPA users; see build_workload)."""
    import torch.nn as nn

    conv = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return {
        "model.param_count": sum(p.numel() for p in model.parameters()),
        "model.conv_count": len(conv),
        "model.conv2d_count": sum(1 for m in conv if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))),
        "model.linear_count": sum(1 for m in model.modules() if isinstance(m, nn.Linear)),
        "model.rnn_count": sum(1 for m in model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))),
        "model.attention_count": sum(1 for m in model.modules() if isinstance(m, nn.MultiheadAttention)),
        "model.param_dtype": _param_dtype(model),
        "model.repeated_block_count": _repeated_block_count(model),
        "model.is_data_parallel": isinstance(model, nn.DataParallel),
    }


# ---------------------------------------------------------------------------- workload


def _call(shown: str, spec: ModelSpec, name: str, fn: Callable, *args):
    """Call one of the user's functions; any exception becomes a ModelFileError naming it."""
    try:
        with user_code():
            return fn(*args)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise _fail(
            shown,
            name,
            f"{CALL_FORMS.get(name, name)} called sys.exit({e.code!r}){_at(e, spec.path)}",
            f"return a value from {name} instead of exiting.",
            e,
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise _fail(
            shown,
            name,
            f"{CALL_FORMS.get(name, name)} raised {_exc_summary(e)}{_at(e, spec.path)}",
            f"make {CALL_FORMS.get(name, name)} run on its own (try it in a Python shell after importing the file); "
            "autoopt calls it exactly as DESIGN's model-file contract says.",
            e,
        ) from e


def _resolve_batch_size(spec: ModelSpec, batch_size: Optional[int]) -> int:
    bs = batch_size if batch_size is not None else (spec.default_batch_size or DEFAULT_BATCH_SIZE)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise UserError(f"--batch-size {bs!r} is not a positive integer. Fix: pass a whole number such as --batch-size 32.")
    return bs


def build_workload(
    spec: ModelSpec, caps: Capabilities, *, batch_size: Optional[int] = None, seed: int = 0
) -> Workload:
    """Call the model file's functions once on the device and check every result; returns a
    Workload with the model.* and workload.* facts. The model built here is discarded."""
    import torch
    import torch.nn as nn

    from autoopt.workload.contract import call_forward, extract_loss, has_4d_float_input, to_device

    shown = display_path(spec.path)
    bs = _resolve_batch_size(spec, batch_size)
    device = caps.device_type
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "the capabilities describe a CUDA device, but torch sees none. Fix: detect capabilities with "
            "autoopt.env.detect_capabilities() on this machine, or use --device cpu."
        )

    # --- build_model
    torch.manual_seed(seed)
    model = _call(shown, spec, "build_model", spec.build_model)
    if not isinstance(model, nn.Module):
        if inspect.isclass(model) and issubclass(model, nn.Module):
            problem = f"build_model() returned the class {model.__name__}, not an instance"
            fix = f"return an instance: `return {model.__name__}()`."
        elif isinstance(model, (tuple, list)) and any(isinstance(m, nn.Module) for m in model):
            problem = f"build_model() returned a {type(model).__name__} ({', '.join(type(m).__name__ for m in model)}), not one torch.nn.Module"
            fix = "return only the model; create the optimizer in build_optimizer(model) and the data in make_batch(batch_size)."
        else:
            problem = f"build_model() returned {_describe(model)}, not a torch.nn.Module"
            fix = "return the model instance, e.g. `return Net()` (the function must end with a return statement)."
        raise _fail(shown, "build_model", problem, fix)

    # --- make_batch (twice, under different seeds, for static shapes)
    torch.manual_seed(seed)
    batch = _call(shown, spec, "make_batch", spec.make_batch, bs)
    check_batch(batch, bs, shown, "make_batch")
    torch.manual_seed(seed + 1)
    batch2 = _call(shown, spec, "make_batch", spec.make_batch, bs)
    check_batch(batch2, bs, shown, "make_batch")
    static = _shape_signature(batch) == _shape_signature(batch2)

    compiled = _is_compiled(model, spec)
    facts: dict[str, Any] = model_facts(model)
    facts["workload.channels_last"] = any(
        _strict_channels_last(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)
    ) or any(_strict_channels_last(t) for t in _tensors(batch))

    # validate on the eager module: a compiled model would compile here (minutes on a CPU)
    run_model, restore = _eager_view(model)
    run_model.to(device)
    mode = spec.mode

    optimizer = None
    if mode == "train":
        run_model.train()
        optimizer = _call(shown, spec, "build_optimizer", spec.build_optimizer, run_model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise _fail(
                shown,
                "build_optimizer",
                f"build_optimizer(model) returned {_describe(optimizer)}, not a torch.optim.Optimizer",
                "return an optimizer over the model's parameters, e.g. "
                "`return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)`.",
            )
    else:
        run_model.eval()

    dev_batch = to_device(batch, device)
    tracker = _ModuleTracker(run_model)
    try:
        grad = torch.enable_grad() if mode == "train" else torch.no_grad()
        with grad, _sdpa_mode(tracker):
            try:
                with user_code():
                    out = call_forward(spec, run_model, dev_batch)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                raise _forward_error(e, spec, tracker, batch, shown) from e
    finally:
        tracker.remove()

    autocast = tracker.autocast_seen
    if spec.forward is not None:
        autocast = autocast or source_uses_autocast(spec.forward)
    autocast = autocast or source_uses_autocast(type(run_model).forward)

    sdpa_modules = {
        id(m) for m in run_model.modules() if id(m) in tracker.sdpa_callers and not isinstance(m, nn.MultiheadAttention)
    }
    facts["model.attention_count"] += len(sdpa_modules)

    if mode == "train":
        where = _forward_name(spec, batch)
        loss = extract_loss(out)
        fix_loss = (
            "in train mode forward must return the loss: define `def forward(model, batch): x, y = batch; "
            "return torch.nn.functional.cross_entropy(model(x), y)` (a scalar, e.g. reduced with .mean())."
        )
        if loss is None:
            raise _fail(shown, where, f"forward returned {_describe(out)}, which holds no loss tensor", fix_loss)
        if loss.numel() != 1:
            raise _fail(
                shown,
                where,
                f"the training loss is not a scalar: forward returned a tensor of shape {tuple(loss.shape)}"
                + (" (it looks like the model's outputs, not a loss)" if loss.dim() >= 2 else ""),
                fix_loss,
            )
        if not loss.is_floating_point():
            raise _fail(shown, where, f"the training loss has dtype {loss.dtype}, not a floating-point type", fix_loss)
        if not loss.requires_grad:
            raise _fail(
                shown,
                where,
                "the training loss does not require grad (computed under torch.no_grad(), detached, "
                "or from .item()), so backward cannot train the model",
                "return the loss tensor itself from forward, without .item(), .detach() or torch.no_grad().",
            )
        try:
            with user_code():
                loss.backward()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            raise _fail(
                shown,
                where,
                f"loss.backward() failed: {_exc_summary(e)}",
                "make sure the loss is computed from the model's outputs with differentiable operations "
                "(no in-place edits of tensors autograd needs).",
                e,
            ) from e
        try:
            with user_code():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            raise _fail(
                shown,
                "build_optimizer",
                f"optimizer.step() failed: {_exc_summary(e)}",
                "build the optimizer over model.parameters() of the model it is given.",
                e,
            ) from e

    # --- build_dataloader
    dl_facts = {"workers": None, "pin": False, "persistent": False}
    if spec.build_dataloader is not None:
        torch.manual_seed(seed)
        loader = _call(shown, spec, "build_dataloader", spec.build_dataloader, bs)
        dl_facts, dl_static = _check_dataloader(loader, bs, shown, spec)
        static = static and dl_static

    facts.update(
        {
            "workload.mode": mode,
            "workload.batch_size": bs,
            "workload.has_dataloader": spec.build_dataloader is not None,
            "workload.dataloader_workers": dl_facts["workers"],
            "workload.pin_memory": dl_facts["pin"],
            "workload.persistent_workers": dl_facts["persistent"],
            "workload.input_is_4d": has_4d_float_input(batch),
            "workload.static_shapes": static,
            "workload.optimizer": type(optimizer).__name__ if optimizer is not None else "",
            "workload.optimizer_impl": optimizer_impl(optimizer) if optimizer is not None else None,
            "workload.autocast": bool(autocast),
            "workload.compiled": compiled,
            "workload.cpu_count": _cpu_count(),
        }
    )
    restore()
    del model, run_model, optimizer, out, dev_batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return Workload(spec=spec, caps=caps, batch_size=bs, seed=seed, facts=facts)


def _tensors(batch):
    from autoopt.workload.contract import iter_tensors

    return list(iter_tensors(batch))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _eager_view(model):
    """The eager module behind a compiled one, and a function that undoes any change."""
    orig = getattr(model, "_orig_mod", None)
    if orig is not None:
        return orig, lambda: None
    saved = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None

    def restore():
        for m, impl in saved:
            m._compiled_call_impl = impl

    return model, restore


def _check_dataloader(loader, bs: int, shown: str, spec: ModelSpec):
    import torch

    where = "build_dataloader"
    fix = (
        "return an iterable of batches, e.g. `return torch.utils.data.DataLoader(dataset, batch_size=batch_size, "
        "shuffle=True)`, whose batches look like make_batch's."
    )
    if loader is None:
        raise _fail(shown, where, "build_dataloader(batch_size) returned None", fix)
    if isinstance(loader, torch.utils.data.Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        raise _fail(
            shown,
            where,
            f"build_dataloader(batch_size) returned a Dataset ({type(loader).__name__}), which yields single "
            "samples, not batches",
            "wrap it: `return torch.utils.data.DataLoader(dataset, batch_size=batch_size)`.",
        )
    if isinstance(loader, torch.Tensor) or not hasattr(loader, "__iter__"):
        raise _fail(shown, where, f"build_dataloader(batch_size) returned {_describe(loader)}, which is not iterable", fix)
    workers = pin = persistent = None
    if isinstance(loader, torch.utils.data.DataLoader):
        workers = int(loader.num_workers)
        pin = bool(loader.pin_memory)
        persistent = bool(loader.persistent_workers)
    it = None
    try:
        with user_code():
            it = iter(loader)
            first = next(it, None)
            second = next(it, None)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(shown, where, f"iterating the data loader raised {_exc_summary(e)}{_at(e, spec.path)}", fix, e) from e
    finally:
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it
    if first is None:
        raise _fail(
            shown,
            where,
            "the data loader yielded no batch",
            "give the dataset at least batch_size samples (with drop_last=True it needs a full batch).",
        )
    check_batch(first, bs, shown, "build_dataloader")
    static = second is None or _shape_signature(first) == _shape_signature(second)
    return {"workers": workers, "pin": bool(pin), "persistent": bool(persistent)}, static


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "build_workload",
    "check_batch",
    "load_model_file",
    "model_facts",
    "optimizer_impl",
    "source_uses_autocast",
    "user_code",
]
