"""Rebuilding a DataLoader with other worker / pinning / prefetch settings that yields the
same batches (the same dataset, sampler, generator and collate_fn; persistent workers that
draw from the RNG like fresh ones)."""
from __future__ import annotations

LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
SETTING_KEYS = (*LOADER_KEYS, "intra_op_threads", "non_blocking")


def _same_order_loader_class():
    from torch.utils.data import DataLoader

    class SameOrderDataLoader(DataLoader):
        """A DataLoader whose persistent workers draw from the RNG like fresh workers.

        A fresh iterator (every epoch without persistent workers) draws its workers' base
        seed from the loader's generator (or the global RNG) before the sampler draws the
        shuffle order; a persistent iterator skips that draw from the second epoch on, which
        shifts every later shuffle. This subclass makes the same draw, so each epoch yields
        exactly the batches the original loader would."""

        def __iter__(self):
            if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
                import torch

                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            return super().__iter__()

    return SameOrderDataLoader


_SAME_ORDER = None


def _loader_class():
    global _SAME_ORDER
    if _SAME_ORDER is None:
        _SAME_ORDER = _same_order_loader_class()
    return _SAME_ORDER


def rebuild_dataloader(loader, settings: dict):
    """A DataLoader over the same dataset, sampler / batch sampler, batch_size,
    collate_fn, drop_last, worker_init_fn, generator and timeout, yielding the same
    batches, with num_workers / pin_memory / persistent_workers / prefetch_factor from
    `settings` (intra_op_threads and non_blocking are for the runner). Raises ValueError
    when `loader` is not a torch DataLoader, or workers are asked for an iterable-style
    dataset."""
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data.sampler import BatchSampler

    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"build_dataloader() returns a {type(loader).__name__}, not a torch.utils.data.DataLoader, "
            "so its settings cannot be changed"
        )
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        raise ValueError(f"unknown dataloader settings: {', '.join(sorted(unknown))}")
    workers = int(settings.get("num_workers", loader.num_workers) or 0)
    if workers > 0 and isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "the dataset is iterable-style: every worker would yield the whole stream again, "
            "changing what the loader yields"
        )
    kw = dict(
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=bool(settings.get("pin_memory", loader.pin_memory)),
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
    if workers > 0:
        kw["persistent_workers"] = bool(settings.get("persistent_workers", True))
        pf = settings.get("prefetch_factor")
        if pf is not None:
            kw["prefetch_factor"] = int(pf)
        kw["multiprocessing_context"] = loader.multiprocessing_context
    if hasattr(loader, "in_order"):
        kw["in_order"] = loader.in_order
    cls = _loader_class()
    if isinstance(loader.dataset, IterableDataset):
        return cls(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **kw)
    if loader.batch_size is None and loader.batch_sampler is not None:
        # a user batch_sampler (automatic batching off at the DataLoader level)
        return cls(loader.dataset, batch_sampler=loader.batch_sampler, **kw)
    if loader.batch_size is not None and not (
        type(loader.batch_sampler) is BatchSampler and loader.batch_sampler.sampler is loader.sampler
    ):
        return cls(loader.dataset, batch_sampler=loader.batch_sampler, **kw)
    return cls(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=loader.sampler,
        drop_last=loader.drop_last,
        **kw,
    )
