"""Trace analysis: Kineto / torch.profiler traces -> the metrics the rules read.

Loading (autoopt.analyze.loader: a streaming, typed, columnar decode) is separate from the
analyses, one module each: steps, breakdown, gpu_metrics, kernels, operators, idle, sync,
memory, distributed, device. `analyze_paths` runs them all; `render_text` summarises the
result for a terminal. This package never imports torch.
"""
from autoopt.analyze.core import METRIC_KEYS, analyze_paths, analyze_trace
from autoopt.analyze.loader import expand_paths, load_trace
from autoopt.analyze.render import render_text

__all__ = ["analyze_paths", "analyze_trace", "load_trace", "expand_paths", "render_text", "METRIC_KEYS"]
