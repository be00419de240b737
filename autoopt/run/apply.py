"""The applier: the one place where an ExecConfig becomes torch — process-wide settings, the
model, the optimizer, the DataLoader, the batches and the training step.

Everything that runs a configuration goes through here: the Session that autoopt measures
(autoopt.run.session), the distributed worker's ranks, and `autoopt.plan.Plan`, which a
user's own training loop calls. So what was measured is what a plan applies.

Order of application (also the order of a patch's edits):
1. process-wide settings: float32 matmul precision (and cuDNN TF32 on CUDA),
   cudnn.benchmark, intra-op threads (`process_settings_for`);
2. the model: .to(device), reduced-precision weights (inference), channels_last,
   activation checkpointing (`place_model`), the DistributedDataParallel wrapper in a
   distributed job (`wrap_ddp`), torch.compile last (`compile_model`);
3. the optimizer: its fused / foreach implementation (`prepare_optimizer`);
4. the DataLoader: workers, pinning, prefetch (`prepare_loader`);
5. each batch: to the device, channels_last 4-D inputs, the weights' dtype (`prepare_batch`);
6. the step: autocast around forward and loss only, the loss divided over the micro-batches
   of gradient accumulation, GradScaler for fp16, DDP's no_sync on all but the last
   micro-batch, optimizer step and zero_grad (`TrainingStep`, `backward`, `optimizer_step`);
   inference under torch.inference_mode when the configuration has it (`inference_context`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from autoopt.run.loaders import LOADER_KEYS, rebuild_dataloader
from autoopt.run.optimizers import rebuild_optimizer
from autoopt.torch_helpers import _autoopt_checkpoint_blocks, _autoopt_repeated_blocks
from autoopt.types import ExecConfig
from autoopt.workload import contract
from autoopt.workload.guard import UserCall

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DEFAULT_BUCKET_CAP_MB = 25.0  # torch.nn.parallel.DistributedDataParallel's default


# ---------------------------------------------------------------------------- process-wide settings
def read_process_settings() -> dict[str, Any]:
    """The process-wide torch settings a configuration may change, as they are now."""
    return {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "num_threads": torch.get_num_threads(),
    }


def write_process_settings(settings: dict[str, Any]) -> None:
    """Put these process-wide settings in force (what read_process_settings returned, or
    process_settings_for's result)."""
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    # the precision sets CUDA matmuls' TF32 flag itself; setting the flag again only where a
    # restored state says otherwise (writing both ways at once is an error in torch)
    want = settings.get("cuda_matmul_allow_tf32")
    if want is not None and torch.backends.cuda.matmul.allow_tf32 != bool(want):
        torch.backends.cuda.matmul.allow_tf32 = bool(want)
    torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
    if torch.backends.cudnn.allow_tf32 != bool(settings["cudnn_allow_tf32"]):
        torch.backends.cudnn.allow_tf32 = bool(settings["cudnn_allow_tf32"])
    if torch.get_num_threads() != settings["num_threads"]:
        torch.set_num_threads(int(settings["num_threads"]))


def process_settings_for(cfg: ExecConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """The process-wide settings `cfg` runs under, given those in force without it."""
    out = dict(defaults)
    if cfg.matmul_precision:
        out["matmul_precision"] = cfg.matmul_precision
        out["cuda_matmul_allow_tf32"] = None  # what the precision implies
        if cfg.device == "cuda":
            out["cudnn_allow_tf32"] = cfg.matmul_precision != "highest"
    if cfg.cudnn_benchmark is not None:
        out["cudnn_benchmark"] = bool(cfg.cudnn_benchmark)
    threads = cfg.num_threads or (cfg.dataloader or {}).get("intra_op_threads")
    if threads:
        out["num_threads"] = int(threads)
    return out


# ---------------------------------------------------------------------------- model
def apply_checkpointing(model) -> int:
    """Checkpoint the model's repeated blocks in place; the number newly wrapped (0: none)."""
    inner = getattr(model, "_orig_mod", model)
    todo = [b for b in _autoopt_repeated_blocks(inner) if not getattr(b, "_autoopt_checkpointed", False)]
    _autoopt_checkpoint_blocks(inner)
    return len(todo)


def place_model(model, cfg: ExecConfig, *, train: bool, device: Optional[str] = None):
    """The model on the device, in the configuration's weights dtype (inference only), memory
    format and with its repeated blocks checkpointed. Returns (model, checkpointed blocks)."""
    model = model.to(device or cfg.device)
    if cfg.weights_dtype and not train:
        model = model.to(DTYPES[cfg.weights_dtype])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    blocks = apply_checkpointing(model) if cfg.activation_checkpointing else 0
    return model, blocks


def compile_model(model, cfg: ExecConfig):
    """torch.compile in the configuration's mode (CUDA graphs are mode "reduce-overhead"), or
    the model unchanged. Returns (model, compiled)."""
    mode = cfg.compile_call_mode
    if mode is None:
        return model, False
    return torch.compile(model, mode=None if mode == "default" else mode, backend=cfg.compile_backend), True


def ddp_settings(settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A complete DDP settings dict: DistributedDataParallel's defaults, overridden by `settings`."""
    out = {"bucket_cap_mb": DEFAULT_BUCKET_CAP_MB, "gradient_as_bucket_view": False, "static_graph": False,
           "no_sync": False}
    out.update(settings or {})
    return out


def ddp_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for a DDP settings dict."""
    s = ddp_settings(settings)
    return {"bucket_cap_mb": float(s["bucket_cap_mb"]), "gradient_as_bucket_view": bool(s["gradient_as_bucket_view"]),
            "static_graph": bool(s["static_graph"])}


def wrap_ddp(model, cfg: ExecConfig, device_ids: Optional[list[int]] = None):
    """The model in DistributedDataParallel with the configuration's DDP settings (the process
    group must be initialised)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs(cfg.ddp or {}))


# ---------------------------------------------------------------------------- optimizer, loader, batches
def scale_lr(optimizer, scale: Optional[float], warmup_steps: int = 0):
    """Every parameter group's learning rate times `scale` (the batch-size transform's rule),
    reached by a linear warm-up over `warmup_steps` optimizer steps: a step pre-hook sets
    lr = target x (i + 1) / warmup_steps for step i < warmup_steps, then the target. A
    scheduler the user builds afterwards starts from the scaled lr."""
    if optimizer is None or not scale or scale == 1.0:
        return optimizer
    targets = []
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * scale
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * scale
        targets.append(g["lr"])
    if warmup_steps and warmup_steps > 0:
        state = {"step": 0}

        def warm(opt, args, kwargs):
            i = state["step"]
            if i <= warmup_steps:
                for g, target in zip(opt.param_groups, targets):
                    g["lr"] = target * min(1.0, (i + 1) / warmup_steps)
            state["step"] = i + 1

        optimizer.register_step_pre_hook(warm)
    return optimizer


def prepare_optimizer(optimizer, cfg: ExecConfig):
    """The optimizer rebuilt with the configuration's fused / foreach implementation (same
    class, groups, hyper-parameters and state), or unchanged; its learning rate scaled (with
    warm-up) by the configuration's lr_scale (scale_lr)."""
    if not cfg.optimizer_impl or optimizer is None:
        return scale_lr(optimizer, cfg.lr_scale, cfg.lr_warmup_steps)
    device = cfg.device
    for group in optimizer.param_groups:
        if group["params"]:
            device = group["params"][0].device.type
            break
    return scale_lr(rebuild_optimizer(optimizer, cfg.optimizer_impl, device), cfg.lr_scale, cfg.lr_warmup_steps)


def prepare_loader(loader, cfg: ExecConfig):
    """The DataLoader rebuilt with the configuration's workers / prefetch / persistence, and
    pinned memory on CUDA only (the same batches); unchanged without settings."""
    settings = cfg.dataloader
    if not settings:
        return loader
    kw = {k: settings[k] for k in LOADER_KEYS if k in settings}
    kw["pin_memory"] = bool(settings.get("pin_memory")) and cfg.device == "cuda"
    return rebuild_dataloader(loader, kw)


def copies_non_blocking(cfg: ExecConfig, loader=None) -> bool:
    """Host-to-device copies may be non-blocking: on CUDA, from pinned memory."""
    if cfg.device != "cuda":
        return False
    return bool(getattr(loader, "pin_memory", False)) or bool((cfg.dataloader or {}).get("non_blocking"))


def prepare_batch(batch, cfg: ExecConfig, *, train: bool, non_blocking: bool = False, device: Optional[str] = None):
    """A CPU batch on the device in the configuration's layout (channels_last 4-D inputs) and,
    for reduced-precision weights in inference, their dtype."""
    batch = contract.to_device(batch, device or cfg.device, non_blocking=non_blocking,
                               channels_last=cfg.channels_last)
    if cfg.weights_dtype and not train:
        dt = DTYPES[cfg.weights_dtype]
        batch = contract.map_tensors(batch, lambda t: t.to(dt) if t.is_floating_point() else t)
    return batch


# ---------------------------------------------------------------------------- the step
def autocast(cfg: ExecConfig, device_type: Optional[str] = None):
    """torch.autocast with the configuration's dtype (for forward and loss), else a no-op."""
    if not cfg.amp_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type or cfg.device, dtype=DTYPES[cfg.amp_dtype])


