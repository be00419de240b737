"""Turns a Workload and an ExecConfig into a runnable step.

This is the single place where an ExecConfig's fields take effect, in this order: seed,
build_model, .to(device), weights dtype, channels_last, activation checkpointing,
build_optimizer, optimizer implementation, TF32 / cuDNN flags, torch.compile, and in the
step: autocast around forward and loss only, GradScaler, gradient accumulation,
inference_mode. Global torch settings changed by a Session are restored when it closes,
so variants measured one after another in the same process do not leak into each other.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator, Optional

import torch

from autoopt.workload import contract
from autoopt.types import ExecConfig, Workload

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def seeded_batch(workload: Workload, batch_size: int, index: int):
    """The index-th verification/timing batch: make_batch under a seed derived from the run's
    seed, so the baseline and every variant see exactly the same data."""
    torch.manual_seed(workload.seed + 1000 + index)
    return workload.spec.make_batch(batch_size)


def weights_checksum(model: torch.nn.Module) -> str:
    """A checksum of the initial parameters, to prove a variant starts from the baseline's weights."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        if isinstance(p, torch.Tensor):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error from the allocator (GPU or CPU)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Release what a failed (out-of-memory) try left behind, so the next one starts clean."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# Sessions open at the moment, oldest first: a Session built while another is open (side-by-side
# measurement) must take the process's own settings as its defaults, not the other one's.
_OPEN: list["Session"] = []


