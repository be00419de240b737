"""CPU operators: the operator tree, top operators (calls; host and device, total and self
time, as torch-tb-profiler's operator table), and the per-step operator counts the rules
read: top-level ops, optimizer ops and kernels, data-dependent ops, matmul/convolution
share and precision on CPU traces.

`ops_per_step` counts the top-level operators of the model's own work (forward, loss,
backward's autograd functions, zero_grad): operators inside an `enumerate(DataLoader)#...
__next__` span (batch collation, the loader's own ops) and inside an `Optimizer.step#...`
span (a per-parameter optimizer loop) are left out, and so are those spans themselves
where the trace records them as operators. Data loading and the optimizer have their own
facts and rules (AO5: `dataloader_fraction`; AO7: `optimizer_ops_per_step`,
`optimizer_fraction`), so AO303 (torch.compile for many small operators) reads only what
compiling the model would fuse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from autoopt.analyze import trace as T
from autoopt.analyze.kernels import first_float_type
from autoopt.analyze.steps import Steps
from autoopt.analyze.table import MATMUL_CONV_OPS

DATA_DEPENDENT_OPS = frozenset({"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique",
                                "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                                "aten::argwhere", "aten::masked_scatter"})
_OPTIMIZER_RE = re.compile(r"^Optimizer\.step#")
_DATALOADER_RE = re.compile(r"^enumerate\(DataLoader\)#.*\.__next__$|^enumerate\(DataPipe\)#")
_DP_RE = re.compile(r"^DataParallel\.forward$|broadcast_coalesced|ReduceAddCoalesced|^(Broadcast|Scatter|Gather)"
                    r"(Backward\d*)?$")
_COMPILED_RE = re.compile(r"^Torch-Compiled Region: (\d+)/(\d+)")


@dataclass
class OpTree:
    """Full-length arrays over the trace's events (meaningful for OP / ANNO / STEP rows)."""

    parent: np.ndarray  # event index of the enclosing OP/ANNO/STEP span, -1 at the root
    top_op: np.ndarray  # event index of the outermost OP enclosing (or being) this row; -1 if none
    in_optimizer: np.ndarray  # bool: inside (or being) an Optimizer.step#... span
    in_dataloader: np.ndarray  # bool: inside (or being) an enumerate(DataLoader)#...__next__ span
    self_host: np.ndarray  # us: duration minus children and own runtime calls
    self_device: np.ndarray  # us: GPU time launched directly by this op
    total_device: np.ndarray  # us: GPU time launched by this op and its children


def build_tree(tr: T.Trace) -> OpTree:
    n = tr.n
    parent = np.full(n, -1, dtype=np.int64)
    top_op = np.full(n, -1, dtype=np.int64)
    in_opt = np.zeros(n, dtype=bool)
    in_dl = np.zeros(n, dtype=bool)
    idx = tr.idx(T.OP, T.ANNO, T.STEP)
    depth_pos = np.zeros(0, dtype=np.int64)
    opt_lut = np.zeros(len(tr.names), dtype=bool)
    opt_ids = tr.name_ids(lambda s: bool(_OPTIMIZER_RE.match(s)))
    opt_lut[opt_ids] = True
    dl_lut = np.zeros(len(tr.names), dtype=bool)
    dl_lut[tr.name_ids(lambda s: bool(_DATALOADER_RE.match(s)))] = True
    if idx.size:
        thread = (tr.pid[idx].astype(np.int64) << 32) | tr.tid[idx].astype(np.int64)
        order = np.lexsort((-tr.dur[idx], tr.ts[idx], thread))
        idx = idx[order]
        th_sorted = thread[order]
        is_op_a = tr.kind[idx] == T.OP
        is_opt_a = opt_lut[tr.name[idx]]
        is_dl_a = dl_lut[tr.name[idx]]
        nest = _nest_vectorized(tr.ts[idx], tr.end[idx], th_sorted)
        if nest is None:  # not properly nested somewhere: the exact stack walk
            nest = _nest_stack(tr.ts[idx].tolist(), tr.end[idx].tolist(), th_sorted.tolist())
        par_pos, depth_pos = nest
        pos = np.arange(idx.size)
        top, inopt, indl = up_the_chain(par_pos, np.where(is_op_a, pos, -1), is_opt_a, is_dl_a)
        par = par_pos
        parent[idx] = np.where(par >= 0, idx[np.maximum(par, 0)], -1)
        top_op[idx] = np.where(top >= 0, idx[np.maximum(top, 0)], -1)
        in_opt[idx] = inopt
        in_dl[idx] = indl
    # host self time: minus direct children and the op's own runtime calls
    self_host = np.where(tr.mask(T.OP, T.ANNO, T.STEP), tr.dur, 0.0)
    has_p = parent >= 0
    np.subtract.at(self_host, parent[has_p], tr.dur[has_p])
    rt = tr.idx(T.RUNTIME)
    rt_op = tr.op_by_ext(tr.ext[rt])
    ok = rt_op >= 0
    np.subtract.at(self_host, rt_op[ok], tr.dur[rt][ok])
    self_host = np.maximum(self_host, 0.0)
    # device time
    self_dev = np.zeros(n)
    g = tr.idx(*T.GPU_KINDS)
    if g.size:
        lop = tr.launching_op(g)
        ok = lop >= 0
        np.add.at(self_dev, lop[ok], tr.dur[g][ok])
    total_dev = self_dev.copy()
    if g.size and idx.size:
        # push totals up the tree, deepest first: one pass over the rows, level by level
        top = int(depth_pos.max())
        if top <= 32:  # shallow (the usual case): one pass a level
            levels = (idx[depth_pos == d] for d in range(top, 0, -1))
        else:
            by_depth = np.argsort(-depth_pos, kind="stable")
            groups = np.split(by_depth, np.flatnonzero(np.diff(depth_pos[by_depth])) + 1)
            levels = (idx[grp] for grp in groups if depth_pos[grp[0]] > 0)
        for sel in levels:
            np.add.at(total_dev, parent[sel], total_dev[sel])
    return OpTree(parent, top_op, in_opt, in_dl, self_host, self_dev, total_dev)


