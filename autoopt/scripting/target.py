"""The training script autoopt runs: its path, its arguments and the directory it runs in,
with the checks that fail fast (before torch is imported) on a path that is not a script."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from autoopt.errors import UserError


@dataclass
class ScriptTarget:
    """`python <shown> <args...>` started in `cwd`: `path` is the resolved script (its
    directory is sys.path[0] for the script, as Python sets it)."""

    path: Path
    args: list[str] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)
    shown: str = ""
    path0: Optional[Path] = None  # sys.path[0] when not the script's directory (a patched copy elsewhere)

    def __post_init__(self) -> None:
        if not self.shown:
            self.shown = str(self.path)

    @property
    def command(self) -> str:
        """The command line the user would type to run the script on its own."""
        return " ".join(["python", self.shown, *self.args])

    @property
    def sys_path0(self) -> str:
        return str(self.path0 or self.path.parent)


def check_script(script_path: str, command: str = "profile") -> Path:
    """The resolved path of a readable Python script, else a UserError saying what to fix."""
    p = Path(script_path).expanduser()
    if not p.exists():
        raise UserError(f"The script {script_path} does not exist. Fix: pass the path of your training script, e.g. "
                        f"autoopt {command} --script train.py -- --epochs 1.")
    if p.is_dir():
        raise UserError(f"{script_path} is a directory, not a script. Fix: pass the training script inside it, e.g. "
                        f"autoopt {command} --script {Path(script_path) / 'train.py'}.")
    try:
        src = p.read_bytes()
    except OSError as e:
        raise UserError(f"The script {script_path} cannot be read ({e.strerror}). Fix: check its permissions.",
                        cause=e) from e
    try:
        compile(src, str(p), "exec")
    except SyntaxError as e:
        raise UserError(f"The script {script_path} is not valid Python: line {e.lineno}: {e.msg}. Fix: correct it "
                        f"(python {script_path} fails the same way).", cause=e) from e
    except ValueError as e:  # null bytes: not a Python source file
        raise UserError(f"The script {script_path} is not a Python source file ({e}). Fix: pass the .py training "
                        "script.", cause=e) from e
    return p.resolve()


def script_target(script_path: str, args: list[str], cwd: Optional[str] = None,
                  command: str = "optimize") -> ScriptTarget:
    """A checked ScriptTarget for `python script_path ARGS` run from `cwd` (default: here)."""
    path = check_script(script_path, command)
    return ScriptTarget(path=path, args=[str(a) for a in args], cwd=Path(cwd or os.getcwd()).resolve(),
                        shown=str(script_path))
