"""Binding a loaded model file to a device: ModelSpec -> Workload.

`build_workload` calls the model file's functions once on the device, one step each —
build_model, make_batch, the first forward (and in train mode the loss, backward,
build_optimizer and a step), build_dataloader — checks every result, and collects the
model.* / workload.* facts (computed by autoopt.workload.inspect). A failure in the user's
code becomes a ModelFileError naming the function, and for the first forward the layer
that raised it.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Optional

from autoopt.env import available_cpus
from autoopt.errors import ModelFileError, UserError
from autoopt.types import Capabilities, ModelSpec, Workload
from autoopt.workload.inspect import (
    _is_compiled,
    channels_last_used,
    model_facts,
    optimizer_impl,
    sdpa_attention_count,
    uses_autocast,
)
from autoopt.workload.load import (
    CALL_FORMS,
    DEFAULT_BATCH_SIZE,
    _at,
    _describe,
    _exc_summary,
    _fail,
    _shape_signature,
    check_batch,
    display_path,
    user_code,
)

# ---------------------------------------------------------------------------- first forward


class _ModuleTracker:
    """Tracks the innermost running module during a forward (forward pre-hooks push, forward
    hooks pop), so an exception can be pinned to the layer that raised it. Also records
    which modules call scaled_dot_product_attention and whether autocast is active."""

    def __init__(self, model):
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[tuple[Any, list[tuple[int, ...]]]] = []
        self.failed: Optional[tuple[Any, list[tuple[int, ...]]]] = None
        self.sdpa_callers: set[int] = set()
        self.autocast_seen = False
        self.handles = []
        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, module, args):
        import torch

        from autoopt.workload.contract import iter_tensors

        shapes = [tuple(t.shape) for t in iter_tensors(args)]
        self.stack.append((module, shapes))
        if not self.autocast_seen:
            for dev in ("cpu", "cuda"):
                try:
                    if torch.is_autocast_enabled(dev):
                        self.autocast_seen = True
                except (TypeError, RuntimeError):
                    if dev == "cuda" and torch.is_autocast_enabled():
                        self.autocast_seen = True

    def _post(self, module, args, output):
        # always_call: also runs when the module raised. Keep the innermost failing entry;
        # a module that completes afterwards means that failure was caught by the model.
        exc = sys.exc_info()[1]
        entry = None
        while self.stack:
            entry = self.stack.pop()
            if entry[0] is module:
                break
        if exc is None:
            self.failed = None
        elif self.failed is None:
            self.failed = entry

    def innermost(self):
        if self.failed is not None:
            return self.failed
        return self.stack[-1] if self.stack else None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _sdpa_mode(tracker: _ModuleTracker):
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention and tracker.stack:
                tracker.sdpa_callers.add(id(tracker.stack[-1][0]))
            return func(*args, **(kwargs or {}))

    return _Count()


def _layer_problem(module, name: str, shapes: list[tuple[int, ...]]) -> Optional[tuple[str, str]]:
    """(what is wrong, how to fix it) for a shape mismatch in common layers, or None."""
    import torch.nn as nn

    x = shapes[0] if shapes else None
    if not x:
        return None
    before = "or change the layers before it (or the input shape make_batch builds) so they produce"
    if isinstance(module, nn.Linear) and x[-1] != module.in_features:
        return (
            f"it expects {module.in_features} input features but gets {x[-1]} (input shape {x})",
            f"build {name} as nn.Linear({x[-1]}, {module.out_features}), {before} {module.in_features} features.",
        )
    if isinstance(module, nn.modules.conv._ConvNd) and len(x) >= 2:
        cdim = 1 if len(x) == module.weight.dim() else 0
        if x[cdim] != module.in_channels:
            return (
                f"it expects {module.in_channels} input channels but gets {x[cdim]} (input shape {x})",
                f"build {name} with in_channels={x[cdim]}, {before} {module.in_channels} channels.",
            )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(x) >= 2 and x[1] != module.num_features:
        return (
            f"it expects {module.num_features} channels but gets {x[1]} (input shape {x})",
            f"build {name} with num_features={x[1]}, {before} {module.num_features} channels.",
        )
    if isinstance(module, nn.LayerNorm):
        ns = tuple(module.normalized_shape)
        if tuple(x[-len(ns):]) != ns:
            return (
                f"it normalizes over {ns} but its input has shape {x}",
                f"build {name} as nn.LayerNorm({x[-1]}), {before} a last dimension of {ns[-1]}.",
            )
    if isinstance(module, nn.RNNBase) and x[-1] != module.input_size:
        return (
            f"it expects input_size {module.input_size} but gets {x[-1]} (input shape {x})",
            f"build {name} with input_size={x[-1]}, {before} {module.input_size} features.",
        )
    if isinstance(module, nn.Embedding):
        return (
            f"it has {module.num_embeddings} rows and its input (shape {x}) holds an index out of range or a "
            f"non-integer",
            f"make make_batch build integer indices below {module.num_embeddings}, or enlarge {name}.",
        )
    return None


def _forward_name(spec: ModelSpec, batch: Any) -> str:
    if spec.forward is not None:
        return "forward"
    if isinstance(batch, dict):
        return "forward (default: model(**batch))"
    if isinstance(batch, (tuple, list)):
        return "forward (default: model(*batch))"
    return "forward (default: model(batch))"


def _forward_error(exc: BaseException, spec: ModelSpec, tracker: _ModuleTracker, batch, shown: str) -> ModelFileError:
    import torch

    where = _forward_name(spec, batch)
    inner = tracker.innermost()
    at = _at(exc, spec.path)
    from autoopt.workload.contract import shapes_of

    in_shapes = ", ".join(str(s) for _, s in shapes_of(batch)[:6])
    if isinstance(exc, torch.OutOfMemoryError):
        return _fail(
            shown,
            where,
            f"the first forward ran out of device memory at batch size {batch_len_safe(batch)}",
            "use a smaller --batch-size (or BATCH_SIZE in the file).",
            exc,
        )
    if inner is not None:
        module, shapes = inner
        name = tracker.names.get(module) or "(the model)"
        layer = f"`{name}` ({_module_repr(module)})"
        shape_s = ", ".join(str(s) for s in shapes) or "none"
        known = _layer_problem(module, name, shapes)
        if known:
            why, fix = known
            problem = (
                f"the first forward failed in layer {layer}: {why}{at}. Batch shapes: {in_shapes}. "
                f"Error: {_exc_summary(exc)}"
            )
        else:
            fix = (
                f"check layer {name}: the input it gets ({shape_s}) must match what it was built for; "
                "adjust it in build_model(), or the layers before it, or the batch make_batch returns."
            )
            problem = (
                f"the first forward failed in layer {layer} with input shapes {shape_s}{at}: {_exc_summary(exc)}. "
                f"Batch shapes: {in_shapes}"
            )
        return _fail(shown, where, problem, fix, exc)
    return _fail(
        shown,
        where,
        f"the first forward raised {_exc_summary(exc)}{at}, outside any layer. Batch: {_describe(batch)}",
        (
            "forward(model, batch) must unpack the batch make_batch returns and call the model on it."
            if spec.forward is not None
            else "the model's forward must accept the batch as make_batch returns it (a dict as keyword "
            "arguments, a tuple/list as positional arguments), or define forward(model, batch)."
        ),
        exc,
    )


def _module_repr(module) -> str:
    r = repr(module)
    if "\n" in r:
        return type(module).__name__
    return r if len(r) <= 120 else type(module).__name__


def batch_len_safe(batch) -> Optional[int]:
    from autoopt.workload.contract import batch_len

    try:
        return batch_len(batch)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------- workload


def _call(shown: str, spec: ModelSpec, name: str, fn: Callable, *args):
    """Call one of the user's functions; any exception becomes a ModelFileError naming it."""
    try:
        with user_code():
            return fn(*args)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise _fail(
            shown,
            name,
            f"{CALL_FORMS.get(name, name)} called sys.exit({e.code!r}){_at(e, spec.path)}",
            f"return a value from {name} instead of exiting.",
            e,
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise _fail(
            shown,
            name,
            f"{CALL_FORMS.get(name, name)} raised {_exc_summary(e)}{_at(e, spec.path)}",
            f"make {CALL_FORMS.get(name, name)} run on its own (try it in a Python shell after importing the file); "
            "autoopt calls it exactly as the model-file contract (docs/contracts.md) says.",
            e,
        ) from e


def _resolve_batch_size(spec: ModelSpec, batch_size: Optional[int]) -> int:
    bs = batch_size if batch_size is not None else (spec.default_batch_size or DEFAULT_BATCH_SIZE)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise UserError(f"--batch-size {bs!r} is not a positive integer. Fix: pass a whole number such as "
                        f"--batch-size 32.")
    return bs


def build_workload(
    spec: ModelSpec, caps: Capabilities, *, batch_size: Optional[int] = None, seed: int = 0
) -> Workload:
    """Call the model file's functions once on the device and check every result; returns a
    Workload with the model.* and workload.* facts. The model built here is discarded."""
    import torch

    shown = display_path(spec.path)
    bs = _resolve_batch_size(spec, batch_size)
    device = caps.device_type
    _check_device(device)

    model = _build_model(shown, spec, seed)
    batch, static = _make_batches(shown, spec, bs, seed)
    compiled = _is_compiled(model, spec)
    facts: dict[str, Any] = model_facts(model)
    facts["workload.channels_last"] = channels_last_used(model, batch)

    # validate on the eager module: a compiled model would compile here (minutes on a CPU)
    run_model, restore = _eager_view(model)
    run_model.to(device)
    optimizer = _set_mode(shown, spec, run_model)
    out, tracker = _first_forward(shown, spec, run_model, batch, device)
    autocast = uses_autocast(spec, run_model, tracker.autocast_seen)
    facts["model.attention_count"] += sdpa_attention_count(run_model, tracker.sdpa_callers)
    if spec.mode == "train":
        _train_step(shown, spec, batch, out, optimizer)

    dl_facts, dl_static = _dataloader(shown, spec, bs, seed)
    facts.update(_workload_facts(spec, bs, batch, static and dl_static, optimizer, autocast, compiled, dl_facts))
    restore()
    del model, run_model, optimizer, out, tracker
    if device == "cuda":
        torch.cuda.empty_cache()
    return Workload(spec=spec, caps=caps, batch_size=bs, seed=seed, facts=facts)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "the capabilities describe a CUDA device, but torch sees none. Fix: detect capabilities with "
            "autoopt.env.detect_capabilities() on this machine, or use --device cpu."
        )


