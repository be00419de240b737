"""Step-time breakdown with torch-tb-profiler's categories and priority.

Each instant of a step goes to the first category active at that instant, in the order
kernel > memcpy > memset > communication > runtime > dataloader > cpu_exec > other, so
the categories sum to the step time (torch-tb-profiler's OverallParser). DataLoader time is
found in PyTorch 2 traces too, where `enumerate(DataLoader)#...__next__` is a user
annotation that torch-tb-profiler drops.
"""
from __future__ import annotations

import numpy as np

from autoopt.analyze import intervals as I
from autoopt.analyze import trace as T
from autoopt.analyze.steps import Steps

ROLES = ("kernel", "memcpy", "memset", "communication", "runtime", "dataloader", "cpu_exec", "other")
COMM_OP_PREFIXES = ("nccl:", "gloo:", "mpi:", "c10d::", "record_param_comms")


def is_comm_kernel_name(name: str) -> bool:
    n = name.lower()
    return "nccl" in n or "rccl" in n


def comm_kernel_mask(tr: T.Trace) -> np.ndarray:
    k = tr.kind == T.KERNEL
    kid = np.unique(tr.name[k])
    ids = np.asarray([i for i in kid.tolist() if is_comm_kernel_name(tr.names[i])], dtype=np.int64)
    return k & tr.has_name(ids)


def dataloader_mask(tr: T.Trace) -> np.ndarray:
    ids = tr.name_ids(lambda s: (s.startswith("enumerate(DataLoader)#") and s.endswith(".__next__"))
                      or s.startswith("enumerate(DataPipe)#"))
    return tr.mask(T.OP, T.ANNO) & tr.has_name(ids)


def role_masks(tr: T.Trace) -> list[np.ndarray]:
    comm_k = comm_kernel_mask(tr)
    comm_ops = tr.mask(T.OP, T.ANNO) & tr.has_name(tr.name_ids(lambda s: s.startswith(COMM_OP_PREFIXES)))
    dl = dataloader_mask(tr)
    cpu = tr.mask(T.OP, T.ANNO) & ~dl & ~comm_ops
    return [
        (tr.kind == T.KERNEL) & ~comm_k,
        tr.kind == T.MEMCPY,
        tr.kind == T.MEMSET,
        comm_k | comm_ops,
        tr.kind == T.RUNTIME,
        dl,
        cpu,
    ]


def breakdown(tr: T.Trace, st: Steps) -> dict:
    """Per-step costs (us) by role; `per_step` is a (steps x 8) array, rows sum to step durations."""
    masks = role_masks(tr)
    ivs = [I.merge(tr.ts[m], tr.end[m]) for m in masks]
    pts = [st.starts, st.ends] + [a for iv in ivs for a in iv]
    pts = np.unique(np.concatenate(pts))
    n = st.count
    per_step = np.zeros((n, len(ROLES)))
    if pts.size >= 2:
        mid = (pts[:-1] + pts[1:]) / 2
        seg = np.diff(pts)
        step = st.index_of(mid)
        inside = step >= 0
        label = np.full(mid.size, len(ROLES) - 1, dtype=np.int64)
        assigned = np.zeros(mid.size, dtype=bool)
        for r, iv in enumerate(ivs):
            c = I.covered(iv, mid) & ~assigned
            label[c] = r
            assigned |= c
        flat = step[inside] * len(ROLES) + label[inside]
        per_step = np.bincount(flat, weights=seg[inside], minlength=n * len(ROLES)).reshape(n, len(ROLES))
    return {"per_step_us": per_step, "intervals": ivs, "masks": masks}
