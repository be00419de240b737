"""`dataloader`: a faster input pipeline with the same batches — worker processes sized to
the cores actually available, pinned memory with non-blocking copies on CUDA, persistent
workers and a prefetch depth — rebuilt from the user's `build_dataloader`.

Workers and the main process's intra-op threads share the same cores: on a 2-core
machine two workers beside two compute threads measured no faster than no workers at
all (they thrash), while two workers beside one compute thread ran 1.8x faster. So the
settings budget both together (`choose_settings`) and carry `intra_op_threads`, which
the applier sets with `torch.set_num_threads`.

Params: the settings dict — `num_workers`, `pin_memory`, `persistent_workers`,
`prefetch_factor`, `intra_op_threads`, `non_blocking` (copy with non_blocking=True,
meaningful with pinned memory). Defaults from `choose_settings`.

Config: `ExecConfig.dataloader`; the applier rebuilds what `build_dataloader` returned
(autoopt.run.loaders.rebuild_dataloader) and sets `torch.set_num_threads(intra_op_threads)`.

Patch: the `DataLoader(...)` call in `build_dataloader` gets the keyword arguments, and
`torch.set_num_threads(n)` goes at module level after the imports.

Same batches: the rebuilt loader keeps the dataset, sampler (with its generator),
batch_size, drop_last, collate_fn, worker_init_fn and generator; the random order is
drawn from the same RNG whatever the worker count, epoch after epoch (persistent workers
make the RNG draw fresh workers would; the patched file's plain DataLoader with
persistent workers yields the same first epoch and equally random later ones). A dataset whose __getitem__ draws
random numbers (augmentation) draws them in the workers, from per-worker seeds, so its
samples are random either way but not the same numbers. An iterable-style dataset is
not given workers (each worker would yield the whole stream again).

Safety: safe. Tolerance 1e-4 relative: the same batches; only the intra-op thread count
changes the order of fp32 reductions inside kernels.
"""
from __future__ import annotations

from typing import Optional

from autoopt.env import available_cpus
from autoopt.run.loaders import SETTING_KEYS
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts

MAX_WORKERS = 8


def choose_settings(cpu_count: int, device_type: str, current: dict) -> dict:
    """DataLoader settings and the intra-op thread count, budgeted over `cpu_count` cores.

    - CUDA: the math runs on the GPU; the main process needs a core to launch kernels,
      the others load data (at most 8 workers); leftover cores are intra-op threads for
      the CPU ops that remain. Pinned memory and non-blocking copies.
    - CPU: the math needs cores too. Half the cores (one below 4 cores) are intra-op
      threads and the rest, at least two, are workers — on 2 cores: two workers and one
      thread (measured 1.8x over no workers; two threads with two workers thrash).
    - One core: nothing to overlap; no workers.

    `current` (the loader's settings, plus `intra_op_threads` when known) is only used
    to keep a prefetch depth the user set higher.
    """
    cpus = max(1, int(cpu_count))
    current = current or {}
    if device_type == "cuda":
        workers = min(MAX_WORKERS, max(1, cpus - 1))
        threads = max(1, cpus - workers)
        pin = True
    elif cpus <= 1:
        workers, threads, pin = 0, 1, False
    else:
        threads = max(1, cpus // 2) if cpus >= 4 else 1
        workers = min(MAX_WORKERS, max(2, cpus - threads))
        pin = False
    out = {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
        "prefetch_factor": None,
        "intra_op_threads": threads,
        "non_blocking": pin,
    }
    if workers > 0:
        depth = 4 if workers <= 2 else 2
        user = current.get("prefetch_factor") if current.get("num_workers") else None
        out["prefetch_factor"] = max(depth, user or 0)
    return out


def candidate_settings(cpu_count: int, device_type: str, current: dict) -> list[dict]:
    """choose_settings first, then the same with half the workers (a loader that needs
    fewer workers leaves those cores to the math)."""
    first = choose_settings(cpu_count, device_type, current)
    out = [first]
    w = first["num_workers"]
    if w > 1:
        half = dict(first, num_workers=max(1, w // 2))
        if device_type != "cuda":
            half["prefetch_factor"] = 4 if half["num_workers"] <= 2 else 2
        out.append(half)
    return out


def _current(workload: Workload) -> dict:
    facts = workload_facts(workload)
    info = dict(facts.get("_dataloader") or {})
    if "workload.dataloader_workers" in facts and facts["workload.dataloader_workers"] is not None:
        info.setdefault("num_workers", facts["workload.dataloader_workers"])
    if facts.get("env.num_threads") is not None:
        info["intra_op_threads"] = facts["env.num_threads"]
    return info


class Dataloader(Transform):
    name = "dataloader"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        if workload.spec.build_dataloader is None:
            return "the model file has no build_dataloader(), so there is no input pipeline to tune"
        cur = _current(workload)
        if cur and cur.get("is_dataloader") is False:
            return f"build_dataloader() returns a {cur.get('type')}, not a torch DataLoader"
        unknown = set(params) - set(SETTING_KEYS)
        if unknown:
            return f"unknown dataloader settings: {', '.join(sorted(unknown))}"
        want = self.resolve_params(workload, caps, params)
        if cur.get("iterable_dataset") and not want.get("pin_memory"):
            return "the dataset is iterable-style (no workers can be added without duplicating it)"
        if want["num_workers"] == 0 and not want.get("pin_memory"):
            return f"only {self._cpus(workload)} CPU core is available: no room for loader workers"
        same = all(cur.get(k) == want.get(k) for k in ("num_workers", "pin_memory", "persistent_workers"))
        if same and cur.get("intra_op_threads") in (None, want.get("intra_op_threads")):
            return "the DataLoader already uses these settings"
        return None

    @staticmethod
    def _cpus(workload: Workload) -> int:
        return int(workload_facts(workload).get("workload.cpu_count") or available_cpus())

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        cur = _current(workload)
        out = choose_settings(self._cpus(workload), caps.device_type, cur)
        out.update({k: v for k, v in (params or {}).items() if k in SETTING_KEYS})
        if cur.get("iterable_dataset"):
            out.update(num_workers=0, persistent_workers=False, prefetch_factor=None)
        return out

    def candidates(self, workload: Workload, caps: Capabilities, params: dict) -> list[dict]:
        if params:
            return [self.resolve_params(workload, caps, params)]
        cur = _current(workload)
        if cur.get("iterable_dataset"):
            return [self.resolve_params(workload, caps, params)]
        return candidate_settings(self._cpus(workload), caps.device_type, cur)

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        unknown = set(params) - set(SETTING_KEYS)
        if unknown:
            raise ValueError(f"unknown dataloader settings: {', '.join(sorted(unknown))}")
        return cfg.with_(dataloader=dict(params))

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        workers = int(params.get("num_workers") or 0)
        kwargs = {"num_workers": str(workers), "pin_memory": str(bool(params.get("pin_memory")))}
        remove = set()
        if workers > 0:
            kwargs["persistent_workers"] = str(bool(params.get("persistent_workers", True)))
            if params.get("prefetch_factor") is not None:
                kwargs["prefetch_factor"] = str(int(params["prefetch_factor"]))
        else:
            remove = {"persistent_workers", "prefetch_factor"}
        editor.add_call_kwargs("build_dataloader", {"DataLoader"}, kwargs, remove=remove)
        threads = params.get("intra_op_threads")
        if threads:
            editor.ensure_import("torch")
            editor.add_statements(
                f"torch.set_num_threads({int(threads)})\n",
                comment="autoopt (dataloader): intra-op threads budgeted with the loader workers",
            )
