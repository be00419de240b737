"""Caps on what loading one trace may cost, so that any file (a trace received from someone
else, a gzip bomb) ends with a result or one clear error instead of taking all memory or time.

- `trace_bytes`: decompressed JSON bytes read from one file (--max-trace-bytes);
- `events`: events decoded from one file (--max-events);
- `event_bytes`: the largest piece of JSON held and decoded at once: one event, the document
  around the traceEvents array (its metadata), or a whole file without one (--max-event-bytes);
- `depth`: JSON nesting depth, fixed (orjson's own limit is 1024; real traces nest < 10).

The defaults follow the memory this process may use (MemAvailable, the address-space rlimit and
the cgroup's memory.max, whichever is smallest): see `Limits.default` and the README's "Limits
on untrusted traces".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from autoopt.errors import TraceError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MAX_DEPTH = 1000
BYTES_PER_EVENT = 400  # what one event may cost in memory while a trace loads and is analysed (with margin)

FLAGS = {"trace_bytes": "--max-trace-bytes", "events": "--max-events", "event_bytes": "--max-event-bytes"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def _meminfo(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_max() -> Optional[int]:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = int(Path(p).read_text().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        if 0 < v < (1 << 60):
            return v
    return None


def _rlimit_as() -> Optional[int]:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft if soft not in (resource.RLIM_INFINITY, -1) and soft > 0 else None


def memory_budget() -> int:
    """Bytes this process may use: the smallest of MemAvailable (MemTotal when unknown), the
    address-space rlimit and the cgroup limit; 4 GiB when none can be read."""
    known = [v for v in (_meminfo("MemAvailable") or _meminfo("MemTotal"), _rlimit_as(), _cgroup_max()) if v]
    return min(known) if known else 4 * GiB


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


@dataclass(frozen=True)
class Limits:
    trace_bytes: int
    events: int
    event_bytes: int
    depth: int = MAX_DEPTH

    @classmethod
    def default(cls, budget: Optional[int] = None) -> "Limits":
        """Decompressed bytes: the memory budget (1 to 32 GiB); events: budget / 400 bytes
        (1 to 200 million); one event or the metadata: budget / 16 (16 MiB to 1 GiB)."""
        b = memory_budget() if budget is None else budget
        return cls(trace_bytes=_clamp(b, 1 * GiB, 32 * GiB),
                   events=_clamp(b // BYTES_PER_EVENT, 1_000_000, 200_000_000),
                   event_bytes=_clamp(b // 16, 16 * MiB, 1 * GiB))

    def with_overrides(self, trace_bytes: Optional[int] = None, events: Optional[int] = None,
                       event_bytes: Optional[int] = None) -> "Limits":
        return Limits(trace_bytes=trace_bytes or self.trace_bytes, events=events or self.events,
                      event_bytes=event_bytes or self.event_bytes, depth=self.depth)


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '64k', '123' (bytes) -> bytes; ValueError for anything else."""
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 500M, 64K or a number of bytes)")
    v = float(m.group(1)) * (1 << (10 * "_kmgt".index(m.group(2).lower() or "_")))
    if v < 1:
        raise ValueError(f"{text!r} is not a size of at least 1 byte")
    return int(v)


def parse_count(text: str) -> int:
    """'5000000', '5M', '2.5k' -> a count of at least 1 (K/M/G are powers of 1000 here)."""
    m = _SIZE.match(str(text))
    if not m or m.group(3):
        raise ValueError(f"{text!r} is not a count (e.g. 5000000, 5M or 200k)")
    v = float(m.group(1)) * (1000 ** "_kmgt".index(m.group(2).lower() or "_"))
    if v < 1:
        raise ValueError(f"{text!r} is not a count of at least 1")
    return int(v)


def human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def exceeded(path, what: str, limit_name: str, value: int) -> TraceError:
    """The one-paragraph error for a trace beyond one of the limits; `what` reads on with
    "than the limit of ...", e.g. "it holds more events"."""
    shown = f"{value:,}" if limit_name == "events" else human(value)
    if limit_name == "depth":
        return TraceError(f"{path}: {what} than the limit of {value} levels (real traces nest fewer than 10; this "
                          "limit is fixed). The file is not a torch.profiler trace or is damaged; re-export it.")
    return TraceError(f"{path}: {what} than the limit of {shown} ({FLAGS[limit_name]}; the defaults follow this "
                      f"machine's memory, see the README's 'Limits on untrusted traces'). If you trust the file and "
                      f"have the memory, raise it, e.g. `autoopt analyze {FLAGS[limit_name]} "
                      f"{_raised(limit_name, value)} ...`.")


def _raised(limit_name: str, value: int) -> str:
    if limit_name == "events":
        return str(value * 4)
    v = value * 4
    return f"{v // GiB}G" if v >= GiB else f"{max(v // MiB, 1)}M"
