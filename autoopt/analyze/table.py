"""Building the event table: decoded events folded into typed columns, chunk by chunk, and
the finished `Trace`.

`_Columns.ingest` takes one decoded chunk: column by column with list comprehensions when
it is well-formed (the hot path), event by event, tolerating anything, when it is not.
Every schema era is accepted: the legacy autograd-profiler bare list, 2021 capitalised
categories, 2022+ snake_case, fractional-microsecond timestamps, ROCm and CPU-only traces.
Rows move into numpy arrays every `flush_rows` rows, so the columns never hold millions
of Python objects. `_finish` turns the columns into a `Trace`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from autoopt.analyze import trace as T

# name flags (computed once per distinct CPU op / annotation name)
F_STEP = 1
F_INPUT_TYPES = 2
F_STACK = 4

MATMUL_CONV_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
    "aten::linear", "aten::mv", "aten::addmv", "aten::dot", "aten::einsum", "aten::_addmm_activation",
    "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution",
    "aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d",
    "aten::cudnn_convolution", "aten::cudnn_convolution_transpose", "aten::mkldnn_convolution",
    "aten::miopen_convolution", "aten::_slow_conv2d_forward", "aten::slow_conv3d_forward",
    "aten::thnn_conv2d", "aten::_nnpack_spatial_convolution", "aten::convolution_backward",
    "aten::cudnn_convolution_backward", "aten::cudnn_convolution_backward_input",
    "aten::cudnn_convolution_backward_weight", "aten::mkldnn_linear", "aten::_mkldnn_linear",
    "aten::mkldnn_matmul", "aten::_scaled_mm", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
})
SYNC_CANDIDATE_OPS = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::to", "aten::_to_copy", "aten::copy_",
    "aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::cpu", "aten::tolist", "aten::repeat_interleave", "aten::index", "aten::index_put_",
    "aten::bincount", "aten::histc", "aten::multinomial", "aten::where", "aten::argwhere",
    "aten::_assert_async", "aten::min", "aten::max",
})

_EMPTY: dict = {}


def _as_dict(v: Any) -> dict:
    """An event's args when they are a dict, else an empty one (a trace may hold anything there)."""
    return v if v.__class__ is dict else _EMPTY

_KEEP_PH = frozenset({"i", "I", "M"})
_COLSPEC = {"kind": (np.int8, T.OTHER), "name": (np.int32, 0), "pid": (np.int32, 0), "tid": (np.int32, 0),
            "ts": (np.float64, np.nan), "dur": (np.float64, 0.0), "ext": (np.int64, -1), "corr": (np.int64, -1)}


class _Odd(Exception):
    """A chunk the columnar fast path does not handle; the event-by-event path takes it."""


