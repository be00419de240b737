"""What the model is called with, recorded and flattened for export.

The file's forward (or the default call) runs with a forward pre-hook on the model that
records the arguments of the first model(...) call; those become flat tensor inputs of a
wrapper module that returns the model's output tensors flat. Recording on the export batch
and on a check batch of another size gives the reference outputs and the dynamic axes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoopt.pipelines.export.errors import ExportError, _short, _summary


@dataclass
class Recorded:
    """The model's call on the export batch and on the check batch, as flat named tensors,
    with PyTorch's outputs on the check batch and the axes that change between the two."""

    wrapper: Any
    input_names: list[str]
    inputs: list
    check_inputs: list
    output_names: list[str]
    ref_check: tuple
    axes: dict[str, dict[int, str]]
    trace_bs: int
    check_bs: int


def record(spec, model, batch, check_batch, dtype, shown: str, trace_bs: int, check_bs: int) -> Recorded:
    """Record the model's call on both batches, run the wrapper on each and find the dynamic axes."""
    template, inputs, input_names, check_inputs = _flat_inputs(spec, model, batch, check_batch, dtype, shown)
    wrapper = _make_wrapper(model, template)
    ref_trace, ref_check = _reference_outputs(wrapper, inputs, check_inputs, shown, trace_bs, check_bs)
    output_names = [f"output_{i}" for i in range(len(ref_trace))]
    axes = _dynamic_axes(input_names, inputs, check_inputs, output_names, ref_trace, ref_check, trace_bs, check_bs,
                         shown)
    return Recorded(wrapper, input_names, inputs, check_inputs, output_names, ref_check, axes, trace_bs, check_bs)


def _flat_inputs(spec, model, batch, check_batch, dtype, shown: str) -> tuple[Any, list, list[str], list]:
    """(call template, export inputs, their names, check inputs): the same names and dtypes on both batches."""
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
    return template, inputs, input_names, check_inputs


def _reference_outputs(wrapper, inputs, check_inputs, shown: str, trace_bs: int, check_bs: int) -> tuple[tuple, tuple]:
    """PyTorch's flat outputs on the export and the check inputs (the same number of tensors)."""
    import torch

    from autoopt.workload.load import user_code

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
    return ref_trace, ref_check


def _dynamic_axes(input_names, inputs, check_inputs, output_names, ref_trace, ref_check, trace_bs: int,
                  check_bs: int, shown: str) -> dict[str, dict[int, str]]:
    """The axes of every input and output that change between the two batches; an input must have one."""
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
    return axes


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


def _eager(model):
    """The eager module behind a torch.compile'd one (the exporters trace eager code)."""
    inner = getattr(model, "_orig_mod", None)
    if inner is not None:
        return inner
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return model
