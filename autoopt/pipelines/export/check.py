"""Saving and checking the exported graph: inline or with external data (`<name>.onnx.data`
past a size threshold), onnx.checker's full check, and onnxruntime's outputs on the check
batch compared with PyTorch's (max abs and max relative error against a tolerance)."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional

from autoopt.pipelines.export.capture import Recorded
from autoopt.pipelines.export.errors import ExportError, _short, operator_from_error

EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024  # tensors smaller than this stay inline in external-data files
TOLERANCE = {None: 1e-3, "float16": 1e-2}  # relative, per output (see module docs)


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


def check_graph(dest: Path, shown: str, used: str) -> None:
    """onnx.checker's full check (with shape inference) of the written file."""
    import onnx

    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
        raise ExportError(
            f"{shown}: the exported graph ({dest}) fails onnx.checker's full check: {_short(e)}. Fix: this is an "
            f"exporter problem ({used}); try the other exporter or a different opset, and report it with --debug's "
            "output.",
            cause=e,
        ) from e


def ort_session(dest: Path, shown: str, used: str, weights_dtype: Optional[str]):
    """An onnxruntime CPU session on the written file."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        return ort.InferenceSession(str(dest), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        op = operator_from_error(e)
        what = f"has no CPU kernel for the operator {op}" if op else f"cannot load it ({_short(e)})"
        raise ExportError(
            f"{shown}: onnxruntime {what} in the exported graph ({dest}, {used} exporter"
            + (f", weights in {weights_dtype}" if weights_dtype else "")
            + "). Fix: export in float32 (drop the plan's weights dtype) or use a runtime that supports it.",
            cause=e,
        ) from e


def compare_with_pytorch(session, rec: Recorded, dest: Path, shown: str,
                         weights_dtype: Optional[str]) -> tuple[float, float, float]:
    """(max abs error, max relative error, tolerance) of onnxruntime against PyTorch on the check batch;
    other shapes or an error over the tolerance raise ExportError."""
    check_bs, trace_bs = rec.check_bs, rec.trace_bs
    ort_outs = _run_onnxruntime(session, rec, dest, shown)
    max_abs = 0.0
    max_rel = 0.0
    for name, got, ref in zip(rec.output_names, ort_outs, rec.ref_check):
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
    return max_abs, max_rel, tol


def _run_onnxruntime(session, rec: Recorded, dest: Path, shown: str) -> list:
    """onnxruntime's outputs on the check inputs; a failure means the batch size was baked in."""
    check_bs, trace_bs = rec.check_bs, rec.trace_bs
    feeds = {name: _to_numpy(t) for name, t in zip(rec.input_names, rec.check_inputs)}
    try:
        return session.run(rec.output_names, feeds)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"{shown}: the exported graph ({dest}) fails in onnxruntime on a batch of {check_bs} after export with "
            f"{trace_bs}: {_short(e)}. The batch size was baked into the graph, typically by a Python int taken "
            "from a tensor's shape (int(x.shape[0]), x.size(0) passed to torch.zeros / view as a number). Fix: "
            "use the tensor's shape directly (x.shape[0] without int(), x.view(x.size(0), -1), torch.zeros_like).",
            cause=e,
        ) from e
