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


def _torch_settings(torch) -> dict:
    """The process-wide torch state a test (or autoopt) could change and forget."""
    return {
        "num_threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly_detection": torch.is_anomaly_enabled(),
    }


def _put_back(torch, s: dict) -> None:
    torch.set_num_threads(s["num_threads"])
    torch.set_float32_matmul_precision(s["matmul_precision"])
    if torch.backends.cuda.matmul.allow_tf32 != s["cuda_matmul_allow_tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = s["cuda_matmul_allow_tf32"]
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]
    if torch.backends.cudnn.allow_tf32 != s["cudnn_allow_tf32"]:
        torch.backends.cudnn.allow_tf32 = s["cudnn_allow_tf32"]
    torch.set_default_dtype(s["default_dtype"])
    torch.set_grad_enabled(s["grad_enabled"])
    torch.use_deterministic_algorithms(s["deterministic"])
    torch.autograd.set_detect_anomaly(s["anomaly_detection"])


@pytest.fixture(autouse=True)
def _no_leaked_torch_settings(request):
    """A test that leaves a process-wide torch setting changed (threads, matmul precision,
    cuDNN flags, default dtype, grad mode, autocast, determinism, anomaly detection) fails,
    and the setting is put back so the tests after it run as they would alone."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = _torch_settings(torch)
    yield
    after = _torch_settings(torch)
    if after != before:
        _put_back(torch, before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"{request.node.nodeid} left process-wide torch settings changed (before, after): {changed}")