def _build_model(shown: str, spec: ModelSpec, seed: int):
    """build_model(), under the seed; anything but an nn.Module instance is an error."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    model = _call(shown, spec, "build_model", spec.build_model)
    if not isinstance(model, nn.Module):
        if inspect.isclass(model) and issubclass(model, nn.Module):
            problem = f"build_model() returned the class {model.__name__}, not an instance"
            fix = f"return an instance: `return {model.__name__}()`."
        elif isinstance(model, (tuple, list)) and any(isinstance(m, nn.Module) for m in model):
            parts = ", ".join(type(m).__name__ for m in model)
            problem = f"build_model() returned a {type(model).__name__} ({parts}), not one torch.nn.Module"
            fix = ("return only the model; create the optimizer in build_optimizer(model) and the data in "
                   "make_batch(batch_size).")
        else:
            problem = f"build_model() returned {_describe(model)}, not a torch.nn.Module"
            fix = "return the model instance, e.g. `return Net()` (the function must end with a return statement)."
        raise _fail(shown, "build_model", problem, fix)
    return model


def _make_batches(shown: str, spec: ModelSpec, bs: int, seed: int) -> tuple[Any, bool]:
    """make_batch(bs) twice, under different seeds: (the first batch, whether the shapes are static)."""
    import torch

    torch.manual_seed(seed)
    batch = _call(shown, spec, "make_batch", spec.make_batch, bs)
    check_batch(batch, bs, shown, "make_batch")
    torch.manual_seed(seed + 1)
    batch2 = _call(shown, spec, "make_batch", spec.make_batch, bs)
    check_batch(batch2, bs, shown, "make_batch")
    return batch, _shape_signature(batch) == _shape_signature(batch2)


def _set_mode(shown: str, spec: ModelSpec, run_model):
    """Train or eval mode; in train mode, the optimizer build_optimizer(model) returns (else None)."""
    import torch

    if spec.mode != "train":
        run_model.eval()
        return None
    run_model.train()
    optimizer = _call(shown, spec, "build_optimizer", spec.build_optimizer, run_model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise _fail(
            shown,
            "build_optimizer",
            f"build_optimizer(model) returned {_describe(optimizer)}, not a torch.optim.Optimizer",
            "return an optimizer over the model's parameters, e.g. "
            "`return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)`.",
        )
    return optimizer


def _first_forward(shown: str, spec: ModelSpec, run_model, batch, device: str) -> tuple[Any, _ModuleTracker]:
    """The first forward on the device, tracked: (its output, the tracker that watched it)."""
    import torch

    from autoopt.workload.contract import call_forward, to_device

    dev_batch = to_device(batch, device)
    tracker = _ModuleTracker(run_model)
    try:
        grad = torch.enable_grad() if spec.mode == "train" else torch.no_grad()
        with grad, _sdpa_mode(tracker):
            try:
                with user_code():
                    out = call_forward(spec, run_model, dev_batch)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                raise _forward_error(e, spec, tracker, batch, shown) from e
    finally:
        tracker.remove()
    return out, tracker


def _train_step(shown: str, spec: ModelSpec, batch, out, optimizer) -> None:
    """The training loss forward returned, its backward and one optimizer step."""
    where = _forward_name(spec, batch)
    loss = _training_loss(shown, where, out)
    try:
        with user_code():
            loss.backward()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(
            shown,
            where,
            f"loss.backward() failed: {_exc_summary(e)}",
            "make sure the loss is computed from the model's outputs with differentiable operations "
            "(no in-place edits of tensors autograd needs).",
            e,
        ) from e
    try:
        with user_code():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(
            shown,
            "build_optimizer",
            f"optimizer.step() failed: {_exc_summary(e)}",
            "build the optimizer over model.parameters() of the model it is given.",
            e,
        ) from e


def _training_loss(shown: str, where: str, out):
    """The scalar, floating-point loss tensor that requires grad in forward's output."""
    from autoopt.workload.contract import extract_loss

    loss = extract_loss(out)
    fix_loss = (
        "in train mode forward must return the loss: define `def forward(model, batch): x, y = batch; "
        "return torch.nn.functional.cross_entropy(model(x), y)` (a scalar, e.g. reduced with .mean())."
    )
    if loss is None:
        raise _fail(shown, where, f"forward returned {_describe(out)}, which holds no loss tensor", fix_loss)
    if loss.numel() != 1:
        raise _fail(
            shown,
            where,
            f"the training loss is not a scalar: forward returned a tensor of shape {tuple(loss.shape)}"
            + (" (it looks like the model's outputs, not a loss)" if loss.dim() >= 2 else ""),
            fix_loss,
        )
    if not loss.is_floating_point():
        raise _fail(shown, where, f"the training loss has dtype {loss.dtype}, not a floating-point type", fix_loss)
    if not loss.requires_grad:
        raise _fail(
            shown,
            where,
            "the training loss does not require grad (computed under torch.no_grad(), detached, "
            "or from .item()), so backward cannot train the model",
            "return the loss tensor itself from forward, without .item(), .detach() or torch.no_grad().",
        )
    return loss


