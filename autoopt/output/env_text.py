"""`autoopt env` as text: what autoopt.env.env_info found, for a terminal."""
from __future__ import annotations

from typing import Any


def render_env(info: dict[str, Any]) -> str:
    """Human-readable text of env_info() (the CLI prints it)."""

    def yn(v: Any) -> str:
        return "unknown" if v is None else ("yes" if v else "no")

    lines = [
        f"autoopt {info.get('autoopt_version')}  (Python {info.get('python_version')}, {info.get('platform')})",
        "",
        "Software",
        f"  torch          {info.get('torch_version')}"
        + ("" if info.get("cuda_version") or info.get("hip_version") else "  (CPU-only build)"),
        f"  CUDA           {info.get('cuda_version') or '-'}"
        + (f"   ROCm/HIP {info['hip_version']}" if info.get("hip_version") else ""),
        f"  cuDNN          {info.get('cudnn_version') or '-'}"
        + ("" if info.get("cudnn_enabled") else "  (disabled)"),
        f"  driver         {info.get('driver_version') or '-'}",
        "",
    ]
    dev = info.get("device") or {}
    lines.append(f"Selected device  {dev.get('type')}" + (f"  {dev.get('name')}" if dev.get("name") else ""))
    gpus = info.get("gpus") or []
    if gpus:
        lines.append("")
        lines.append("GPUs")
        for g in gpus:
            peak = g.get("peak_tflops") or {}
            peak_s = ", ".join(f"{k} {v:g}" for k, v in peak.items()) if peak else "unknown"
            lines += [
                f"  [{g['index']}] {g['name']}  ({g.get('vendor')})",
                f"      compute capability {g.get('compute_capability')}, "
                f"{g.get('total_memory_mb', 0) / 1024:.1f} GiB, "
                f"{g.get('sm_count')} SMs",
                f"      bf16 {yn(g.get('bf16'))}, TF32 {yn(g.get('tf32'))}, fp16 tensor cores "
                f"{yn(g.get('tensor_cores'))}",
                f"      peak dense TFLOP/s: {peak_s}",
            ]
    else:
        lines.append(f"GPUs             none visible to torch (NVIDIA GPU on this machine: "
                     f"{yn(info.get('nvidia_gpu_present'))})")
    cpu = info.get("cpu") or {}
    vx = cpu.get("vector_extensions") or {}
    lines += [
        "",
        "CPU",
        f"  model          {cpu.get('model')}",
        f"  CPUs           {cpu.get('available_cpus')} available of {cpu.get('logical_cpus')}; torch threads "
        f"{cpu.get('torch_threads')}",
        f"  vector ext.    AVX2 {yn(vx.get('avx2'))}, AVX-512 {yn(vx.get('avx512f'))}, "
        f"AVX-512 BF16 {yn(vx.get('avx512_bf16'))}, AMX {yn(vx.get('amx'))}",
        f"  torch kernels  {cpu.get('torch_cpu_capability') or '-'}; fast bf16 {yn(cpu.get('bf16'))}",
    ]
    settings = info.get("settings") or {}
    lines += [
        "",
        "Settings",
        f"  matmul precision {settings.get('env.matmul_precision')}, cudnn.benchmark "
        f"{yn(settings.get('env.cudnn_benchmark'))}, "
        f"deterministic {yn(settings.get('env.deterministic'))}",
    ]
    warns = info.get("warnings") or []
    if warns:
        lines += ["", "Warnings"] + [f"  ! {w}" for w in warns]
    return "\n".join(lines)
