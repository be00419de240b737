"""ONNX export: `autoopt export MODEL --onnx PATH [--plan plan.json] [--seed N] [--batch-size N]`.

    from autoopt.pipelines.export import export_onnx
    result = export_onnx("examples/resnet_infer.py", "resnet.onnx", plan_path=None, seed=0)
    result["max_abs_error"], result["input_names"], result["dynamic_axes"]

What it does, in order:

1. Loads the model file and validates it with autoopt.workload.load (the same one-paragraph
   errors as every other command), then builds the model on the CPU with
   `torch.manual_seed(seed)` before `build_model()` and before `make_batch()`, in eval
   mode, with the plan's inference-relevant transforms (below).
2. Finds what the model is called with. The exported graph is the model's own forward,
   `model(...)`, never the file's `forward(model, batch)`: a training file's forward
   returns a loss, which needs the labels and is no use when serving. autoopt runs the
   file's forward (or the default call, model(batch) / model(*batch) / model(**batch))
   with a forward pre-hook on the model and records the arguments of the first call,
   which stops the forward there; so gpt.py exports `model(tokens[:, :-1])` and
   simplenet.py `model(images)` (without the labels). A file whose forward never calls
   the model gets a UserError.
3. Exports a small wrapper that takes the model's tensor arguments as flat inputs and
   returns every tensor of its output as flat outputs. Inputs are named after the keyword
   (dict key) they are passed as, positional ones `input_0`, `input_1`, ...; outputs
   `output_0`, `output_1`, .... Integer and bool inputs (token ids, masks) keep their
   dtype. The batch axis is dynamic: the call is recorded twice, on the export batch and
   on a fresh batch of another size (`make_batch` under seed + 1, batch size + 3), and
   the dimensions that change between the two are the dynamic axes ("batch" where they
   follow the batch size, `<input>_dim<d>` otherwise), for outputs too.
4. Exporter: `exporter="auto"` (what the CLI uses) runs the TorchScript exporter
   (`torch.onnx.export(..., dynamo=False)`) first and the torch.export-based one
   (`dynamo=True`, needs onnxscript) when it fails. Measured on the examples here (torch
   2.13, CPU), both give the same graphs to 1e-6, but the TorchScript exporter takes 2-6 s
   where the dynamo one takes 15-110 s; the dynamo exporter handles newer operators the
   TorchScript one lacks (e.g. aten::rms_norm), hence the fallback. `"torchscript"` and
   `"dynamo"` force one. Tracing uses at least 2 samples, since a batch of 1 lets both
   exporters specialise the batch axis to 1.
5. Saves the model: inline when its weights (initializers) take at most
   `external_data_threshold_bytes` (default 2 GiB, protobuf's limit), else with the
   tensors in `<name>.onnx.data` beside it (`onnx.save_model(save_as_external_data=True)`).
6. Checks it: `onnx.checker.check_model(path, full_check=True)` (with shape inference),
   then runs onnxruntime (CPUExecutionProvider) on the fresh batch of the other size and
   compares with PyTorch's output on the same inputs: max abs error and max relative error
   (max |ort - torch| / max |torch| per output, the same definition as autoopt.run.verify).
   A graph that fails at the other size, returns other shapes, or differs by more than
   the tolerance (1e-3 relative in fp32, 1e-2 with fp16 weights) raises ExportError: the
   file is written but wrong (typically the batch size was baked in by a Python int taken
   from a tensor's shape).

Plan transforms (`--plan`), decided per transform; the result lists each under
`plan_transforms_applied` (with how) or `plan_transforms_ignored` (with the reason):

- `inference_mode`: applied: the export runs in eval mode without autograd, and an ONNX
  graph is inference-only. `weights_dtype="float16"`: applied, weights, buffers and the
  floating-point inputs are cast to float16 (onnxruntime's CPU provider runs the graph;
  the comparison is against PyTorch in float16). `weights_dtype="bfloat16"`: ignored, the
  model is exported in fp32: the standard ONNX Conv, Gemm and LSTM operators admit no
  bfloat16 tensors (the full check fails) and onnxruntime's CPU provider has no bfloat16
  kernels; convert at deployment with the runtime's own precision options.
- `batch_size`: the plan's batch size becomes the export batch when `batch_size` is not
  given (the ONNX batch axis stays dynamic either way).
- `amp`: ignored: autocast is PyTorch's run-time mixed-precision policy; the graph keeps
  the weights' dtype and ONNX runtimes pick reduced precision with their own tools.
- `channels_last`: ignored: memory layout only; ONNX tensors have no memory format and
  runtimes choose their own layouts.
- `compile`, `cuda_graphs`, `tf32`, `cudnn_benchmark`: ignored: how PyTorch executes the
  same graph (compilation, graph replay, math mode, algorithm search), not the graph.
- `fused_optimizer`, `grad_accumulation`, `activation_checkpointing`, `dataloader`,
  `ddp_*`: ignored: training or input pipeline; the exported forward is unchanged.

Errors are UserError subclasses (exit 2 in the CLI): an operator the exporters cannot
convert is named (parsed from the exporters' errors, with the line of the model file
that calls it when the TorchScript exporter shows it); a missing onnx / onnxruntime /
onnxscript says what to install. Exporter chatter (the TorchScript IR dump on failure,
deprecation warnings, progress lines) is kept off stdout, so `--json` stays clean.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from autoopt.errors import UserError

EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3  # protobuf cannot serialise a message over 2 GiB
EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024  # tensors smaller than this stay inline in external-data files
TOLERANCE = {None: 1e-3, "float16": 1e-2}  # relative, per output (see module docs)
EXPORTERS = ("auto", "torchscript", "dynamo")
CHECK_BATCH_OFFSET = 3


class ExportError(UserError):
    """The model cannot be exported to ONNX, or the exported graph disagrees with PyTorch."""


# ---------------------------------------------------------------------------- plan transforms

_IGNORED_REASONS = {
    "amp": "autocast is PyTorch's run-time mixed-precision policy, not part of the graph; the graph keeps the "
    "weights' dtype and ONNX runtimes choose reduced precision with their own tools (e.g. onnxruntime's float16 "
    "converter, TensorRT's fp16/bf16 flags)",
    "channels_last": "memory layout only: ONNX tensors have no memory format and runtimes choose their own "
    "layouts, so the graph is the same",
    "compile": "torch.compile changes how PyTorch executes the graph, not the graph; the exporter traces the "
    "eager module and the ONNX runtime optimises the graph itself",
    "cuda_graphs": "CUDA graph replay is a PyTorch run-time mechanism; ONNX runtimes have their own "
    "(e.g. onnxruntime's enable_cuda_graph)",
    "tf32": "a process-wide PyTorch math mode on Ampere+ GPUs; ONNX runtimes set their own (e.g. TensorRT's TF32 "
    "flag)",
    "cudnn_benchmark": "cuDNN algorithm search at run time; it does not change the graph",
    "fused_optimizer": "training only: the optimizer is not part of the inference graph",
    "grad_accumulation": "training only: gradient accumulation does not change the forward",
    "activation_checkpointing": "training only: checkpointing recomputes activations in backward; the forward "
    "graph is the same",
    "dataloader": "input pipeline: the data loader is outside the model graph",
}


def _classify_plan(plan, batch_size_given: bool) -> tuple[list[dict], list[dict], Optional[str], Optional[int]]:
    """(applied, ignored, weights dtype to cast to, batch size from the plan)."""
    applied: list[dict] = []
    ignored: list[dict] = []
    weights_dtype: Optional[str] = None
    plan_bs: Optional[int] = None
    for item in plan.transforms:
        name = item["name"]
        params = dict(item.get("params") or {})
        if name == "inference_mode":
            wd = params.get("weights_dtype")
            wd = str(wd).replace("torch.", "") if wd else None
            how = ("exported in eval mode without autograd (torch.no_grad); an ONNX graph is inference-only, "
                   "so there is no autograd state to drop")
            if wd == "float16":
                weights_dtype = "float16"
                how += "; weights, buffers and floating-point inputs cast to float16"
            elif wd:
                ignored.append({
                    "name": name,
                    "params": {"weights_dtype": wd},
                    "reason": f"{wd} weights are not exported: the standard ONNX Conv, Gemm and LSTM operators "
                    f"admit no {wd} tensors (onnx.checker's full check fails) and onnxruntime's CPU provider has "
                    f"no {wd} kernels; the graph is exported in float32 — convert it at deployment with the "
                    "runtime's own precision options",
                })
                how += f"; weights kept in float32 ({wd} not exportable, see plan_transforms_ignored)"
            applied.append({"name": name, "params": params, "how": how})
        elif name == "batch_size":
            if batch_size_given:
                ignored.append({"name": name, "params": params,
                                "reason": "an explicit batch size was given; the ONNX batch axis is dynamic anyway"})
            else:
                plan_bs = int(plan.batch_size)
                applied.append({"name": name, "params": params,
                                "how": f"batch of {plan_bs} used for tracing; the ONNX batch axis stays dynamic"})
        elif name in _IGNORED_REASONS:
            ignored.append({"name": name, "params": params, "reason": _IGNORED_REASONS[name]})
        elif name.startswith("ddp"):
            ignored.append({"name": name, "params": params,
                            "reason": "distributed training (DistributedDataParallel settings); not part of the "
                            "inference graph"})
        else:
            ignored.append({"name": name, "params": params,
                            "reason": "not an inference transform the exporter knows; the model's forward is "
                            "exported unchanged"})
    return applied, ignored, weights_dtype, plan_bs


# ---------------------------------------------------------------------------- inputs and outputs


class _Slot:
    """Where the i-th flat input goes in the recorded call."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Captured(BaseException):
    """Raised by the forward pre-hook once the model's arguments are recorded. A
    BaseException, so `except Exception` in the user's forward does not swallow it."""


