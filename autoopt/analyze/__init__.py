"""Trace analysis: Kineto / torch.profiler traces -> the metrics the rules read.

Loading (autoopt.analyze.loader: a streaming, typed, columnar decode; its scanning is
autoopt.analyze.scan, its columns autoopt.analyze.table) is separate from the
analyses, one module each: steps, breakdown, gpu_metrics, kernels, operators, idle, sync,
memory, distributed, device. `analyze_paths` runs them all; `render_text` summarises the
result for a terminal. This package never imports torch; its modules load on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["analyze_paths", "analyze_trace", "split_runs", "load_trace", "expand_paths", "render_text", "METRIC_KEYS"]

_WHERE = {"analyze_paths": "core", "analyze_trace": "core", "split_runs": "core", "METRIC_KEYS": "core",
          "load_trace": "loader", "expand_paths": "loader", "render_text": "render"}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'autoopt.analyze' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"autoopt.analyze.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
