"""A compact human-readable summary of an analysis result (the CLI prints it).

Every name in it comes from a trace or a file name (paths, devices, kernels, operators, sync
sites, notes): each goes through autoopt.safe.for_terminal, so control characters,
newlines and bidi controls in a name show as visible escapes and never act on the terminal.
"""
from __future__ import annotations

from typing import Any

from autoopt.safe import for_terminal as _safe


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def _short(name: Any, width: int = 70) -> str:
    name = _safe(name)
    return name if len(name) <= width else name[: width - 3] + "..."


def _header(t: dict) -> list[str]:
    dev = t["device"]
    dev_s = _safe(dev["name"]) if dev["type"] == "cuda" else "CPU only"
    if dev.get("compute_capability"):
        dev_s += f" (sm {_safe(dev['compute_capability'])})"
    lines = [f"{_safe(t['path'])}  rank {_safe(t['rank'])}  {dev_s}  {t['events']} events"]
    st = t.get("step_time_ms")
    steps = f"{t['steps']} steps" if t["steps_from_spans"] else "no ProfilerStep spans (one window)"
    if st:
        lines.append(f"  {steps}: step time mean {_ms(st['mean'])}, median {_ms(st['median'])}, "
                     f"min {_ms(st['min'])}, max {_ms(st['max'])}")
    if t["gpu_utilization"] is not None:
        lines.append(f"  GPU utilization {_pct(t['gpu_utilization'])}, est. SM efficiency "
                     f"{_pct(t['sm_efficiency'])}, est. occupancy {_pct(t['achieved_occupancy'])}, "
                     f"tensor-core kernels {_pct(t['tensor_core_kernel_ratio'])}")
    mean = (st or {}).get("mean") or 0
    parts = [f"{k} {v:.2f} ({100 * v / mean:.1f}%)" for k, v in t["breakdown_ms"].items() if v and mean]
    if parts:
        lines.append("  step breakdown (ms): " + ", ".join(parts))
    return lines


def _metrics_line(m: dict) -> list[str]:
    extra = []
    if m.get("matmul_fraction") is not None:
        fp32 = m.get("fp32_matmul_fraction")
        extra.append(f"matmul/conv {_pct(m['matmul_fraction'])} of compute"
                     + (f" ({_pct(fp32)} fp32)" if fp32 is not None else ""))
    if m.get("idle_fraction") is not None:
        extra.append(f"GPU idle {_pct(m['idle_fraction'])} (host wait {_pct(m['host_wait_fraction'])}, "
                     f"kernel wait {_pct(m['kernel_wait_fraction'])})")
    if m.get("sync_count_per_step"):
        extra.append(f"{m['sync_count_per_step']:.1f} host-device syncs/step")
    if m.get("host_reads_per_step"):
        extra.append(f"{m['host_reads_per_step']:.1f} host reads (item()) per step, each a sync on a GPU")
    if m.get("pageable_h2d_fraction") is not None:
        extra.append(f"pageable H2D {_pct(m['pageable_h2d_fraction'])}")
    if m.get("peak_memory_mb") is not None:
        extra.append(f"peak memory {m['peak_memory_mb']:.1f} MB")
    if m.get("ops_per_step") is not None:
        extra.append(f"{m['ops_per_step']:.0f} ops/step")
    return ["  " + "; ".join(extra)] if extra else []


def _tops(t: dict) -> list[str]:
    lines = []
    if t["top_kernels"]:
        lines.append("  top kernels:")
        for k in t["top_kernels"][:5]:
            lines.append(f"    {k['total_ms']:10.2f} ms {k['calls']:7d}x  {_short(k['name'])}")
    if t["top_operators"]:
        lines.append("  top operators (self time):")
        gpu = t["device"]["type"] == "cuda"
        for o in t["top_operators"][:5]:
            v = o["device_self_ms"] if gpu else o["host_self_ms"]
            lines.append(f"    {v:10.2f} ms {o['calls']:7d}x  {_short(o['name'])}")
    for s in t["syncs"]["sites"][:3]:
        lines.append(f"  sync: {_safe(s['name'])} x{s['count']}" + (f" at {_safe(s['source'])}" if s["source"] else ""))
    return lines + [f"  note: {_safe(n)}" for n in t["notes"]]


def _ranks(r: dict) -> list[str]:
    if not r:
        return []
    head = f"{r['rank_count']} ranks: step-time skew {_pct(r['rank_step_skew'])}"
    if r.get("slowest_rank") is not None:
        head += f", slowest rank {_safe(r['slowest_rank'])}"
    if r.get("straggler_rank") is not None:
        head += f", straggler (least collective wait) rank {_safe(r['straggler_rank'])}"
    if r.get("comm_overlap_fraction") is not None:
        head += f", comm/compute overlap {_pct(r['comm_overlap_fraction'])}"
    return [head] + [f"  rank {_safe(row['rank'])}: step {_ms(row['step_time_ms'])}, comm "
                     f"{_ms(row['comm_kernel_ms_per_step'])}/step, GPU util {_pct(row['gpu_utilization'])}"
                     for row in r["per_rank"]]


def render_text(result: dict) -> str:
    """Each trace (header, metrics, top kernels and operators, syncs, notes), then the ranks."""
    lines: list[str] = []
    for t in result.get("traces", []):
        lines += _header(t) + _metrics_line(t["metrics"]) + _tops(t)
    lines += _ranks(result.get("ranks") or {})
    lines += [f"note: {_safe(n)}" for n in result.get("notes", [])]
    return "\n".join(lines)