def _flatten(obj, tensors: list, names: list, name: str):
    """A template of obj with every tensor replaced by a _Slot; tensors and their names
    appended to the lists."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        names.append(name)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _flatten(v, tensors, names, f"{name}_{k}" if name else str(k)) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_flatten(v, tensors, names, f"{name}_{i}") for i, v in enumerate(obj)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_flatten(v, tensors, names, f"{name}_{i}") for i, v in enumerate(obj))
    return obj


def _fill(template, inputs):
    if isinstance(template, _Slot):
        return inputs[template.index]
    if isinstance(template, dict):
        return {k: _fill(v, inputs) for k, v in template.items()}
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_fill(v, inputs) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(v, inputs) for v in template)
    return template


def _flat_call(args: tuple, kwargs: dict):
    """(template, tensors, names) for a recorded call model(*args, **kwargs): positional
    tensors are input_0, input_1, ...; keyword ones are named after the keyword."""
    tensors: list = []
    names: list[str] = []
    pos_template = []
    for a in args:
        start = len(tensors)
        pos_template.append(_flatten(a, tensors, names, ""))
        for j in range(start, len(tensors)):
            names[j] = f"input_{j}"
    kw_template = {k: _flatten(v, tensors, names, str(k)) for k, v in kwargs.items()}
    # unique, non-empty names
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        n = n or "input"
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        unique.append(n)
    return (tuple(pos_template), kw_template), tensors, unique


def _make_wrapper(model, template):
    import torch

    from autoopt.workload.contract import iter_tensors

    class ExportWrapper(torch.nn.Module):
        """The model's forward over flat tensor inputs, returning its output tensors flat."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            args, kwargs = _fill(template, inputs)
            out = self.model(*args, **kwargs)
            return tuple(iter_tensors(out))

    return ExportWrapper().eval()


