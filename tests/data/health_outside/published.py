"""Test helper written for autoopt (not part of any vendored package): runs the published definitions
of a vendored source file without the rest of it. Some of the files beside the adapters import
packages at their top that the tests neither need nor install (torchvision's own submodules, PIL,
pandas, matplotlib): `definitions` executes, from each file and verbatim, its imports of the standard
library and torch, and the top-level classes, functions and assignments named, in file order, all in
one fresh module (so the names of one file are visible to the next)."""
from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

_IMPORTABLE = {"torch"} | set(sys.stdlib_module_names)


def _roots(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.ImportFrom):
        return {"."} if node.level else {(node.module or "").split(".")[0]}
    return {alias.name.split(".")[0] for alias in node.names}


def _kept(node: ast.stmt, names: set[str]) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return _roots(node) <= _IMPORTABLE
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
        return node.name in names
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) and t.id in names for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id in names
    return False


def definitions(module_name: str, sources: list[tuple[Path, set[str]]]) -> types.ModuleType:
    """A module holding, from each (file, names) in order, the file's torch and standard-library
    imports and its top-level definitions of those names, as the file writes them."""
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module  # a file may refer to itself through sys.modules[__name__]
    for path, names in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = {getattr(n, "name", None) for n in tree.body} | {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)} | {
            n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        missing = names - found
        if missing:
            raise LookupError(f"{path} defines no {sorted(missing)} at its top level")
        body = [node for node in tree.body if _kept(node, names)]
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)
    return module
