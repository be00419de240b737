"""The columnar trace: one row per event, numpy columns, names interned.

A loaded trace never holds the decoded JSON objects; the loader (autoopt.analyze.loader)
streams them into these typed columns. Every analysis module reads a `Trace` and
returns plain values. Times are microseconds relative to `t0_us` (the earliest event),
which keeps float64 arithmetic exact for integer-microsecond traces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

# Event kinds (the `kind` column). Categories of every schema era map onto these.
OP = 0  # cpu_op / Operator / legacy python
ANNO = 1  # user_annotation (record_function)
STEP = 2  # ProfilerStep#N on the CPU side
PYFN = 3  # python_function (with_stack frames)
RUNTIME = 4  # cuda_runtime / Runtime / cuda_driver
KERNEL = 5
MEMCPY = 6
MEMSET = 7
GPU_ANNO = 8  # gpu_user_annotation: spans drawn on GPU tracks, not GPU work
SYNC = 9  # cuda_sync (CUPTI synchronization records)
TRACE = 10  # "PyTorch Profiler (0)" span
OTHER = 11

KIND_NAMES = ("op", "annotation", "step", "python", "runtime", "kernel", "memcpy", "memset",
              "gpu_annotation", "sync", "trace", "other")
GPU_KINDS = (KERNEL, MEMCPY, MEMSET)

CATEGORY_KIND = {
    "cpu_op": OP, "operator": OP, "python": OP,
    "user_annotation": ANNO,
    "python_function": PYFN,
    "cuda_runtime": RUNTIME, "runtime": RUNTIME, "cuda_driver": RUNTIME,
    "kernel": KERNEL,
    "gpu_memcpy": MEMCPY, "memcpy": MEMCPY,
    "gpu_memset": MEMSET, "memset": MEMSET,
    "gpu_user_annotation": GPU_ANNO,
    "cuda_sync": SYNC,
    "trace": TRACE,
}


@dataclass
class Trace:
    path: str
    names: list[str]
    kind: np.ndarray  # int8
    name: np.ndarray  # int32 index into names
    pid: np.ndarray  # int32 index into pids
    tid: np.ndarray  # int32 index into tids
    ts: np.ndarray  # float64 us, relative to t0_us
    dur: np.ndarray  # float64 us
    ext: np.ndarray  # int64 External id, -1 when absent
    corr: np.ndarray  # int64 correlation id, -1 when absent
    # GPU-side columns (full length; -1 / NaN where not a GPU event)
    device: np.ndarray  # int32
    stream: np.ndarray  # int64
    blocks_per_sm: np.ndarray  # float64
    occupancy_pct: np.ndarray  # float64 ("est. achieved occupancy %")
    grid_blocks: np.ndarray  # float64 (product of grid dims)
    nbytes: np.ndarray  # float64 (memcpy / memset bytes)
    t0_us: float
    pids: list[Any]
    tids: list[Any]
    meta: dict[str, Any]
    # sparse per-event extras: event index -> value
    input_types: dict[int, Any] = field(default_factory=dict)
    call_stacks: dict[int, str] = field(default_factory=dict)
    # [memory] instant events: columns
    mem_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mem_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mem_total: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN when not recorded
    mem_device_type: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    mem_device_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    process_labels: dict[Any, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    events_total: int = 0  # every decoded event, flows and metadata included
    size_bytes: int = 0

    _end: Optional[np.ndarray] = None
    _ext_index: Optional[tuple] = None
    _corr_rt: Optional[tuple] = None

    @property
    def n(self) -> int:
        return int(self.kind.shape[0])

    @property
    def end(self) -> np.ndarray:
        if self._end is None:
            self._end = self.ts + self.dur
        return self._end

    def mask(self, *kinds: int) -> np.ndarray:
        if len(kinds) == 1:
            return self.kind == kinds[0]
        return np.isin(self.kind, np.asarray(kinds, dtype=self.kind.dtype))

    def idx(self, *kinds: int) -> np.ndarray:
        return np.flatnonzero(self.mask(*kinds))

    def name_of(self, i: int) -> str:
        return self.names[int(self.name[i])]

    def name_ids(self, predicate) -> np.ndarray:
        """Ids of the interned names for which predicate(name) is true."""
        return np.asarray([i for i, s in enumerate(self.names) if isinstance(s, str) and predicate(s)],
                          dtype=np.int64)

    def has_name(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(self.n, dtype=bool)
        lut = np.zeros(len(self.names) + 1, dtype=bool)
        lut[ids] = True
        return lut[self.name]

    @property
    def has_gpu(self) -> bool:
        return bool(np.any(self.mask(KERNEL, MEMCPY, MEMSET)))

    # --- joins ---------------------------------------------------------------------------
    def op_by_ext(self, ext_ids: np.ndarray) -> np.ndarray:
        """Index of the CPU op / annotation with each External id (-1 where none)."""
        if self._ext_index is None:
            cand = np.flatnonzero(self.mask(OP, ANNO, STEP) & (self.ext >= 0))
            order = np.argsort(self.ext[cand], kind="stable")
            self._ext_index = (self.ext[cand][order], cand[order])
        keys, rows = self._ext_index
        out = np.full(ext_ids.shape, -1, dtype=np.int64)
        if keys.size == 0 or ext_ids.size == 0:
            return out
        pos = np.searchsorted(keys, ext_ids)
        pos_c = np.minimum(pos, keys.size - 1)
        hit = (keys[pos_c] == ext_ids) & (ext_ids >= 0)
        out[hit] = rows[pos_c[hit]]
        return out

    def runtime_of(self, gpu_idx: np.ndarray) -> np.ndarray:
        """Index of the runtime call (cudaLaunchKernel, cudaMemcpyAsync, ...) that launched each GPU event."""
        if self._corr_rt is None:
            rt = np.flatnonzero((self.kind == RUNTIME) & (self.corr >= 0))
            order = np.argsort(self.corr[rt], kind="stable")
            self._corr_rt = (self.corr[rt][order], rt[order])
        keys, rows = self._corr_rt
        out = np.full(gpu_idx.shape, -1, dtype=np.int64)
        if keys.size == 0 or gpu_idx.size == 0:
            return out
        c = self.corr[gpu_idx]
        pos = np.minimum(np.searchsorted(keys, c), keys.size - 1)
        hit = (keys[pos] == c) & (c >= 0)
        out[hit] = rows[pos[hit]]
        return out

    def launching_op(self, gpu_idx: np.ndarray) -> np.ndarray:
        """Index of the CPU op that launched each GPU event, through its runtime call's External id
        (falling back to the GPU event's own External id, as 2021 traces carry it)."""
        rt = self.runtime_of(gpu_idx)
        ext = np.where(rt >= 0, self.ext[np.maximum(rt, 0)], -1)
        ext = np.where(ext >= 0, ext, self.ext[gpu_idx])
        return self.op_by_ext(ext)
