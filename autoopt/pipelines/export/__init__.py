"""ONNX export: `autoopt export MODEL --onnx PATH [--plan plan.json] [--seed N] [--batch-size N]`.

    from autoopt.pipelines.export import export_onnx
    result = export_onnx("examples/resnet_infer.py", "resnet.onnx", plan_path=None, seed=0)
    result["max_abs_error"], result["input_names"], result["dynamic_axes"]

What it does, in order:

1. Loads the model file and validates it with autoopt.workload.load and .build (the same
   one-paragraph errors as every other command), then builds the model on the CPU with
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

The package: `capture` records the call and flattens inputs and outputs (steps 2-3),
`exporters` runs the exporters and names unsupported operators (step 4), `check` saves and
checks the graph (steps 5-6), `plan_transforms` decides on the plan, `errors` holds
ExportError; `export_onnx` here runs the steps in order.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from autoopt.errors import UserError
from autoopt.pipelines.export.capture import Recorded, _eager, record
from autoopt.pipelines.export.check import (  # noqa: F401 - the constants stay importable from here
    EXTERNAL_DATA_MIN_TENSOR_BYTES,
    TOLERANCE,
    _save,
    _sig,
    check_graph,
    compare_with_pytorch,
    ort_session,
)
from autoopt.pipelines.export.errors import ExportError, operator_from_error
from autoopt.pipelines.export.exporters import _run_exporters
from autoopt.pipelines.export.plan_transforms import PlanChoices, read_plan

EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3  # protobuf cannot serialise a message over 2 GiB
EXPORTERS = ("auto", "torchscript", "dynamo")
CHECK_BATCH_OFFSET = 3


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
    from autoopt.types import Capabilities
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import display_path, load_model_file

    _check_options(exporter, batch_size, check_batch_size, seed)
    _require("onnx", "onnx")
    _require("onnxruntime", "onnxruntime")
    dest = _destination(onnx_path)
    spec = load_model_file(model_path)
    shown = display_path(spec.path)
    plan = read_plan(plan_path, batch_size is not None)
    trace_bs, check_bs = _batch_sizes(spec, batch_size, plan.batch_size, check_batch_size)

    # validate the model file the way every command does (clear errors for broken files)
    build_workload(spec, Capabilities(device_type="cpu"), batch_size=trace_bs, seed=seed)
    model, batch, check_batch, dtype = _model_and_batches(spec, seed, trace_bs, check_bs, plan.weights_dtype)
    rec = record(spec, model, batch, check_batch, dtype, shown, trace_bs, check_bs)
    used, fallback, saved = _export(exporter, rec, dest, onnx_path, opset, shown, spec.path,
                                    external_data_threshold_bytes)
    check_graph(dest, shown, used)
    session = ort_session(dest, shown, used, plan.weights_dtype)
    errors = compare_with_pytorch(session, rec, dest, shown, plan.weights_dtype)
    return _result(spec, dest, used, fallback, seed, rec, session, plan, errors, saved)


def _check_options(exporter: str, batch_size, check_batch_size, seed) -> None:
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}.")
    for label, value in (("--batch-size", batch_size), ("check batch size", check_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{label} {value!r} is not a positive integer. Fix: pass a whole number such as 32.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"--seed {seed!r} is not an integer. Fix: pass a whole number such as --seed 0.")


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


def _destination(onnx_path) -> Path:
    """The resolved path to write, its directory created."""
    dest = Path(onnx_path).expanduser()
    if dest.is_dir():
        raise UserError(f"--onnx {onnx_path}: is a directory. Fix: pass the path of the .onnx file to write, "
                        f"e.g. --onnx {Path(onnx_path) / 'model.onnx'}.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--onnx {onnx_path}: cannot create its directory ({e}). Fix: pass a writable path.",
                        cause=e) from e
    return dest.resolve()


def _batch_sizes(spec, batch_size: Optional[int], plan_bs: Optional[int],
                 check_batch_size: Optional[int]) -> tuple[int, int]:
    """(export batch size, at least 2; check batch size, which must differ from it)."""
    from autoopt.workload.load import DEFAULT_BATCH_SIZE

    bs = batch_size or plan_bs or spec.default_batch_size or DEFAULT_BATCH_SIZE
    trace_bs = max(int(bs), 2)
    check_bs = check_batch_size or trace_bs + CHECK_BATCH_OFFSET
    if check_bs == trace_bs:
        raise UserError(f"the check batch size ({check_bs}) equals the export batch size; the check must use "
                        "another size to show the batch axis is dynamic. Fix: pick a different size.")
    return trace_bs, check_bs


def _model_and_batches(spec, seed: int, trace_bs: int, check_bs: int, weights_dtype: Optional[str]):
    """(eager model on the CPU in eval mode, export batch, check batch, dtype): seeded as documented,
    cast to the plan's weights dtype when it has one."""
    import torch

    from autoopt.workload.contract import map_tensors
    from autoopt.workload.guard import UserCall
    from autoopt.workload.load import user_code

    torch.manual_seed(seed)
    with user_code(), UserCall(spec.path, "build_model"):
        model = spec.build_model()
    model = _eager(model).to("cpu").eval()
    dtype = getattr(torch, weights_dtype) if weights_dtype else None
    if dtype is not None:
        model = model.to(dtype)
    torch.manual_seed(seed)
    with user_code(), UserCall(spec.path, "make_batch"):
        batch = spec.make_batch(trace_bs)
    torch.manual_seed(seed + 1)
    with user_code(), UserCall(spec.path, "make_batch"):
        check_batch = spec.make_batch(check_bs)

    def prep(b):
        b = map_tensors(b, lambda t: t.detach().to("cpu"))
        if dtype is not None:
            b = map_tensors(b, lambda t: t.to(dtype) if t.is_floating_point() else t)
        return b

    return model, prep(batch), prep(check_batch), dtype