def _dataloader(shown: str, spec: ModelSpec, bs: int, seed: int) -> tuple[dict, bool]:
    """The data loader's settings and whether its batches keep one shape (defaults without one)."""
    import torch

    if spec.build_dataloader is None:
        return {"workers": None, "pin": False, "persistent": False}, True
    torch.manual_seed(seed)
    loader = _call(shown, spec, "build_dataloader", spec.build_dataloader, bs)
    return _check_dataloader(loader, bs, shown, spec)


def _workload_facts(spec: ModelSpec, bs: int, batch, static: bool, optimizer, autocast: bool, compiled: bool,
                    dl_facts: dict) -> dict[str, Any]:
    """The workload.* facts of the calls above (workload.channels_last is set before them)."""
    from autoopt.workload.contract import has_4d_float_input

    return {
        "workload.mode": spec.mode,
        "workload.batch_size": bs,
        "workload.has_dataloader": spec.build_dataloader is not None,
        "workload.dataloader_workers": dl_facts["workers"],
        "workload.pin_memory": dl_facts["pin"],
        "workload.persistent_workers": dl_facts["persistent"],
        "workload.input_is_4d": has_4d_float_input(batch),
        "workload.static_shapes": static,
        "workload.optimizer": type(optimizer).__name__ if optimizer is not None else "",
        "workload.optimizer_impl": optimizer_impl(optimizer) if optimizer is not None else None,
        "workload.autocast": bool(autocast),
        "workload.compiled": compiled,
        "workload.cpu_count": available_cpus(),
        # the first group's learning rate, for the batch-size transform's rule (private: not a reported fact)
        "_optimizer_lr": _lr_of(optimizer),
    }


