"""Running the ONNX exporters: the TorchScript one (`torch.onnx.export(..., dynamo=False)`),
the torch.export-based one (`dynamo=True`), the "auto" fallback from the first to the
second, exporter chatter kept off stdout, and the error that names an operator neither
exporter can convert (with the model file's line that calls it, when known)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from autoopt.pipelines.export.errors import ExportError, _summary, operator_from_error


@contextlib.contextmanager
def _quiet(sink: io.StringIO):
    """Keep exporter chatter off the terminal: Python and C++ stdout/stderr go to `sink`,
    warnings and torch.onnx log records below ERROR are dropped."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(tmp.fileno(), fd)
                except OSError:
                    pass
            loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
            levels = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    warnings.simplefilter("ignore")
                    yield
            finally:
                for lg, lv in zip(loggers, levels):
                    lg.setLevel(lv)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)
            tmp.seek(0)
            sink.write(tmp.read().decode("utf-8", errors="replace"))


def _export_torchscript(wrapper, inputs, path: Path, input_names, output_names, axes, opset):
    import torch

    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    torch.onnx.export(
        wrapper,
        tuple(inputs),
        str(path),
        dynamo=False,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes={n: dict(a) for n, a in axes.items() if a},
        do_constant_folding=True,
        **kwargs,
    )


def _export_dynamo(wrapper, inputs, path: Path, input_names, output_names, axes, opset):
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            "the dynamo ONNX exporter needs onnxscript, which is not installed. Fix: `pip install onnxscript`.",
            cause=e,
        ) from e
    batch = torch.export.Dim("batch")
    specs = []
    for name in input_names:
        spec = {}
        for d, axis in axes.get(name, {}).items():
            spec[d] = batch if axis == "batch" else torch.export.Dim.DYNAMIC
        specs.append(spec or None)
    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    program = torch.onnx.export(
        wrapper,
        tuple(inputs),
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=(tuple(specs),),  # the wrapper's *inputs
        verbose=False,
        report=False,
        **kwargs,
    )
    program.save(str(path))


def _python_name(op: str) -> Optional[str]:
    """torch.X for an aten operator, when torch has that function (a hint, never a guess)."""
    import torch
    import torch.nn.functional as F

    ns, _, name = op.partition("::")
    if ns != "aten" or not name:
        return None
    base = name.lstrip("_")
    for prefix, mod, modname in (("linalg_", torch.linalg, "torch.linalg"), ("special_", torch.special,
                                                                               "torch.special"),
                                 ("fft_", torch.fft, "torch.fft")):
        if base.startswith(prefix) and hasattr(mod, base[len(prefix):]):
            return f"{modname}.{base[len(prefix):]}"
    if hasattr(F, base):
        return f"torch.nn.functional.{base}"
    if hasattr(torch, base):
        return f"torch.{base}"
    return None


def _op_location(op: str, log: str, model_path: Path) -> Optional[str]:
    """`file:line` of the call to op in the TorchScript exporter's IR dump, preferring the model file."""
    hits = []
    for line in log.splitlines():
        if f"= {op}(" in line:
            m = re.search(r"# (.+?):(\d+):\d+\s*$", line)
            if m:
                hits.append((m.group(1), int(m.group(2))))
    for f, ln in hits:
        with contextlib.suppress(OSError):
            if Path(f).resolve() == model_path.resolve():
                return f"{model_path.name}, line {ln}"
    return f"{hits[0][0]}, line {hits[0][1]}" if hits else None


def _unsupported_error(op: str, shown: str, where: Optional[str], tried: list[tuple[str, BaseException]],
                       cause: BaseException) -> ExportError:
    py = _python_name(op)
    what = f"the operator {op}" + (f" ({py})" if py else "")
    at = f", called at {where}," if where else ""
    # an exporter that could not run at all (the dynamo one without onnxscript) did not judge the operator
    missing = [name for name, e in tried if isinstance(e, ExportError)]
    names = [name for name, _ in tried if name not in missing] or [name for name, _ in tried]
    note = ""
    if "dynamo" in missing and "dynamo" not in names:
        note = " (the dynamo exporter, which may support it, could not run: `pip install onnxscript`)"
    who = (f"the {names[0]} ONNX exporter cannot" if len(names) == 1
           else f"neither the {' nor the '.join(names)} ONNX exporter can")
    return ExportError(
        f"{shown}: {who} convert {what}{at} to ONNX: it has no ONNX translation in this "
        f"torch/onnxscript version{note}. Fix: replace that call with operations ONNX supports, keep it outside the "
        f"module you export (pre- or post-processing), or register a translation for {op} "
        "(torch.onnx.export(..., custom_translation_table=...) with the dynamo exporter, "
        "torch.onnx.register_custom_op_symbolic with the TorchScript one); run with --debug for the exporter's "
        "full error.",
        cause=cause,
    )


def _run_exporters(exporter: str, wrapper, inputs, path: Path, input_names, output_names, axes, opset,
                   shown: str, model_path: Path) -> tuple[str, Optional[str]]:
    """Export with the chosen exporter(s); returns (exporter used, why the first one failed or None)."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    tried: list[tuple[str, BaseException]] = []
    logs: dict[str, str] = {}
    for name in order:
        sink = io.StringIO()
        try:
            with _quiet(sink):
                if name == "torchscript":
                    _export_torchscript(wrapper, inputs, path, input_names, output_names, axes, opset)
                else:
                    _export_dynamo(wrapper, inputs, path, input_names, output_names, axes, opset)
        except KeyboardInterrupt:
            raise
        except ExportError as e:  # e.g. onnxscript missing
            tried.append((name, e))
            logs[name] = sink.getvalue()
            continue
        except Exception as e:  # noqa: BLE001 - exporters raise many types
            tried.append((name, e))
            logs[name] = sink.getvalue()
            continue
        fallback = None
        if tried:
            prev_name, prev = tried[0]
            op = operator_from_error(prev)
            fallback = (f"the {prev_name} exporter failed"
                        + (f" on the operator {op}" if op else f" ({_summary(prev)})"))
        return name, fallback
    # every exporter failed
    for name, e in tried:
        op = operator_from_error(e)
        if op:
            where = _op_location(op, logs.get(name, ""), model_path) if name == "torchscript" else None
            raise _unsupported_error(op, shown, where, tried, e) from e
    details = "; ".join(f"{name} exporter: {_summary(e)}" for name, e in tried)
    last = tried[-1][1]
    if len(tried) == 1 and isinstance(last, ExportError):
        raise last
    raise ExportError(
        f"{shown}: the model could not be exported to ONNX ({details}). Fix: the exporters trace the model's "
        "forward with example inputs, so Python control flow on tensor values, data-dependent shapes and "
        "non-tensor outputs are the usual causes — make those parts tensor operations or move them out of the "
        "model; run with --debug for the full error.",
        cause=last,
    ) from last