def _record_call(spec, model, batch, shown: str) -> tuple[tuple, dict]:
    """The (args, kwargs) of the first model(...) call the file's forward makes."""
    import torch

    from autoopt.workload.contract import call_forward
    from autoopt.workload.load import user_code

    if spec.forward is None:
        if isinstance(batch, dict):
            return (), dict(batch)
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
        return (batch,), {}
    seen: list = []

    def hook(module, args, kwargs):
        seen.append((tuple(args), dict(kwargs)))
        raise _Captured()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), user_code():
            call_forward(spec, model, batch)
    except _Captured:
        pass
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise ExportError(
            f"{shown}: forward(model, batch) raised {type(e).__name__}: {_short(e)} before calling the model, "
            "while autoopt recorded the model's arguments for export (the model is in eval mode, without "
            "autograd). Fix: make forward call model(...) on the batch's inputs first, as in training.",
            cause=e,
        ) from e
    finally:
        handle.remove()
    if not seen:
        raise ExportError(
            f"{shown}: forward(model, batch) never calls model(...), so autoopt cannot tell which inputs the "
            "exported graph takes (it exports the model's own forward, recorded from the first model(...) call). "
            "Fix: call the model itself in forward, e.g. `return loss_fn(model(x), y)`, rather than a method or "
            "submodule of it."
        )
    return seen[0]