def up_the_chain(par: np.ndarray, top: np.ndarray, *flags: np.ndarray) -> tuple[np.ndarray, ...]:
    """Along each row's chain of enclosing rows (par: -1 at a root), the outermost `top` >= 0
    (itself when none encloses it) and each flag or-ed over the chain. Pointer doubling: each
    round halves the chains left, so the work is rows x log(depth), not rows x depth."""
    top = top.copy()
    flags = tuple(f.copy() for f in flags)
    anc = par.copy()
    act = np.flatnonzero(anc >= 0)
    while act.size:
        a = anc[act]
        t = top[a]
        top[act] = np.where(t >= 0, t, top[act])
        for f in flags:
            f[act] |= f[a]
        anc[act] = anc[a]
        act = act[anc[act] >= 0]
    return (top, *flags)


def _nest_vectorized(ts: np.ndarray, en: np.ndarray, th: np.ndarray):
    """Parent position and depth of spans sorted by (thread, start, -duration), for properly nested
    spans: depth = spans of the thread started before and still open; parent = the last span one
    level up. n log n whatever the depth or the number of threads. Returns None when some span is
    not nested in its computed parent (partial overlaps)."""
    m = ts.size
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.concatenate([[True], th[1:] != th[:-1]])
    first = np.flatnonzero(new)
    depth = _depths(ts, en, new, first)
    if depth.min() < 0:
        return None
    parent = _parents(depth)
    if parent is None:
        return None
    has = parent >= 0
    p = parent[has]
    if not (np.all(th[p] == th[has]) and np.all(ts[p] <= ts[has]) and np.all(en[p] >= en[has])):
        return None
    return parent, depth


