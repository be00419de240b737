"""Which source files are the user's own code: not Python's standard library, not an installed
package (torch's own folder included, wherever it was installed from), not autoopt itself.

Decided by directory, never by a name inside the path: a user's project may sit in a folder
named `autoopt` (a clone of this repository is) or `torch`, and its frames are still the user's.
Nothing here imports torch.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import site
import sysconfig


@functools.lru_cache(maxsize=1)
def _lib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(getattr(site, "getsitepackages", lambda: [])())
    dirs.add(getattr(site, "getusersitepackages", lambda: None)())
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # autoopt itself
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        dirs.update(spec.submodule_search_locations)
    return tuple(sorted(os.path.join(os.path.realpath(d), "") for d in dirs if d))


@functools.lru_cache(maxsize=8192)
def is_user_file(filename: str) -> bool:
    """True for a file of the user's code (a frame's co_filename or a traceback's filename)."""
    if not filename or filename.startswith("<"):
        return False
    f = os.path.realpath(filename)
    return not f.startswith(_lib_dirs()) and not any(m in f for m in ("site-packages", "dist-packages"))