def _lr_of(optimizer) -> Optional[float]:
    lr = optimizer.param_groups[0].get("lr") if optimizer is not None and optimizer.param_groups else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _eager_view(model):
    """The eager module behind a compiled one, and a function that undoes any change."""
    orig = getattr(model, "_orig_mod", None)
    if orig is not None:
        return orig, lambda: None
    saved = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None

    def restore():
        for m, impl in saved:
            m._compiled_call_impl = impl

    return model, restore


def _check_dataloader(loader, bs: int, shown: str, spec: ModelSpec):
    import torch

    where = "build_dataloader"
    fix = (
        "return an iterable of batches, e.g. `return torch.utils.data.DataLoader(dataset, batch_size=batch_size, "
        "shuffle=True)`, whose batches look like make_batch's."
    )
    if loader is None:
        raise _fail(shown, where, "build_dataloader(batch_size) returned None", fix)
    if isinstance(loader, torch.utils.data.Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        raise _fail(
            shown,
            where,
            f"build_dataloader(batch_size) returned a Dataset ({type(loader).__name__}), which yields single "
            "samples, not batches",
            "wrap it: `return torch.utils.data.DataLoader(dataset, batch_size=batch_size)`.",
        )
    if isinstance(loader, torch.Tensor) or not hasattr(loader, "__iter__"):
        raise _fail(shown, where, f"build_dataloader(batch_size) returned {_describe(loader)}, which is not iterable",
                    fix)
    workers = pin = persistent = None
    if isinstance(loader, torch.utils.data.DataLoader):
        workers = int(loader.num_workers)
        pin = bool(loader.pin_memory)
        persistent = bool(loader.persistent_workers)
    it = None
    try:
        with user_code():
            it = iter(loader)
            first = next(it, None)
            second = next(it, None)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(shown, where, f"iterating the data loader raised {_exc_summary(e)}{_at(e, spec.path)}", fix,
                    e) from e
    finally:
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it
    if first is None:
        raise _fail(
            shown,
            where,
            "the data loader yielded no batch",
            "give the dataset at least batch_size samples (with drop_last=True it needs a full batch).",
        )
    check_batch(first, bs, shown, "build_dataloader")
    static = second is None or _shape_signature(first) == _shape_signature(second)
    return {"workers": workers, "pin": bool(pin), "persistent": bool(persistent)}, static

__all__ = ["build_workload"]