def _varying_axes(name: str, a, b, bs_a: int, bs_b: int) -> dict[int, str]:
    axes: dict[int, str] = {}
    if a.dim() != b.dim():
        return axes
    for d, (x, y) in enumerate(zip(a.shape, b.shape)):
        if x != y:
            axes[d] = "batch" if (x, y) == (bs_a, bs_b) else f"{name}_dim{d}"
    return axes


# ---------------------------------------------------------------------------- exporting


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


_OP_PATTERNS = (
    re.compile(r"Exporting the operator '([^']+)' to ONNX"),  # TorchScript exporter
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo: no translation
    re.compile(r"call_function\[target=torch\.ops\.([\w.]+?)\.(?:default|[A-Za-z_]\w*)\]"),  # dynamo: node failed
    re.compile(r"Could not find an implementation for (\w+)\(\d+\) node"),  # onnxruntime: no kernel
)


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def operator_from_error(exc: BaseException) -> Optional[str]:
    """The operator an exporter (or onnxruntime) error names, as `aten::name`, or None."""
    texts = [str(e) for e in _chain(exc)]
    for pattern in _OP_PATTERNS:
        for text in texts:
            m = pattern.search(text)
            if m:
                op = m.group(1)
                if "::" not in op and "." in op:  # aten._linalg_svd -> aten::_linalg_svd
                    ns, _, rest = op.partition(".")
                    op = f"{ns}::{rest}"
                return op
    return None


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


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(exc: BaseException) -> str:
    """The innermost meaningful message of an exporter error."""
    chain = _chain(exc)
    for e in reversed(chain):
        if str(e).strip():
            return f"{type(e).__name__}: {_short(e)}"
    return type(exc).__name__


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


# ---------------------------------------------------------------------------- saving and checking


def _tensor_nbytes(t) -> int:
    import onnx
    from onnx import helper

    if t.data_location == onnx.TensorProto.EXTERNAL:
        for e in t.external_data:
            if e.key == "length":
                return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= int(d)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001 - unknown / string types
        itemsize = 1
    return n * itemsize


def _weights_nbytes(model) -> int:
    total = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    for node in model.graph.node:  # large Constant nodes hold weights too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.HasField("t"):
                    total += _tensor_nbytes(attr.t)
    return total


def _save(tmp_path: Path, dest: Path, threshold: int) -> tuple[bool, Optional[Path], int]:
    """Save the exported model at dest, inline or with external data; (external, data path, weights bytes)."""
    import onnx

    model = onnx.load(str(tmp_path), load_external_data=True)
    nbytes = _weights_nbytes(model)
    if nbytes > threshold:
        data = dest.with_name(dest.name + ".data")
        if data.exists():
            data.unlink()  # onnx appends to an existing data file
        onnx.save_model(
            model,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=EXTERNAL_DATA_MIN_TENSOR_BYTES,
            convert_attribute=True,
        )
        with contextlib.suppress(OSError):  # onnx creates the data file 0600; give it the model file's mode
            os.chmod(data, dest.stat().st_mode & 0o777)
        return True, data, nbytes
    onnx.save_model(model, str(dest))
    return False, None, nbytes


