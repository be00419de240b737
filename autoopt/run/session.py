"""A Session: one configuration of one workload, built through the applier and ready to step.

The Session seeds torch, calls the model file's functions (build_model, build_optimizer,
build_dataloader) and hands what they return to autoopt.run.apply, which turns the
ExecConfig into torch. In a distributed job (`dist`), the model is wrapped in
DistributedDataParallel and every rank draws its own batches.

Process-wide settings a Session changes are restored when it closes. Sessions can be open
side by side (alternating-round measurement): each takes the settings from before any
session as its defaults, `activate()` puts its own in force before it steps, and closing one
puts the other's back.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from autoopt.run import apply
from autoopt.types import ExecConfig, Workload
from autoopt.workload import contract
from autoopt.workload.guard import UserCall


def seeded_batch(workload: Workload, batch_size: int, index: int, rank: int = 0):
    """The index-th verification/timing batch of a rank: make_batch under a seed derived from
    the run's seed (and the rank), so the baseline and every variant see exactly the same
    data. Rank 0's batches are the single-process ones."""
    torch.manual_seed(workload.seed + 1000 + index + 7919 * rank)
    with UserCall(workload.spec.path, "make_batch"):
        return workload.spec.make_batch(batch_size)


def split_batch(batch, k: int) -> list:
    """k equal micro-batches of a batch (tensors split along dim 0)."""
    n = contract.batch_len(batch)
    if k <= 1 or n is None:
        return [batch]
    m = n // k

    def part(j):
        return contract.map_tensors(batch, lambda t: t[j * m:(j + 1) * m] if t.dim() > 0 and t.shape[0] == n else t)

    return [part(j) for j in range(k)]


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


@dataclass
class DistContext:
    """This process's place in a distributed job (the process group is initialised)."""

    rank: int
    device_ids: Optional[list[int]] = None
    before_step: Optional[Callable[[], None]] = None  # e.g. stop when the launcher asked to


# Sessions open at the moment, oldest first (see the module docstring).
_OPEN: list["Session"] = []


class Session:
    """One configuration of one workload, built and ready to step. A context manager."""

    def __init__(self, workload: Workload, cfg: ExecConfig, *, build_loader: bool = True,
                 dist: Optional[DistContext] = None):
        self.workload = workload
        self.cfg = cfg
        self.spec = workload.spec
        self.device = cfg.device
        self.train = workload.mode == "train"
        self.dist = dist
        self.rank = dist.rank if dist else 0
        self._defaults: dict[str, Any] = {}
        self._loader = None
        self._loader_iter: Optional[Iterator] = None
        self._fixed: list[Any] = []
        self._fixed_i = 0
        self.ddp = None
        try:
            self._build(build_loader)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ build
    def _open(self) -> None:
        self._defaults = dict(_OPEN[0]._defaults) if _OPEN else apply.read_process_settings()
        _OPEN.append(self)

    def _build(self, build_loader: bool) -> None:
        cfg, spec = self.cfg, self.spec
        self._open()
        torch.manual_seed(self.workload.seed)
        with UserCall(spec.path, "build_model"):
            model = spec.build_model()
        self.initial_checksum = weights_checksum(model)
        model, self.checkpointed_blocks = apply.place_model(model, cfg, train=self.train)
        model.train(self.train)
        self.optimizer = None
        if self.train:
            with UserCall(spec.path, "build_optimizer"):
                built = spec.build_optimizer(model)
            self.optimizer = apply.prepare_optimizer(built, cfg)
        self.activate()
        self.eager_model = model
        if self.dist is not None and self.train:
            self.ddp = model = apply.wrap_ddp(model, cfg, self.dist.device_ids)
        self.model, self.compiled = apply.compile_model(model, cfg)
        self.scaler = apply.make_scaler(cfg, train=self.train, existing=getattr(spec.module, "GRAD_SCALER", None))
        self.accum = max(1, int(cfg.grad_accum_steps)) if self.train else 1
        self.training_step = apply.TrainingStep(spec, self.model, self.optimizer, cfg, scaler=self.scaler,
                                                ddp=self.ddp) if self.train else None
        if build_loader and spec.build_dataloader is not None:
            torch.manual_seed(self.workload.seed)
            with UserCall(spec.path, "build_dataloader"):
                loader = spec.build_dataloader(cfg.batch_size)
            self._loader = apply.prepare_loader(loader, cfg)
        self._non_blocking = apply.copies_non_blocking(cfg, self._loader)

    def activate(self) -> None:
        """Put this configuration's process-wide settings in force (TF32 / cuDNN flags, the
        intra-op thread count). Called at build time, and again before stepping when two
        sessions take turns in one process."""
        apply.write_process_settings(apply.process_settings_for(self.cfg, self._defaults))

    # ------------------------------------------------------------------ batches
    def prepare(self, batch):
        """Move a CPU batch to the device in this configuration's layout and dtype."""
        return apply.prepare_batch(batch, self.cfg, train=self.train, non_blocking=self._non_blocking)

    def next_batch(self):
        """The next batch of the step: from the model file's DataLoader when it has one, else
        one of two fixed batches made once (already on the device: the step measures the
        model, not make_batch)."""
        if self._loader is not None:
            with UserCall(self.spec.path, "build_dataloader"):
                if self._loader_iter is None:
                    self._loader_iter = iter(self._loader)
                try:
                    batch = next(self._loader_iter)
                except StopIteration:
                    self._loader_iter = iter(self._loader)
                    batch = next(self._loader_iter)
            return self.prepare(batch)
        if not self._fixed:
            self._fixed = [self.prepare(seeded_batch(self.workload, self.cfg.batch_size, i, self.rank))
                           for i in range(2)]
        b = self._fixed[self._fixed_i % len(self._fixed)]
        self._fixed_i += 1
        return b

    # ------------------------------------------------------------------ steps
    def autocast(self):
        return apply.autocast(self.cfg)

    def forward(self, batch):
        with self.autocast():
            return contract.call_forward(self.spec, self.model, batch)

    def train_on(self, batches: list, **kw) -> torch.Tensor:
        """One optimizer step over len(batches) micro-batches (gradient accumulation)."""
        return self.training_step(batches, **kw)

    def infer_on(self, batch):
        with apply.inference_context(self.cfg):
            return contract.call_forward(self.spec, self.model, batch)

    def step(self):
        """One timed unit of work: a training step (with its micro-batches), or one inference forward."""
        if self.dist is not None and self.dist.before_step is not None:
            self.dist.before_step()
        if self.train:
            return self.train_on([self.next_batch() for _ in range(self.accum)])
        return self.infer_on(self.next_batch())

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * self.accum

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
                _OPEN[-1].activate()
            else:
                apply.write_process_settings(self._defaults)
        self._defaults = {}

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