def _export(exporter: str, rec: Recorded, dest: Path, onnx_path, opset: Optional[int], shown: str,
            model_path: Path, threshold: int) -> tuple[str, Optional[str], tuple[bool, Optional[Path], int]]:
    """Export into a temporary directory beside dest and save at dest: (exporter used, why the
    first one failed or None, (external data?, data path, weights bytes))."""
    import torch

    with tempfile.TemporaryDirectory(prefix=".autoopt-export-", dir=str(dest.parent)) as tmpdir:
        tmp_file = Path(tmpdir) / "model.onnx"
        with torch.no_grad():
            used, fallback = _run_exporters(exporter, rec.wrapper, rec.inputs, tmp_file, rec.input_names,
                                            rec.output_names, rec.axes, opset, shown, model_path)
        try:
            saved = _save(tmp_file, dest, threshold)
        except (OSError, ValueError) as e:
            raise ExportError(f"--onnx {onnx_path}: the exported model cannot be written ({e}). Fix: pass a "
                              "writable path with enough free space.", cause=e) from e
    return used, fallback, saved


def _result(spec, dest: Path, used: str, fallback: Optional[str], seed: int, rec: Recorded, session,
            plan: PlanChoices, errors: tuple[float, float, float], saved: tuple[bool, Optional[Path], int]) -> dict:
    """The result dict (see module docs)."""
    import onnx

    max_abs, max_rel, tol = errors
    external, data_path, weights_bytes = saved
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
        "batch_size": rec.trace_bs,
        "input_names": list(rec.input_names),
        "output_names": rec.output_names,
        "dynamic_axes": {n: {str(d): v for d, v in a.items()} for n, a in rec.axes.items() if a},
        "inputs": describe(session.get_inputs()),
        "outputs": describe(session.get_outputs()),
        "weights_dtype": plan.weights_dtype or "float32",
        "check_batch_size": rec.check_bs,
        "max_abs_error": _sig(max_abs),
        "max_rel_error": _sig(max_rel),
        "tolerance": tol,
        "onnx_checker": "ok",
        "external_data": external,
        "external_data_path": str(data_path) if data_path is not None else None,
        "weights_mb": round(weights_bytes / 1e6, 3),
        "size_mb": round(size / 1e6, 3),
        "plan": plan.info,
        "plan_transforms_applied": plan.applied,
        "plan_transforms_ignored": plan.ignored,
    }


__all__ = ["EXTERNAL_DATA_THRESHOLD_BYTES", "ExportError", "export_onnx", "operator_from_error"]
