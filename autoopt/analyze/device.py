"""The device a trace ran on, from deviceProperties (or kernel and runtime names), and the
`device.*` facts derivable from it."""
from __future__ import annotations

from typing import Any, Optional

from autoopt.analyze import trace as T
from autoopt.analyze.gpu_metrics import device_props


def _vendor(tr: T.Trace, name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("amd", "radeon", "instinct", "mi100", "mi200", "mi250", "mi300")):
        return "amd"
    rt = tr.idx(T.RUNTIME)
    if rt.size and tr.names[int(tr.name[rt[0]])].startswith("hip"):
        return "amd"
    return "nvidia"


def device_info(tr: T.Trace) -> dict[str, Any]:
    props = device_props(tr)
    if not tr.has_gpu:
        return {"name": "cpu", "type": "cpu", "vendor": "", "sm_count": None, "compute_capability": None,
                "memory_mb": None, "count": 0}
    used = sorted(set(tr.device[tr.mask(*T.GPU_KINDS)].tolist()))
    p = None
    for q in props:
        if q.get("id") in used:
            p = q
            break
    if p is None and props:
        p = props[0]
    p = p or {}
    name = str(p.get("name", "")) or "unknown GPU"
    vendor = _vendor(tr, name)
    major = p.get("computeMajor", p.get("major"))
    minor = p.get("computeMinor", p.get("minor"))
    cc = f"{major}.{minor}" if isinstance(major, int) and isinstance(minor, int) else None
    mem = p.get("totalGlobalMem")
    return {
        "name": name, "type": "cuda", "vendor": vendor,
        "sm_count": p.get("numSms", p.get("multiProcessorCount")),
        "compute_capability": cc if vendor == "nvidia" else None,
        "arch": f"gfx{major}{minor}" if vendor == "amd" and cc else None,
        "memory_mb": round(mem / 2**20, 1) if isinstance(mem, (int, float)) else None,
        "count": len(used),
    }


def device_facts(dev: dict[str, Any]) -> dict[str, Any]:
    if dev["type"] != "cuda":
        return {"device.type": "cpu", "device.name": dev.get("name", "cpu"), "device.vendor": "",
                "device.compute_capability": None, "device.memory_mb": None, "device.bf16": None,
                "device.fp16": False, "device.tf32": False, "device.tensor_cores": False}
    cc: Optional[float] = float(dev["compute_capability"]) if dev.get("compute_capability") else None
    if dev["vendor"] == "amd":
        arch = dev.get("arch") or ""
        cdna = arch.startswith("gfx9")  # MI100 / MI200 / MI300: matrix cores with fp16 and bf16
        return {"device.type": "cuda", "device.name": dev["name"], "device.vendor": "amd",
                "device.compute_capability": None, "device.memory_mb": dev.get("memory_mb"),
                "device.bf16": cdna, "device.fp16": True, "device.tf32": False, "device.tensor_cores": cdna}
    return {"device.type": "cuda", "device.name": dev["name"], "device.vendor": "nvidia",
            "device.compute_capability": cc, "device.memory_mb": dev.get("memory_mb"),
            "device.bf16": None if cc is None else cc >= 8.0,
            "device.fp16": None if cc is None else cc >= 7.0,
            "device.tf32": None if cc is None else cc >= 8.0,
            "device.tensor_cores": None if cc is None else cc >= 7.0}