def _to_numpy(t):
    return t.detach().cpu().contiguous().numpy()


def _compare(ort_out, ref) -> tuple[float, float]:
    import numpy as np
    import torch

    a = np.asarray(ort_out).astype(np.float64)
    b = ref.detach().cpu().to(dtype=torch.float64).numpy()
    if a.size == 0:
        return 0.0, 0.0
    finite = np.isfinite(b)
    if not np.array_equal(np.isfinite(a), finite):
        return math.inf, math.inf
    if not finite.all():  # same non-finite positions: compare the finite ones, and infinities exactly
        same_inf = np.array_equal(a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)])
        if not same_inf:
            return math.inf, math.inf
        a, b = a[finite], b[finite]
        if a.size == 0:
            return 0.0, 0.0
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return diff, rel


def _sig(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


# ---------------------------------------------------------------------------- the command


def _require(module: str, pip: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(
            f"`autoopt export` needs {module}, which is not installed in this environment. Fix: `pip install {pip}` "
            "(or `pip install autoopt[test]`).",
            cause=e,
        ) from e


def _eager(model):
    """The eager module behind a torch.compile'd one (the exporters trace eager code)."""
    inner = getattr(model, "_orig_mod", None)
    if inner is not None:
        return inner
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return model


def export_onnx(
    model_path,
    onnx_path,
    *,
    plan_path=None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    exporter: str = "auto",
    opset: Optional[int] = None,
    check_batch_size: Optional[int] = None,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> dict[str, Any]:
    """Export the model file's model to ONNX with a dynamic batch axis, check it with
    onnx.checker (full check) and compare onnxruntime with PyTorch on a fresh batch of
    another size. Returns the result dict (see module docs); raises UserError subclasses."""
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import DEFAULT_BATCH_SIZE, display_path, load_model_file, user_code
    from autoopt.types import Capabilities

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}.")
    for label, value in (("--batch-size", batch_size), ("check batch size", check_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{label} {value!r} is not a positive integer. Fix: pass a whole number such as 32.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"--seed {seed!r} is not an integer. Fix: pass a whole number such as --seed 0.")
    onnx = _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnxruntime")
    import torch

    dest = Path(onnx_path).expanduser()
    if dest.is_dir():
        raise UserError(f"--onnx {onnx_path}: is a directory. Fix: pass the path of the .onnx file to write, "
                        f"e.g. --onnx {Path(onnx_path) / 'model.onnx'}.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--onnx {onnx_path}: cannot create its directory ({e}). Fix: pass a writable path.",
                        cause=e) from e
    dest = dest.resolve()

    spec = load_model_file(model_path)
    shown = display_path(spec.path)

    applied: list[dict] = []
    ignored: list[dict] = []
    weights_dtype: Optional[str] = None
    plan_bs: Optional[int] = None
    plan_info = None
    if plan_path is not None:
        from autoopt.plan import Plan

        plan = Plan.load(plan_path)
        applied, ignored, weights_dtype, plan_bs = _classify_plan(plan, batch_size is not None)
        plan_info = {"path": str(Path(plan_path).resolve()), "model": plan.model, "codes": list(plan.codes)}

    bs = batch_size or plan_bs or spec.default_batch_size or DEFAULT_BATCH_SIZE
    trace_bs = max(int(bs), 2)
    check_bs = check_batch_size or trace_bs + CHECK_BATCH_OFFSET
    if check_bs == trace_bs:
        raise UserError(f"the check batch size ({check_bs}) equals the export batch size; the check must use "
                        "another size to show the batch axis is dynamic. Fix: pick a different size.")

    # validate the model file the way every command does (clear errors for broken files)
    build_workload(spec, Capabilities(device_type="cpu"), batch_size=trace_bs, seed=seed)

    torch.manual_seed(seed)
    with user_code():
        model = spec.build_model()
    model = _eager(model).to("cpu").eval()
    dtype = getattr(torch, weights_dtype) if weights_dtype else None
    if dtype is not None:
        model = model.to(dtype)
    torch.manual_seed(seed)
    with user_code():
        batch = spec.make_batch(trace_bs)
    torch.manual_seed(seed + 1)
    with user_code():
        check_batch = spec.make_batch(check_bs)

    from autoopt.workload.contract import map_tensors

    def prep(b):
        b = map_tensors(b, lambda t: t.detach().to("cpu"))
        if dtype is not None:
            b = map_tensors(b, lambda t: t.to(dtype) if t.is_floating_point() else t)
        return b

    batch, check_batch = prep(batch), prep(check_batch)
    args, kwargs = _record_call(spec, model, batch, shown)
    cargs, ckwargs = _record_call(spec, model, check_batch, shown)
    template, inputs, input_names = _flat_call(args, kwargs)
    _, check_inputs, check_names = _flat_call(cargs, ckwargs)
    if dtype is not None:  # tensors the forward made itself
        inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        check_inputs = [t.to(dtype) if t.is_floating_point() else t for t in check_inputs]
    if check_names != input_names or [t.dtype for t in inputs] != [t.dtype for t in check_inputs]:
        raise ExportError(
            f"{shown}: the model is called with different inputs for different batches "
            f"({', '.join(input_names) or 'none'} vs {', '.join(check_names) or 'none'}), so one ONNX graph "
            "cannot serve both. Fix: make make_batch return the same structure and dtypes for every batch size."
        )
    if not inputs:
        raise ExportError(f"{shown}: the model is called without tensor inputs, so there is nothing to export "
                          "with a batch axis. Fix: pass the batch's tensors to model(...) in forward.")

    wrapper = _make_wrapper(model, template)
    try:
        with torch.no_grad(), user_code():
            ref_trace = wrapper(*inputs)
            ref_check = wrapper(*check_inputs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{shown}: the model's forward failed on the recorded inputs ({_summary(e)}). Fix: make "
                          "model(...) run on make_batch's inputs in eval mode.", cause=e) from e
    if not ref_trace:
        raise ExportError(f"{shown}: the model's forward returns no tensor, so the ONNX graph would have no "
                          "output. Fix: return the model's outputs as tensors (a tensor, tuple or dict of them).")
    if len(ref_trace) != len(ref_check):
        raise ExportError(f"{shown}: the model returns {len(ref_trace)} tensors for a batch of {trace_bs} but "
                          f"{len(ref_check)} for a batch of {check_bs}, so one ONNX graph cannot serve both. Fix: "
                          "return the same outputs for every batch size.")
    output_names = [f"output_{i}" for i in range(len(ref_trace))]

    axes: dict[str, dict[int, str]] = {}
    for name, a, b in zip(input_names, inputs, check_inputs):
        axes[name] = _varying_axes(name, a, b, trace_bs, check_bs)
    for name, a, b in zip(output_names, ref_trace, ref_check):
        axes[name] = _varying_axes(name, a, b, trace_bs, check_bs)
    if not any(axes[n] for n in input_names):
        raise ExportError(
            f"{shown}: no input of the model changes size with the batch size ({trace_bs} vs {check_bs} samples), "
            "so there is no batch axis to make dynamic. Fix: make make_batch(batch_size) return batch_size "
            "samples, and pass them to the model."
        )

    with tempfile.TemporaryDirectory(prefix=".autoopt-export-", dir=str(dest.parent)) as tmpdir:
        tmp_file = Path(tmpdir) / "model.onnx"
        with torch.no_grad():
            used, fallback = _run_exporters(exporter, wrapper, inputs, tmp_file, input_names, output_names, axes,
                                            opset, shown, spec.path)
        try:
            external, data_path, weights_bytes = _save(tmp_file, dest, external_data_threshold_bytes)
        except (OSError, ValueError) as e:
            raise ExportError(f"--onnx {onnx_path}: the exported model cannot be written ({e}). Fix: pass a "
                              "writable path with enough free space.", cause=e) from e

    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
        raise ExportError(
            f"{shown}: the exported graph ({dest}) fails onnx.checker's full check: {_short(e)}. Fix: this is an "
            f"exporter problem ({used}); try the other exporter or a different opset, and report it with --debug's "
            "output.",
            cause=e,
        ) from e

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        session = ort.InferenceSession(str(dest), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        op = operator_from_error(e)
        what = f"has no CPU kernel for the operator {op}" if op else f"cannot load it ({_short(e)})"
        raise ExportError(
            f"{shown}: onnxruntime {what} in the exported graph ({dest}, {used} exporter"
            + (f", weights in {weights_dtype}" if weights_dtype else "")
            + "). Fix: export in float32 (drop the plan's weights dtype) or use a runtime that supports it.",
            cause=e,
        ) from e
    feeds = {name: _to_numpy(t) for name, t in zip(input_names, check_inputs)}
    try:
        ort_outs = session.run(output_names, feeds)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"{shown}: the exported graph ({dest}) fails in onnxruntime on a batch of {check_bs} after export with "
            f"{trace_bs}: {_short(e)}. The batch size was baked into the graph, typically by a Python int taken "
            "from a tensor's shape (int(x.shape[0]), x.size(0) passed to torch.zeros / view as a number). Fix: "
            "use the tensor's shape directly (x.shape[0] without int(), x.view(x.size(0), -1), torch.zeros_like).",
            cause=e,
        ) from e

    max_abs = 0.0
    max_rel = 0.0
    for name, got, ref in zip(output_names, ort_outs, ref_check):
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportError(
                f"{shown}: on a batch of {check_bs} the exported graph returns {name} with shape "
                f"{tuple(got.shape)} where PyTorch returns {tuple(ref.shape)} (exported with a batch of {trace_bs}): "
                "the batch size was baked into the graph, typically by a Python int taken from a tensor's shape. "
                "Fix: use the tensor's shape directly (x.view(x.size(0), -1) rather than a number).",
            )
        a, r = _compare(got, ref)
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    tol = TOLERANCE.get(weights_dtype, TOLERANCE[None])
    if not max_rel <= tol:
        raise ExportError(
            f"{shown}: the exported graph ({dest}, written) disagrees with PyTorch on a fresh batch of {check_bs}: "
            f"max abs error {max_abs:.3g}, {max_rel:.3g} relative (tolerance {tol:.0e}). Fix: a Python value taken "
            "from the example batch (a shape, an .item(), a branch on tensor values) was frozen into the graph; "
            "make it a tensor operation, or try the other exporter.",
        )

    size = dest.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    opset_used = next((int(o.version) for o in onnx.load(str(dest), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None)

    def describe(items):
        return [{"name": i.name, "type": i.type, "shape": list(i.shape)} for i in items]

    return {
        "model": spec.name,
        "model_path": str(spec.path),
        "onnx_path": str(dest),
        "opset": opset_used,
        "exporter": used,
        "exporter_fallback": fallback,
        "seed": seed,
        "batch_size": trace_bs,
        "input_names": list(input_names),
        "output_names": output_names,
        "dynamic_axes": {n: {str(d): v for d, v in a.items()} for n, a in axes.items() if a},
        "inputs": describe(session.get_inputs()),
        "outputs": describe(session.get_outputs()),
        "weights_dtype": weights_dtype or "float32",
        "check_batch_size": check_bs,
        "max_abs_error": _sig(max_abs),
        "max_rel_error": _sig(max_rel),
        "tolerance": tol,
        "onnx_checker": "ok",
        "external_data": external,
        "external_data_path": str(data_path) if data_path is not None else None,
        "weights_mb": round(weights_bytes / 1e6, 3),
        "size_mb": round(size / 1e6, 3),
        "plan": plan_info,
        "plan_transforms_applied": applied,
        "plan_transforms_ignored": ignored,
    }


__all__ = ["EXTERNAL_DATA_THRESHOLD_BYTES", "ExportError", "export_onnx", "operator_from_error"]