class _Columns:
    """Column lists filled chunk by chunk, turned into numpy arrays at the end."""

    def __init__(self, flush_rows: int) -> None:
        self.flush_rows = flush_rows  # rows gathered in lists before they move into arrays
        self.names: dict[Any, int] = {}
        self.name_flags: list[int] = []
        self.pids: dict[Any, int] = {}
        self.tids: dict[Any, int] = {}
        self.kind: list[int] = []
        self.name: list[int] = []
        self.pid: list[int] = []
        self.tid: list[int] = []
        self.ts: list[Any] = []
        self.dur: list[Any] = []
        self.ext: list[Any] = []
        self.corr: list[Any] = []
        # sparse GPU columns
        self.g_idx: list[int] = []
        self.g_dev: list[Any] = []
        self.g_stream: list[Any] = []
        self.g_bps: list[Any] = []
        self.g_occ: list[Any] = []
        self.g_grid: list[Any] = []
        self.g_bytes: list[Any] = []
        self.input_types: dict[int, Any] = {}
        self.call_stacks: dict[int, str] = {}
        self.mem: list[tuple] = []
        self.process_labels: dict[Any, str] = {}
        self.process_names: dict[Any, str] = {}
        self.skipped = 0
        self.events_total = 0
        self.legacy = False
        self.cat_kind = dict(T.CATEGORY_KIND)
        self.base = 0  # rows already moved from the lists into typed arrays
        self.flag_arr = np.zeros(0, dtype=np.int8)
        self.done: dict[str, list] = {k: [] for k in _COLSPEC}

    def _new_name(self, name: Any) -> int:
        try:
            nid = self.names[name] = len(self.names)
        except TypeError:  # unhashable name (a list, a dict): keep it as text
            text = str(name)
            return self.names[text] if text in self.names else self._new_name(text)
        flags = 0
        if isinstance(name, str):
            if name.startswith("ProfilerStep#"):
                flags |= F_STEP
            if name in MATMUL_CONV_OPS:
                flags |= F_INPUT_TYPES
            if name in SYNC_CANDIDATE_OPS:
                flags |= F_STACK | F_INPUT_TYPES * (name in MATMUL_CONV_OPS)
        self.name_flags.append(flags)
        return nid

    def ingest(self, evs: list) -> None:
        """Fold one decoded chunk into the columns: column by column with comprehensions when the
        chunk is well-formed, event by event (tolerating anything) when it is not."""
        try:
            staged = self._stage(evs)
        except (TypeError, AttributeError, KeyError, _Odd):
            staged = None
        if staged is None:
            self._ingest_events(evs)
            return
        phs = staged[-1]
        self._commit(*staged[:-1])
        rest = None
        if "i" in phs or "M" in phs or "I" in phs:
            rest = [e for e, p in zip(evs, phs) if p in _KEEP_PH]
        if rest:
            mem = [e for e in rest if e.get("name") == "[memory]"]
            if mem:
                a = [e.get("args") for e in mem]
                if all(x.__class__ is dict for x in a):
                    self.mem.extend(zip([e.get("ts") for e in mem], [x.get("Bytes") for x in a],
                                        [x.get("Total Allocated") for x in a], [x.get("Device Type") for x in a],
                                        [x.get("Device Id") for x in a]))
                    rest = [e for e in rest if e.get("name") != "[memory]"]
            if rest:
                self._ingest_events(rest, count=False)
        self.events_total += len(evs)
        if len(self.kind) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Move the rows gathered so far into typed arrays (8 bytes a value, not a Python object)."""
        if not self.kind:
            return
        for k, (dtype, default) in _COLSPEC.items():
            col = getattr(self, k)
            self.done[k].append(_num(col, dtype, default))
            col.clear()
        self.base += len(self.done["kind"][-1])

    def arrays(self) -> dict[str, np.ndarray]:
        self.flush()
        return {k: (np.concatenate(v) if v else np.zeros(0, dtype=_COLSPEC[k][0])) for k, v in self.done.items()}

    def _kinds(self, cat: list) -> list:
        ck = self.cat_kind
        try:
            return [ck[c] for c in cat]
        except KeyError:
            for c in dict.fromkeys(cat):
                if c not in ck:
                    if not isinstance(c, str):
                        raise _Odd from None  # legacy exports: the kind depends on each event's pid
                    self._kind_slow(c, {})
            return [ck[c] for c in cat]

    def _name_ids(self, name: list) -> list:
        names = self.names
        try:
            return [names[n] for n in name]
        except KeyError:
            for n in dict.fromkeys(name):
                if n not in names:
                    self._new_name(n)
            return [names[n] for n in name]

    @staticmethod
    def _indexed(values: list, table: dict) -> list:
        """Each value's index in `table`, new values appended."""
        try:
            return [table[v] for v in values]
        except KeyError:
            for v in dict.fromkeys(values):
                if v not in table:
                    table[v] = len(table)
            return [table[v] for v in values]

    def _stage(self, evs: list):
        phs = [e.get("ph") for e in evs]
        X = [e for e, p in zip(evs, phs) if p == "X"]
        ts = [e.get("ts") for e in X]
        if None in ts:
            raise _Odd
        kind = self._kinds([e.get("cat") for e in X])
        nid = self._name_ids([e.get("name") for e in X])
        args = [e.get("args") for e in X]
        if not all(a.__class__ is dict for a in args):
            args = [a if a.__class__ is dict else _EMPTY for a in args]
        ext = [a.get("External id") or a.get("external id", -1) for a in args]
        corr = [a.get("correlation", -1) for a in args]
        dur = [e.get("dur", 0) for e in X]
        pid = self._indexed([e.get("pid") for e in X], self.pids)
        tid = self._indexed([e.get("tid") for e in X], self.tids)
        return X, kind, nid, args, ts, dur, ext, corr, pid, tid, phs

    def _commit(self, X, kind, nid, args, ts, dur, ext, corr, pid, tid) -> None:
        base = self.base + len(self.kind)
        flags = self.name_flags
        ANNO_, STEP_, KERNEL_, SYNC_ = T.ANNO, T.STEP, T.KERNEL, T.SYNC
        fl_arr = self.flag_arr
        if fl_arr.shape[0] < len(flags):
            fl_arr = self.flag_arr = np.asarray(flags, dtype=np.int8)
        cand = np.flatnonzero(fl_arr[np.asarray(nid, dtype=np.int64)]).tolist() if nid else []
        for j in [j for j in cand if kind[j] <= ANNO_]:
            fl = flags[nid[j]]
            a = args[j]
            if fl & F_STEP:
                kind[j] = STEP_
            if fl & F_INPUT_TYPES and "Input type" in a:
                self.input_types[base + j] = a["Input type"]
            if fl & F_STACK and "Call stack" in a:
                self.call_stacks[base + j] = a["Call stack"]
        gj = [j for j, k in enumerate(kind) if KERNEL_ <= k <= SYNC_]
        if gj:
            ga = [args[j] for j in gj]
            self.g_idx.extend([base + j for j in gj])
            self.g_dev.extend([a.get("device") for a in ga])
            self.g_stream.extend([a.get("stream") for a in ga])
            isk = [kind[j] == KERNEL_ for j in gj]
            self.g_bps.extend([a.get("blocks per SM") if k else None for a, k in zip(ga, isk)])
            self.g_occ.extend([a.get("est. achieved occupancy %") if k else None for a, k in zip(ga, isk)])
            self.g_grid.extend([a.get("grid") if k else None for a, k in zip(ga, isk)])
            self.g_bytes.extend([None if k else a.get("bytes") for a, k in zip(ga, isk)])
        self.kind.extend(kind)
        self.name.extend(nid)
        self.pid.extend(pid)
        self.tid.extend(tid)
        self.ts.extend(ts)
        self.dur.extend(dur)
        self.ext.extend(ext)
        self.corr.extend(corr)

    def _ingest_events(self, evs: list, count: bool = True) -> None:
        """Event by event, tolerating anything (the hot path is `ingest`)."""
        i = self.base + len(self.kind)
        if count:
            self.events_total += len(evs)
        for e in evs:
            try:
                ph = e.get("ph")
            except AttributeError:
                self.skipped += 1
                continue
            if ph == "X":
                if self._complete_event(e, i):
                    i += 1
                else:
                    self.skipped += 1
            elif ph == "i" or ph == "I" or ph == "M":
                self._instant_or_metadata(ph, e)

    def _row_of(self, value: Any, table: dict) -> int:
        try:
            return table[value]
        except KeyError:
            table[value] = len(table)
            return table[value]
        except TypeError:  # unhashable: keyed by its text
            return table.setdefault(str(value), len(table))

    def _complete_event(self, e: dict, i: int) -> bool:
        """Row i from a complete ("X") event; False when it has no timestamp."""
        ts = e.get("ts")
        if ts is None:
            return False
        cat = e.get("cat")
        k = self.cat_kind.get(cat)
        if k is None:
            k = self._kind_slow(cat, e)
        name = e.get("name")
        try:
            nid = self.names.get(name)
        except TypeError:
            nid = None
        if nid is None:
            nid = self._new_name(name)
        args = e.get("args")
        if args.__class__ is not dict:
            args = _EMPTY
        if k <= T.ANNO:
            k = self._flagged(i, k, nid, args)
        elif T.KERNEL <= k <= T.SYNC:
            self._gpu_row(i, k, args)
        self.kind.append(k)
        self.name.append(nid)
        self.pid.append(self._row_of(e.get("pid"), self.pids))
        self.tid.append(self._row_of(e.get("tid"), self.tids))
        self.ts.append(ts)
        self.dur.append(e.get("dur", 0))
        self.ext.append(args.get("External id") or args.get("external id", -1))
        self.corr.append(args.get("correlation"))
        return True

    def _flagged(self, i: int, k: int, nid: int, args: dict) -> int:
        """A CPU row's kind (a ProfilerStep span is a step) and its input types / call stack."""
        fl = self.name_flags[nid]
        if fl:
            if fl & F_STEP:
                k = T.STEP
            if fl & F_INPUT_TYPES and "Input type" in args:
                self.input_types[i] = args["Input type"]
            if fl & F_STACK and "Call stack" in args:
                self.call_stacks[i] = args["Call stack"]
        return k

    def _gpu_row(self, i: int, k: int, args: dict) -> None:
        """The sparse GPU columns of row i (a kernel, memcpy, memset, GPU annotation or sync)."""
        self.g_idx.append(i)
        self.g_dev.append(args.get("device"))
        self.g_stream.append(args.get("stream"))
        if k == T.KERNEL:
            self.g_bps.append(args.get("blocks per SM"))
            self.g_occ.append(args.get("est. achieved occupancy %"))
            self.g_grid.append(args.get("grid"))
            self.g_bytes.append(None)
        else:
            self.g_bps.append(None)
            self.g_occ.append(None)
            self.g_grid.append(None)
            self.g_bytes.append(args.get("bytes"))

    def _instant_or_metadata(self, ph: str, e: dict) -> None:
        """A memory instant event ([memory]) or a process's label / name metadata event; others are dropped."""
        if ph == "i" or ph == "I":
            if e.get("name") == "[memory]":
                a = _as_dict(e.get("args"))
                self.mem.append((e.get("ts"), a.get("Bytes"), a.get("Total Allocated"),
                                 a.get("Device Type"), a.get("Device Id")))
        else:
            n = e.get("name")
            if n == "process_labels" or n == "process_name":
                a = _as_dict(e.get("args"))
                v = a.get("labels") if n == "process_labels" else a.get("name")
                if isinstance(v, str):
                    try:
                        (self.process_labels if n == "process_labels" else self.process_names)[e.get("pid")] = v
                    except TypeError:
                        pass

    def _kind_slow(self, cat: Any, e: dict) -> int:
        if isinstance(cat, str):
            k = T.CATEGORY_KIND.get(cat.lower(), T.OTHER)
            self.cat_kind[cat] = k
            return k
        if cat is None:
            # legacy autograd profiler export (a bare list without categories)
            self.legacy = True
            pid = e.get("pid")
            if isinstance(pid, str) and "CUDA" in pid.upper():
                return T.KERNEL
            return T.OP
        return T.OTHER