class Session:
    """One configuration of one workload, built and ready to step.

    Use as a context manager: global settings (matmul precision, cuDNN flags, thread count)
    are restored on exit and DataLoader workers are shut down.
    """

    def __init__(self, workload: Workload, cfg: ExecConfig, *, build_loader: bool = True):
        self.workload = workload
        self.cfg = cfg
        self.spec = workload.spec
        self.device = cfg.device
        self.train = workload.mode == "train"
        self._saved: dict[str, Any] = {}
        self._loader = None
        self._loader_iter: Optional[Iterator] = None
        self.compiled = False
        self.checkpointed_blocks = 0
        self.notes: list[str] = []
        try:
            self._build(build_loader)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ build
    def _save_globals(self) -> None:
        if _OPEN:
            self._saved = dict(_OPEN[0]._saved)  # the settings from before any session
            _OPEN.append(self)
            return
        _OPEN.append(self)
        self._saved = {
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "num_threads": torch.get_num_threads(),
        }

    def _build(self, build_loader: bool) -> None:
        cfg, spec = self.cfg, self.spec
        self._save_globals()
        torch.manual_seed(self.workload.seed)
        model = spec.build_model()
        self.initial_checksum = weights_checksum(model)
        model = model.to(cfg.device)
        if cfg.weights_dtype and not self.train:
            model = model.to(DTYPES[cfg.weights_dtype])
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.activation_checkpointing:
            from autoopt.transforms.activation_checkpointing import apply_checkpointing

            self.checkpointed_blocks = apply_checkpointing(model)
        if self.train:
            model.train()
            self.optimizer = spec.build_optimizer(model)
            if cfg.optimizer_impl:
                from autoopt.transforms.fused_optimizer import rebuild_optimizer

                self.optimizer = rebuild_optimizer(self.optimizer, cfg.optimizer_impl, cfg.device)
        else:
            model.eval()
            self.optimizer = None
        self.activate()
        self.eager_model = model
        if cfg.compile_mode or cfg.cuda_graphs:
            mode = "reduce-overhead" if cfg.cuda_graphs else cfg.compile_mode
            mode = None if mode == "default" else mode
            model = torch.compile(model, mode=mode, backend=cfg.compile_backend)
            self.compiled = True
        self.model = model
        scaler = getattr(spec.module, "GRAD_SCALER", None)
        if self.train and cfg.grad_scaler and scaler is None:
            scaler = torch.amp.GradScaler(cfg.device)
        self.scaler = scaler if self.train else None
        self.accum = max(1, int(cfg.grad_accum_steps))
        if build_loader and spec.build_dataloader is not None:
            torch.manual_seed(self.workload.seed)
            loader = spec.build_dataloader(cfg.batch_size)
            if cfg.dataloader:
                from autoopt.transforms.dataloader import rebuild_dataloader

                loader = rebuild_dataloader(loader, cfg.dataloader)
            self._loader = loader
        self._pin = bool(getattr(self._loader, "pin_memory", False)) and cfg.device == "cuda"
        self._fixed: list[Any] = []

    def activate(self) -> None:
        """Put this configuration's process-wide settings in force (TF32 / cuDNN flags, the
        intra-op thread count). Called at build time, and again before stepping when two
        sessions take turns in one process (side-by-side measurement)."""
        cfg = self.cfg
        saved = self._saved
        torch.set_float32_matmul_precision(cfg.matmul_precision or saved["matmul_precision"])
        if cfg.device == "cuda":
            torch.backends.cudnn.allow_tf32 = (
                cfg.matmul_precision != "highest" if cfg.matmul_precision else saved["cudnn_allow_tf32"])
        torch.backends.cudnn.benchmark = (
            cfg.cudnn_benchmark if cfg.cudnn_benchmark is not None else saved["cudnn_benchmark"])
        threads = (cfg.dataloader or {}).get("intra_op_threads")
        torch.set_num_threads(int(threads) if threads else saved["num_threads"])

    # ------------------------------------------------------------------ batches
    def prepare(self, batch):
        """Move a CPU batch to the device in this configuration's layout and dtype."""
        batch = contract.to_device(
            batch, self.device, non_blocking=self._pin, channels_last=self.cfg.channels_last
        )
        if self.cfg.weights_dtype and not self.train:
            dt = DTYPES[self.cfg.weights_dtype]
            batch = contract.map_tensors(batch, lambda t: t.to(dt) if t.is_floating_point() else t)
        return batch

    def _next_batch(self):
        if self._loader is not None:
            if self._loader_iter is None:
                self._loader_iter = iter(self._loader)
            try:
                return self.prepare(next(self._loader_iter))
            except StopIteration:
                self._loader_iter = iter(self._loader)
                return self.prepare(next(self._loader_iter))
        if not self._fixed:
            # A few distinct batches, made once, already on the device: the step measures
            # the model, not make_batch.
            self._fixed = [self.prepare(seeded_batch(self.workload, self.cfg.batch_size, i)) for i in range(2)]
            self._fixed_i = 0
        b = self._fixed[self._fixed_i % len(self._fixed)]
        self._fixed_i += 1
        return b

    # ------------------------------------------------------------------ steps
    def autocast(self):
        if self.cfg.amp_dtype:
            return torch.autocast(device_type=self.device, dtype=DTYPES[self.cfg.amp_dtype])
        return contextlib.nullcontext()

    def forward(self, batch):
        with self.autocast():
            return contract.call_forward(self.spec, self.model, batch)

    def micro_batch_context(self, index: int, count: int):
        """Around the forward and backward of micro-batch `index` of `count` (DDP's no_sync
        for all but the last, in a distributed session)."""
        return contextlib.nullcontext()

    def train_on(self, batches: list) -> torch.Tensor:
        """One optimizer step over len(batches) micro-batches (gradient accumulation)."""
        loss_total = None
        n = len(batches)
        for j, b in enumerate(batches):
            with self.micro_batch_context(j, n):
                with self.autocast():
                    out = contract.call_forward(self.spec, self.model, b)
                    loss = contract.extract_loss(out)
                    if n > 1:
                        loss = loss / n
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total

    def infer_on(self, batch):
        ctx = torch.inference_mode() if self.cfg.inference_mode else contextlib.nullcontext()
        with ctx:
            return self.forward(batch)

    def step(self):
        """One timed unit of work: a training step (with its micro-batches), or one inference forward."""
        if self.train:
            return self.train_on([self._next_batch() for _ in range(self.accum)])
        return self.infer_on(self._next_batch())

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * (self.accum if self.train else 1)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        it = self._loader_iter
        self._loader_iter = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            with contextlib.suppress(Exception):
                it._shutdown_workers()
        if self in _OPEN:
            _OPEN.remove(self)
            if _OPEN:  # another session is still open: its settings are in force again
                self._saved = {}
                _OPEN[-1].activate()
        if self._saved:
            torch.set_float32_matmul_precision(self._saved["matmul_precision"])
            torch.backends.cudnn.benchmark = self._saved["cudnn_benchmark"]
            torch.backends.cudnn.allow_tf32 = self._saved["cudnn_allow_tf32"]
            torch.backends.cuda.matmul.allow_tf32 = self._saved["cuda_matmul_allow_tf32"]
            torch.set_num_threads(self._saved["num_threads"])
            self._saved = {}

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

