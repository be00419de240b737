"""Checking a patched model file before its patch is written: the patched source is saved
beside the original under a temporary name (so its sibling modules and the files it reads
next to itself are where they were; in a temporary folder with the original's folder on
sys.path when that folder is not writable), loaded with autoopt's model-file loader, its
contract functions compared with the original's, and its build_model() called once.

`check_patched(path, new_source, original)` returns None when the patched file keeps the
contract, else the reason (autoopt.transforms.patch then writes no patch and the report
says why). Compared: every contract function the original provides is still there, and
one the original takes from another module (`from lib import forward`) is still that
function — or autoopt's delegating def around it (`_autoopt_user_forward`), never a
replacement; the only function a patch may add is `forward` (the contract's default).

The check leaves no trace: the temporary file, its bytecode and the sibling modules it
imported are removed, and the process-wide torch settings a patched file sets at import
(threads, matmul precision, cuDNN flags) and the RNG state are put back.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from autoopt.errors import ModelFileError
from autoopt.types import ModelSpec
from autoopt.workload.load import OPTIONAL, REQUIRED, load_model_file, user_code

CONTRACT = REQUIRED + OPTIONAL


def _origin(obj: Any) -> tuple:
    """Where a contract function's code lives: (file, first line, qualified name)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    obj = inspect.unwrap(obj) if callable(obj) else obj
    code = getattr(obj, "__code__", None)
    if code is None:
        return (type(obj).__module__, type(obj).__qualname__, "")
    return (os.path.realpath(code.co_filename), code.co_firstlineno, getattr(obj, "__qualname__", ""))


def _defined_in(obj: Any, path: Path) -> bool:
    return _origin(obj)[0] == os.path.realpath(path)


def compare(original: ModelSpec, patched: ModelSpec, shown: str) -> Optional[str]:
    """Why the patched file's contract functions are not the original's (None when they are)."""
    for name in CONTRACT:
        o, n = getattr(original, name), getattr(patched, name)
        if o is None:
            if n is not None and name != "forward":
                return f"the patched file defines {name}(), which {shown} does not"
            continue
        if n is None:
            return f"the patched file has no {name}() any more"
        if _defined_in(o, original.path):
            if not _defined_in(n, patched.path):
                return f"{name}() of the patched file is no longer the one {shown} defines"
            continue
        kept = getattr(patched.module, f"_autoopt_user_{name}", None)
        if _origin(n) == _origin(o) or (kept is not None and _origin(kept) == _origin(o)):
            continue
        return (f"{shown} takes {name}() from {os.path.basename(str(_origin(o)[0]))}, and the patched file "
                f"replaces it with another function instead of calling it")
    return None


@contextlib.contextmanager
def _process_state() -> Iterator[None]:
    """Put back what importing and building the patched file may change in this process."""
    import torch

    saved = (torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, sys.dont_write_bytecode)
    sys.dont_write_bytecode = True  # no __pycache__ entry for the temporary file
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(saved[0])
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if torch.backends.cuda.matmul.allow_tf32 != saved[3]:
            torch.backends.cuda.matmul.allow_tf32 = saved[3]
        if torch.backends.cudnn.allow_tf32 != saved[4]:
            torch.backends.cudnn.allow_tf32 = saved[4]
        sys.dont_write_bytecode = saved[5]


@contextlib.contextmanager
def _copy_beside(path: Path, source: str) -> Iterator[Path]:
    """The patched source as a file beside `path` (or, when its folder is not writable, in a
    temporary folder with path's folder on sys.path); removed afterwards with the sibling
    modules its import brought in."""
    folder = path.parent
    tmpdir = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".autoopt-check-{path.stem}-", suffix=".py", dir=folder)
    except OSError:
        tmpdir = tempfile.mkdtemp(prefix="autoopt-check-")
        fd, name = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".py", dir=tmpdir)
    before = set(sys.modules)
    added = tmpdir is not None and str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))
        for mod in set(sys.modules) - before:
            f = getattr(sys.modules.get(mod), "__file__", None)
            if isinstance(f, str) and os.path.dirname(os.path.abspath(f)) == os.path.abspath(folder):
                sys.modules.pop(mod, None)


def check_patched(path, new_source: str, original: Optional[ModelSpec] = None,
                  shown: Optional[str] = None) -> Optional[str]:
    """None when the patched source loads as a model file, keeps the original's contract
    functions (compare) and builds its model; else the reason, one sentence."""
    path = Path(path)
    shown = shown or path.name
    with _process_state(), _copy_beside(path.resolve(), new_source) as copy:
        try:
            if original is None:
                original = load_model_file(path)
            patched = load_model_file(copy)
        except ModelFileError as e:
            return f"the patched file does not load: {e.message.replace(str(copy), shown).replace(copy.name, shown)}"
        problem = compare(original, patched, shown)
        if problem:
            return problem
        try:
            with user_code():
                model = patched.build_model()
            del model
        except Exception as e:  # noqa: BLE001 - any error of the patched file is the reason
            return f"build_model() of the patched file raised {type(e).__name__}: {e}"
    return None