@contextlib.contextmanager
def inference_context(cfg: ExecConfig, device_type: Optional[str] = None):
    """For an inference forward: torch.inference_mode when the configuration has it, and autocast."""
    with contextlib.ExitStack() as stack:
        if cfg.inference_mode:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(cfg, device_type))
        yield


def make_scaler(cfg: ExecConfig, *, train: bool, existing=None, device_type: Optional[str] = None):
    """The GradScaler of a training step: the model file's own (GRAD_SCALER) when it has one,
    a new one when the configuration asks for loss scaling (fp16), else None."""
    if not train:
        return None
    if existing is not None:
        return existing
    if cfg.grad_scaler:
        return torch.amp.GradScaler(device_type or cfg.device)
    return None


def backward(loss, *, accum_steps: int = 1, scaler=None) -> None:
    """loss.backward(), divided over the micro-batches and scaled by the GradScaler when
    there are any."""
    if accum_steps > 1:
        loss = loss / accum_steps
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(optimizer, scaler=None, *, detect_skip: bool = False) -> bool:
    """optimizer.step() (through the GradScaler when there is one) and zero_grad. With
    detect_skip, returns False when the GradScaler skipped the step (inf/NaN gradients);
    reading the scale waits for the device, so timed steps never ask."""
    stepped = True
    if scaler is not None:
        before = scaler.get_scale() if detect_skip else None
        scaler.step(optimizer)
        scaler.update()
        if detect_skip:
            stepped = scaler.get_scale() >= before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


