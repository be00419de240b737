"""`threads`: the intra-op thread count of the process (`torch.set_num_threads`), on its own.

PyTorch starts as many intra-op threads as the process has cores. When other work holds
some of them (another job, a compile, the DataLoader's workers), threads that outnumber the
free cores wait on each other at every parallel region's barrier: on a 2-core machine with
other work on one core, ResNet-18 steps at batch 16 took 382-4,333 ms with two threads and
124-136 ms with one. Fewer threads than cores is then faster, and far steadier.

Params: `num_threads` (default: the cores free of other work, from the facts
`env.cpus_free`; the search also measures one thread, and half the current count).
Config: `ExecConfig.num_threads`; the applier sets it with `torch.set_num_threads` and
restores the process's count afterwards. It wins over the `dataloader` transform's
`intra_op_threads` (and comes after it in a patch, so the patched file agrees).

Patch: `torch.set_num_threads(n)` at module level after the imports.

Safety: safe. Tolerance 1e-4 relative: the thread count changes only the order of fp32
reductions inside kernels.
"""
from __future__ import annotations

from typing import Optional

from autoopt.env import available_cpus
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


def thread_options(current: int, free: int) -> list[int]:
    """Thread counts worth measuring below `current`: the free cores first, then one, then
    half the current count (distinct, each at least 1)."""
    out: list[int] = []
    for n in (free, 1, current // 2):
        n = max(1, int(n))
        if n < current and n not in out:
            out.append(n)
    return out


class Threads(Transform):
    name = "threads"

    @staticmethod
    def _counts(workload: Workload) -> tuple[int, int]:
        """(current intra-op threads, cores free of other work)."""
        facts = workload_facts(workload)
        current = int(facts.get("env.num_threads") or 0)
        if not current:
            import torch

            current = torch.get_num_threads()
        free = facts.get("env.cpus_free")
        if free is None:
            free = int(facts.get("workload.cpu_count") or available_cpus())
        return current, max(1, int(free))

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        unknown = set(params) - {"num_threads"}
        if unknown:
            return f"unknown threads settings: {', '.join(sorted(unknown))} (threads takes num_threads)"
        n = params.get("num_threads")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            return f"num_threads must be a whole number of threads, 1 or more, not {n!r}"
        current, free = self._counts(workload)
        if n is None and not thread_options(current, free):
            return f"the process already runs {current} intra-op thread{'s' if current != 1 else ''}"
        if n is not None and n == current:
            return f"the process already runs {current} intra-op threads"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        if params.get("num_threads") is not None:
            return {"num_threads": int(params["num_threads"])}
        current, free = self._counts(workload)
        options = thread_options(current, free)
        return {"num_threads": options[0] if options else current}

    def candidates(self, workload: Workload, caps: Capabilities, params: dict) -> list[dict]:
        if params.get("num_threads") is not None:
            return [self.resolve_params(workload, caps, params)]
        current, free = self._counts(workload)
        return [{"num_threads": n} for n in thread_options(current, free)] or [
            self.resolve_params(workload, caps, params)]

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        n = params.get("num_threads")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"threads needs num_threads >= 1, not {n!r}")
        return cfg.with_(num_threads=n)

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        editor.add_statements(
            f"torch.set_num_threads({int(params['num_threads'])})\n",
            comment="autoopt (threads): intra-op threads sized to the cores free of other work",
        )

    def caveat(self, params: dict, mode: str = "train") -> str:
        return (f"{params.get('num_threads')} intra-op thread(s) was fastest on this machine under its load at the "
                "time; on a machine with more free cores, measure again")
