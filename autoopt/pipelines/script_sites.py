"""Where in a profiled script things happen: the script's source lines, from live frames and
from the trace's stacks.

`_user_frame_site` names the innermost frame of the user's code on the live stack (the hooks
in autoopt.pipelines.script call it at the model's forward and the optimizer's step);
`_site_mode` watches one warm-up step for host syncs, data-dependent operators and DataLoader
collation, with exact lines; `trace_sites` reads the same from a trace's python_function
stacks (function-level) where the warm-up step saw nothing.
"""
from __future__ import annotations

import collections
import sys
from typing import Optional

from autoopt.scripting.facts import user_frame_site as _user_frame_site

_SYNC_FUNCS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"})
_DATA_DEP_FUNCS = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"})


def _site_mode(sites: dict[str, collections.Counter]):
    """A TorchFunctionMode that notes the script's source line of every host sync
    (.item(), .tolist(), bool(tensor), ...), data-dependent operator and DataLoader batch
    collation during one (unprofiled) warm-up step — live frames, so exact lines."""
    import torch
    from torch.overrides import TorchFunctionMode

    class _SiteMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            key = None
            if name in _SYNC_FUNCS:
                key = "sync"
            elif name == "cpu" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                key, name = "sync", "cpu"
            elif name in _DATA_DEP_FUNCS:
                key = "data_dependent"
            elif name == "__getitem__" and len(args) > 1 and _bool_index(args[1]):
                key, name = "data_dependent", "boolean indexing"
            elif name == "stack" and _called_from_collate():
                key, name = "dataloader", "DataLoader batch"
            if key is not None:
                site = _user_frame_site(2)
                if site:
                    sites[key][(site, name)] += 1
            return func(*args, **(kwargs or {}))

    return _SiteMode()


def _bool_index(idx) -> bool:
    import torch

    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _called_from_collate() -> bool:
    f = sys._getframe(2)
    for _ in range(8):
        if f is None:
            return False
        if f.f_code.co_filename.replace("\\", "/").endswith("utils/data/_utils/collate.py"):
            return True
        f = f.f_back
    return False


# ------------------------------------------------------------------------------- trace stacks
_DATA_DEPENDENT = frozenset({"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2",
                             "aten::unique_consecutive", "aten::nonzero_static"})
_SYNC_OPS = frozenset({"aten::item", "aten::_local_scalar_dense"})


def trace_sites(trace_path: str) -> dict[str, list[str]]:
    """Source lines of the script for sync calls, data-dependent operators and DataLoader
    iteration, from the trace's python_function stacks (with_stack=True). Each entry is
    'path:line (function) — what xN'."""
    import numpy as np

    from autoopt.analyze import load_trace
    from autoopt.analyze import trace as T
    from autoopt.analyze.sync import user_frame

    tr = load_trace(trace_path)
    py = tr.idx(T.PYFN)
    out: dict[str, list[str]] = {"sync": [], "data_dependent": [], "dataloader": []}
    if py.size == 0:
        return out
    user = np.array([bool(s) and "(" in s and user_frame(s) is not None for s in tr.names], dtype=bool)
    py = py[user[tr.name[py]]]
    if py.size == 0:
        return out
    thread = (tr.pid.astype(np.int64) << 32) | tr.tid.astype(np.int64)
    by_thread = {}
    for k in np.unique(thread[py]):
        sel = py[thread[py] == k]
        by_thread[int(k)] = sel[np.argsort(tr.ts[sel], kind="stable")]

    def enclosing(i: int) -> Optional[str]:
        cand = by_thread.get(int(thread[i]))
        if cand is None:
            return None
        c = cand[: np.searchsorted(tr.ts[cand], tr.ts[i], side="right")]
        c = c[tr.end[c] >= tr.end[i]]
        if not c.size:
            return None
        # a python_function event names the function; its line is the function's first line (or
        # where the frame stood when tracing started), not the statement: keep the function
        site = user_frame(tr.names[int(tr.name[c[-1]])])
        if site is None:
            return None
        path_line, func = site.rsplit(" (", 1)
        return f"{path_line.rsplit(':', 1)[0]} (in {func}"

    groups = {
        "sync": lambda s: s in _SYNC_OPS,
        "data_dependent": lambda s: s in _DATA_DEPENDENT,
        "dataloader": lambda s: s.startswith("enumerate(DataLoader)#"),
    }
    ops = tr.idx(T.OP, T.ANNO)
    for key, pred in groups.items():
        ids = tr.name_ids(pred)
        sel = ops[tr.has_name(ids)[ops]] if ops.size else ops
        counts: collections.Counter = collections.Counter()
        for i in sel.tolist():
            site = enclosing(i)
            if site:
                name = tr.names[int(tr.name[i])]
                counts[(site, name if key != "dataloader" else "DataLoader __next__")] += 1
        out[key] = [f"{site} — {what} x{n}" for (site, what), n in counts.most_common(5)]
    return out
