"""The shape of the package stays as docs/architecture.md describes it.

- import-linter's contracts (pyproject.toml): the layers import one way, patch editing is a
  leaf, the trace analysis and the rules never import torch, and no module imports another in
  a cycle, imports inside functions included;
- ruff (pyproject.toml: pyflakes, pycodestyle, bugbear, import order, and limits on
  complexity, branches and statements);
- no function in autoopt/ over 100 lines, no module over 800.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autoopt"
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 800


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_ruff_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is missing: install the test extra (pip install -e '.[test]')")
    out = subprocess.run([ruff, "check", "--no-cache", "autoopt", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_long_functions_or_modules():
    long_functions, long_modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {text.count(chr(10))} lines")
        for fn in _functions(ast.parse(text)):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long_functions.append(f"{rel}:{fn.lineno} {fn.name}: {n} lines")
    assert not long_functions and not long_modules, long_functions + long_modules


def test_the_contracts_catch_a_cycle(tmp_path):
    """The cycle contract is not vacuous: a package whose two modules import each other (one
    of them inside a function) breaks it."""
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclic import a\n    return a\n")
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "cyclic"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "no cycles"\ntype = "acyclic_siblings"\nancestors = ["cyclic"]\n')
    sys.path.insert(0, str(tmp_path))
    try:
        assert lint_imports(config_filename=str(cfg), no_cache=True) == 1
    finally:
        sys.path.remove(str(tmp_path))