def _depths(ts: np.ndarray, en: np.ndarray, new: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each span's count of spans of its thread started before it and still open at its start."""
    m = ts.size
    pos = np.arange(m)
    if first.size <= 64:  # a few threads (the usual case): one sort each
        depth = np.empty(m, dtype=np.int64)
        for a, b in zip(first.tolist(), first[1:].tolist() + [m]):
            t, e = ts[a:b], en[a:b]
            depth[a:b] = np.arange(b - a) - (np.searchsorted(np.sort(e), t, side="right") - (e <= t))
        return depth
    group = np.cumsum(new) - 1  # many threads: one sort of (thread, time) keys for all of them
    _, inv = np.unique(np.concatenate([en, ts]), return_inverse=True)
    width = int(inv.max()) + 2
    ke = np.sort(group * width + inv[:m])
    closed = np.searchsorted(ke, group * width + inv[m:], side="right") - first[group] - (en <= ts)
    return (pos - first[group]) - closed


def _parents(depth: np.ndarray):
    """Each span's parent: the last span before it one level up (-1 at depth 0); None if none."""
    m = depth.size
    pos = np.arange(m)
    parent = np.full(m, -1, dtype=np.int64)
    top = int(depth.max())
    if top <= 32:  # shallow (the usual case): one pass a level
        for d in range(1, top + 1):
            kids, cand = pos[depth == d], pos[depth == d - 1]
            k = np.searchsorted(cand, kids) - 1
            if kids.size and (cand.size == 0 or (k < 0).any()):
                return None
            parent[kids] = cand[k]
        return parent
    key = depth * m + pos  # deep: the rows in (depth, position) order, searched once
    order = np.argsort(key, kind="stable")
    kids = np.flatnonzero(depth > 0)
    k = np.searchsorted(key[order], (depth[kids] - 1) * m + kids) - 1
    if (k < 0).any() or not (depth[order[k]] == depth[kids] - 1).all():
        return None
    parent[kids] = order[k]
    return parent


def _nest_stack(ts: list, en: list, th: list):
    m = len(ts)
    par = [-1] * m
    dep = [0] * m
    stack: list[int] = []
    cur = None
    for j in range(m):
        if th[j] != cur:
            stack = []
            cur = th[j]
        t = ts[j]
        e = en[j]
        while stack:
            pe = en[stack[-1]]
            if pe <= t or pe < e:
                stack.pop()
            else:
                break
        if stack:
            par[j] = stack[-1]
            dep[j] = dep[stack[-1]] + 1
        stack.append(j)
    return np.asarray(par, dtype=np.int64), np.asarray(dep, dtype=np.int64)


def top_operators(tr: T.Trace, tree: OpTree, top_n: int, by_device: bool) -> list[dict]:
    ops = tr.idx(T.OP)
    if ops.size == 0:
        return []
    # an op nested directly in an op of the same name (a redispatch, e.g. aten::div in aten::div) is
    # folded into its parent, as torch-tb-profiler's operator table does
    par = tree.parent[ops]
    pp = np.maximum(par, 0)
    dup = (par >= 0) & (tr.kind[pp] == T.OP) & (tr.name[pp] == tr.name[ops])
    host_self = tree.self_host.copy()
    dev_self = tree.self_device.copy()
    np.add.at(host_self, par[dup], host_self[ops[dup]])
    np.add.at(dev_self, par[dup], dev_self[ops[dup]])
    keep = ops[~dup]
    nm = tr.name[keep]
    L = len(tr.names)
    calls = np.bincount(nm, minlength=L)
    ht = np.bincount(nm, weights=tr.dur[keep], minlength=L)
    hs = np.bincount(nm, weights=host_self[keep], minlength=L)
    dt = np.bincount(nm, weights=tree.total_device[keep], minlength=L)
    ds = np.bincount(nm, weights=dev_self[keep], minlength=L)
    key = (ds, hs) if by_device else (hs, ht)
    order = np.lexsort((-key[1], -key[0]))
    out = []
    for nid in order[:top_n]:
        if calls[nid] == 0:
            break
        out.append({"name": tr.names[nid], "calls": int(calls[nid]),
                    "host_total_ms": round(ht[nid] / 1e3, 4), "host_self_ms": round(hs[nid] / 1e3, 4),
                    "device_total_ms": round(dt[nid] / 1e3, 4), "device_self_ms": round(ds[nid] / 1e3, 4)})
    return out


def op_stats(tr: T.Trace, tree: OpTree, st: Steps) -> dict:
    """Per-step operator counts and the CPU matmul/conv shares (meaningful on CPU-only traces)."""
    nsteps = st.count
    lo, hi = st.span
    ops = tr.idx(T.OP)
    in_steps = st.index_of(tr.ts[ops]) >= 0 if ops.size else np.zeros(0, dtype=bool)
    ops_in = ops[in_steps]
    # the model's own top-level ops: not the DataLoader's, not the optimizer step's (see the docstring)
    top_level = (tree.top_op[ops_in] == ops_in) & ~tree.in_dataloader[ops_in] & ~tree.in_optimizer[ops_in]
    out: dict = {
        "ops_per_step": float(top_level.sum()) / nsteps if nsteps else None,
        "optimizer_ops_per_step": None, "optimizer_kernels_per_step": None, "optimizer_fraction": None,
    }
    # optimizer
    spans = tr.idx(T.OP, T.ANNO)
    spans = spans[tr.has_name(tr.name_ids(lambda s: bool(_OPTIMIZER_RE.match(s))))[spans]]
    if spans.size:
        from autoopt.analyze import intervals as I
        opt = I.merge(tr.ts[spans], tr.end[spans])
        steps_iv = (st.starts, st.ends)
        out["optimizer_fraction"] = I.total(I.intersect(opt, steps_iv)) / st.total if st.total > 0 else None
        # ops directly under optimizer.step (no enclosing op inside the span)
        par = tree.parent[ops_in]
        pp = np.maximum(par, 0)
        under_opt_op = (par >= 0) & (tr.kind[pp] == T.OP) & tree.in_optimizer[pp]
        direct = tree.in_optimizer[ops_in] & ~under_opt_op
        out["optimizer_ops_per_step"] = float(direct.sum()) / nsteps
        k = tr.idx(T.KERNEL)
        if k.size:
            lop = tr.launching_op(k)
            kin = (st.index_of(tr.ts[k]) >= 0) & (lop >= 0)
            out["optimizer_kernels_per_step"] = float(np.sum(tree.in_optimizer[np.maximum(lop, 0)] & kin)) / nsteps
    elif ops_in.size:
        out["optimizer_fraction"] = 0.0
    # data-dependent and DataParallel ops
    dd = tr.has_name(tr.name_ids(lambda s: s in DATA_DEPENDENT_OPS))
    out["data_dependent_ops_per_step"] = float(np.sum(dd[ops_in])) / nsteps if nsteps else None
    cpu_any = tr.idx(T.OP, T.ANNO)
    cpu_any = cpu_any[st.index_of(tr.ts[cpu_any]) >= 0]
    dp = tr.has_name(tr.name_ids(lambda s: bool(_DP_RE.search(s))))
    out["dataparallel_ops"] = float(np.sum(dp[cpu_any])) / nsteps if nsteps else None
    # CPU matmul / conv time (self time of the compute ops) and its precision
    mm_lut = np.zeros(len(tr.names), dtype=bool)
    conv_lut = np.zeros(len(tr.names), dtype=bool)
    for i, s in enumerate(tr.names):
        if s in MATMUL_CONV_OPS:
            mm_lut[i] = True
            conv_lut[i] = "conv" in s
    selfs = tree.self_host[ops_in]
    cpu_total = float(selfs.sum())
    mm = mm_lut[tr.name[ops_in]]
    out["cpu_matmul_fraction"] = float(selfs[mm].sum() / cpu_total) if cpu_total > 0 else None
    out["cpu_conv_fraction"] = float(selfs[conv_lut[tr.name[ops_in]]].sum() / cpu_total) if cpu_total > 0 else None
    out["cpu_fp32_matmul_fraction"] = None
    if mm.any():
        known = 0.0
        fp32 = 0.0
        for i, s in zip(ops_in[mm].tolist(), selfs[mm].tolist()):
            dt = first_float_type(tr.input_types.get(i))
            if dt is None:
                continue
            known += s
            if dt in ("float", "double"):
                fp32 += s
        out["cpu_fp32_matmul_fraction"] = fp32 / known if known > 0 else None
    out.update(_compile_and_loader_stats(tr, st))
    return out


def _compile_and_loader_stats(tr: T.Trace, st: Steps) -> dict:
    """torch.compile's graph breaks and recompilations (from its frame names) and DataLoader
    iterator creations per step (from Python stacks, when the trace has them)."""
    frames: dict[int, set] = {}
    for s in tr.names:
        m = _COMPILED_RE.match(s) if s else None
        if m:
            frames.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    out = {"graph_breaks": (len(frames) - 1) if frames else None,
           "recompilations": sum(len(v) - 1 for v in frames.values()) if frames else None,
           "dataloader_init_per_step": None}
    py = tr.idx(T.PYFN)
    if py.size and st.count:
        dl_ids = tr.name_ids(lambda s: ("dataloader.py(" in s and (s.endswith(": __iter__")
                                                                    or s.endswith(": _get_iterator"))))
        py_in = py[st.index_of(tr.ts[py]) >= 0]
        out["dataloader_init_per_step"] = float(np.sum(tr.has_name(dl_ids)[py_in])) / st.count
    return out