def _num(col: list, dtype, default) -> np.ndarray:
    """A typed 1-D column from a list that may hold None or odd values (strings, lists, huge ints)."""
    for attempt in (col, None):
        if attempt is None:
            attempt = [default if v is None else v for v in col]
        try:
            arr = np.array(attempt, dtype=dtype)
            if arr.ndim == 1 and arr.shape[0] == len(col):
                return arr
        except (TypeError, ValueError, OverflowError):
            pass
    out = np.empty(len(col), dtype=dtype)
    for j, v in enumerate(col):
        try:
            if v is None or isinstance(v, (list, dict, bool)):
                raise TypeError
            out[j] = v
        except (TypeError, ValueError, OverflowError):
            try:
                out[j] = float(v) if isinstance(v, str) else default
            except (TypeError, ValueError, OverflowError):
                out[j] = default
    return out


def _opt_int(col: list) -> np.ndarray:
    """int64 column with -1 for None / non-integers (ids, correlations)."""
    return _num(col, np.int64, -1)


def _opt_float(col: list) -> np.ndarray:
    return _num(col, np.float64, np.nan)


def _grid_blocks(col: list) -> np.ndarray:
    out = np.full(len(col), np.nan)
    for j, g in enumerate(col):
        if isinstance(g, (list, tuple)) and g:
            try:
                p = 1.0
                for x in g:
                    p *= float(x)
                out[j] = p
            except (TypeError, ValueError):
                pass
    return out