class TrainingStep:
    """One optimizer step over a list of micro-batches (one, without gradient accumulation):
    forward and loss under autocast, the loss divided by the number of micro-batches,
    backward (scaled for fp16), DDP's no_sync around all but the last micro-batch, then the
    optimizer step. With count_skips (verification), counts the steps the GradScaler skipped;
    with a `monitor` (verification), reads gradient health around the optimizer step."""

    def __init__(self, spec, model, optimizer, cfg: ExecConfig, *, scaler=None, ddp=None):
        self.spec = spec
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.scaler = scaler
        self.ddp = ddp  # the DistributedDataParallel wrapper, for no_sync
        self.count_skips = False
        self.skipped_steps = 0
        self.monitor = None  # an autoopt.run.health.HealthMonitor on verification steps only

    def _micro_context(self, index: int, count: int):
        if self.ddp is not None and (self.cfg.ddp or {}).get("no_sync") and index < count - 1:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def __call__(self, batches: list, *, on_outputs: Optional[Callable[[Any], None]] = None) -> torch.Tensor:
        """Returns the step's loss (the mean over its micro-batches), detached. `on_outputs`
        receives the first micro-batch's forward result (for verification)."""
        total = None
        n = len(batches)
        for j, b in enumerate(batches):
            with self._micro_context(j, n):
                with autocast(self.cfg):
                    out = contract.call_forward(self.spec, self.model, b)
                    loss = contract.extract_loss(out)
                if j == 0 and on_outputs is not None:
                    on_outputs(out)
                with UserCall(self.spec.path, "backward"):
                    backward(loss, accum_steps=n, scaler=self.scaler)
            part = loss.detach() / n if n > 1 else loss.detach()
            total = part if total is None else total + part
        if self.monitor is not None:
            self.monitor.before_step()
        with UserCall(self.spec.path, "build_optimizer"):
            stepped = optimizer_step(self.optimizer, self.scaler, detect_skip=self.count_skips)
        if self.monitor is not None:
            self.monitor.after_step(stepped)
        if not stepped:
            self.skipped_steps += 1
        return total
