"""Shared fixtures. Tests run from the repository root; the real GPU traces live in
tests/data/traces/real/ (see its README.md for where each file came from)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "tests" / "data" / "traces" / "real"
EXAMPLES = ROOT / "examples"
MODELS = ROOT / "tests" / "models"

# Keep the suite's torch work on the 2 cores without oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    return TRACES


def run_cli(*argv: str):
    """Run autoopt's CLI in-process; returns (exit code, stdout, stderr) via capsys in callers."""
    from autoopt.cli import main

    return main(list(argv))


@pytest.fixture(autouse=True)
def _restore_torch_process_settings():
    """Process-wide torch settings a test changes (threads, matmul precision, cuDNN flags,
    default dtype) are put back after it, so no test sees another's."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    saved = (torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype())
    yield
    torch.set_num_threads(saved[0])
    torch.set_float32_matmul_precision(saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.backends.cudnn.allow_tf32 = saved[3]
    torch.backends.cuda.matmul.allow_tf32 = saved[4]
    torch.set_default_dtype(saved[5])