def _stream_id(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = re.search(r"-?\d+", v)
        if m:
            try:
                return int(m.group(0), 16) if v.startswith("0x") else int(m.group(0))
            except ValueError:
                return -1
    return -1


def _finish(cols: _Columns, path: Path, meta: dict, size: int) -> T.Trace:
    col = cols.arrays()
    n = int(col["kind"].shape[0])
    ts = col["ts"]
    dur = col["dur"]
    bad = ~np.isfinite(ts)
    dur = np.where(np.isfinite(dur) & (dur > 0), dur, 0.0)
    t0 = float(np.min(ts[~bad])) if n and not bad.all() else 0.0
    ts = ts - t0
    names: list[Any] = [None] * len(cols.names)
    for k, v in cols.names.items():
        names[v] = k if isinstance(k, str) else ("" if k is None else str(k))
    pids: list[Any] = [None] * len(cols.pids)
    for k, v in cols.pids.items():
        pids[v] = k
    tids: list[Any] = [None] * len(cols.tids)
    for k, v in cols.tids.items():
        tids[v] = k

    device, stream, bps, occ, grid, nbytes = _gpu_columns(cols, col, pids, tids, n)
    tr = T.Trace(
        path=str(path), names=names, kind=col["kind"],
        name=col["name"], pid=col["pid"],
        tid=col["tid"], ts=ts, dur=dur, ext=col["ext"], corr=col["corr"],
        device=device, stream=stream, blocks_per_sm=bps, occupancy_pct=occ, grid_blocks=grid,
        nbytes=nbytes, t0_us=t0, pids=pids, tids=tids, meta=meta,
        input_types=cols.input_types, call_stacks=cols.call_stacks,
        process_labels=cols.process_labels, events_total=cols.events_total, size_bytes=size,
    )
    if bad.any():
        keep = ~bad
        tr.notes.append(f"{int(bad.sum())} events without a numeric timestamp were ignored")
        _subset(tr, keep)
    if cols.skipped:
        tr.notes.append(f"{cols.skipped} malformed events were ignored")
    if cols.legacy:
        tr.notes.append("legacy autograd-profiler export (no categories): CPU and CUDA functions only")
    if cols.mem:
        m = cols.mem
        tr.mem_ts = _num([r[0] for r in m], np.float64, np.nan) - t0
        tr.mem_bytes = _num([r[1] for r in m], np.float64, 0.0)
        tr.mem_total = _opt_float([r[2] for r in m])
        tr.mem_device_type = _opt_int([r[3] for r in m]).astype(np.int32)
        tr.mem_device_id = _opt_int([r[4] for r in m]).astype(np.int32)
    return tr


def _gpu_columns(cols: _Columns, col: dict[str, np.ndarray], pids: list, tids: list, n: int):
    """Full-length (device, stream, blocks per SM, occupancy %, grid blocks, bytes) columns from
    the sparse GPU lists; -1 / NaN on rows that are not GPU events."""
    device = np.full(n, -1, dtype=np.int32)
    stream = np.full(n, -1, dtype=np.int64)
    bps = np.full(n, np.nan)
    occ = np.full(n, np.nan)
    grid = np.full(n, np.nan)
    nbytes = np.full(n, np.nan)
    if cols.g_idx:
        gi = np.asarray(cols.g_idx, dtype=np.int64)
        dev = _opt_int(cols.g_dev)
        # legacy / odd traces: no args.device; fall back to the pid when it is a small integer
        pid_arr = col["pid"][gi]
        pid_dev = np.array([p if isinstance(p, int) and 0 <= p < 64 else -1 for p in pids], dtype=np.int64)
        dev = np.where(dev >= 0, dev, pid_dev[pid_arr] if pid_dev.size else -1)
        device[gi] = np.where(dev >= 0, dev, 0)
        stream[gi] = [_stream_id(s) for s in cols.g_stream]
        bps[gi] = _opt_float(cols.g_bps)
        occ[gi] = _opt_float(cols.g_occ)
        grid[gi] = _grid_blocks(cols.g_grid)
        nbytes[gi] = _opt_float(cols.g_bytes)
    kind = col["kind"]
    if cols.legacy:  # legacy export: kernels carry their device in tid
        kmask = kind == T.KERNEL
        if kmask.any():
            tid_arr = col["tid"]
            tid_dev = np.array([t if isinstance(t, int) and 0 <= t < 64 else 0 for t in tids], dtype=np.int32)
            device[kmask] = tid_dev[tid_arr[kmask]]
    return device, stream, bps, occ, grid, nbytes


def _subset(tr: T.Trace, keep: np.ndarray) -> None:
    new_index = np.cumsum(keep) - 1
    for f in ("kind", "name", "pid", "tid", "ts", "dur", "ext", "corr", "device", "stream",
              "blocks_per_sm", "occupancy_pct", "grid_blocks", "nbytes"):
        setattr(tr, f, getattr(tr, f)[keep])
    tr.input_types = {int(new_index[k]): v for k, v in tr.input_types.items() if keep[k]}
    tr.call_stacks = {int(new_index[k]): v for k, v in tr.call_stacks.items() if keep[k]}
