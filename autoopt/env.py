"""The environment: which device autoopt runs on and what it can do.

`detect_capabilities` reads the live machine once; everything downstream receives the
resulting `Capabilities` as an argument (never reads globals), so GPU decisions can be
tested on a CPU-only machine with `capabilities_for(...)` built from a trace's
deviceProperties. `env_info` backs `autoopt env` (rendered by autoopt.output.env_text);
`env_facts` gives the
`env.*` facts that rules read.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

from autoopt.errors import UserError
from autoopt.types import Capabilities

# CPU flags (as /proc/cpuinfo spells them) that matter for autoopt's decisions.
CPU_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)

# Peak dense (no 2:4 sparsity) throughput in TFLOP/s per device, by math mode.
#
# Sources: the vendors' datasheets and architecture whitepapers.
# - NVIDIA datasheets list tensor-core figures "with sparsity" for Ampere and later; the
#   dense figure used here is half of that (the datasheets' own footnote). fp32 is the
#   non-tensor FP32 figure. V100 / T4 / A100 / A10 / L4 / L40S / H100 / H200 datasheets.
# - GeForce cards (RTX 3090, RTX 4090): the Ampere GA102 and Ada AD102 whitepapers'
#   "FP16 / BF16 Tensor TFLOPS with FP32 accumulate" (what autocast uses), dense.
# - AMD Instinct datasheets (CDNA has no sparsity in these figures); fp32 is the matrix
#   (MFMA) figure, which rocBLAS uses for fp32 GEMMs. An MI250 / MI250X carries two GCDs
#   that each appear to torch as one device, so its figures here are per GCD (half the
#   datasheet's per-module numbers).
# A key missing from an entry means the device has no such math mode.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "V100-SXM2": {"fp32": 15.7, "fp16": 125.0},
    "V100-PCIe": {"fp32": 14.0, "fp16": 112.0},
    "T4": {"fp32": 8.1, "fp16": 65.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05},
    "H100-SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100-PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5},
    "H100-NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H200-NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "MI250X": {"fp32": 47.85, "bf16": 191.5, "fp16": 191.5},  # per GCD
    "MI250": {"fp32": 45.25, "bf16": 181.05, "fp16": 181.05},  # per GCD
    "MI300X": {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4},
}

# AMD devices often report a generic name ("AMD Radeon Graphics") under ROCm; their
# compute-unit count (torch's multi_processor_count) identifies the part.
_AMD_BY_CU = {104: "MI250", 110: "MI250X", 304: "MI300X"}


def _hopper_key(n: str, sm_count: Optional[int]) -> Optional[str]:
    if "H200" in n:
        return "H200-NVL" if "NVL" in n else "H200"
    if "GH200" in n:
        return "H100-SXM"  # the GH200's GPU has the H100 SXM's datasheet figures
    if "H100" in n:
        if "PCIE" in n or sm_count == 114:
            return "H100-PCIe"
        return "H100-NVL" if "NVL" in n else "H100-SXM"
    return None


# (a pattern in the upper-cased device name, the PEAK_TFLOPS entry), first match wins
_NAME_PATTERNS = (
    (r"A100", "A100"), (r"\bA10\b", "A10"), (r"L40S", "L40S"), (r"\bL4\b", "L4"), (r"\bT4\b", "T4"),
    (r"V100.*PCIE|PCIE.*V100", "V100-PCIe"), (r"V100", "V100-SXM2"),
    (r"RTX 3090(?! TI)\b", "RTX 3090"), (r"RTX 4090(?! D)\b", "RTX 4090"),
    (r"MI250X", "MI250X"), (r"MI250", "MI250"), (r"MI300X", "MI300X"),
)


def peak_key(name: str, *, sm_count: Optional[int] = None) -> Optional[str]:
    """The PEAK_TFLOPS entry that a device name denotes, or None when unknown."""
    n = name.upper().replace("_", " ")
    key = _hopper_key(n, sm_count)
    if key is not None:
        return key
    for pattern, entry in _NAME_PATTERNS:
        if re.search(pattern, n):
            return entry
    if _looks_amd(n) and sm_count in _AMD_BY_CU:
        return _AMD_BY_CU[sm_count]
    return None


def _looks_amd(name: str) -> bool:
    n = name.upper()
    return "AMD" in n or "RADEON" in n or "INSTINCT" in n or re.search(r"\bMI\d{2,3}", n) is not None


def _normalize_cc(cc: Any) -> Optional[tuple[int, int]]:
    if cc is None or cc == "":
        return None
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return int(cc[0]), int(cc[1])
    s = str(cc).strip()
    m = re.fullmatch(r"(\d+)\.(\d+)", s)
    if m:
        return int(m.group(1)), int(m.group(2))
    if s.isdigit():
        return int(s), 0
    raise ValueError(f"compute capability {cc!r} is not 'major.minor'")


def capabilities_for(
    device_type: str,
    name: str,
    compute_capability: Any,
    memory_mb: Optional[float],
    sm_count: Optional[int],
    cpu_flags: Iterable[str] = (),
    *,
    vendor: Optional[str] = None,
) -> Capabilities:
    """Capabilities from given facts (a live device, or a trace's deviceProperties).

    compute_capability: (major, minor), "8.0", 8.0 or None. vendor: "nvidia" / "amd";
    inferred from the name when not given.
    """
    flags = tuple(sorted({f.lower() for f in cpu_flags}))
    if device_type == "cpu":
        bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        fp16 = "avx512_fp16" in flags or "amx_fp16" in flags
        return Capabilities(
            device_type="cpu",
            name=name,
            compute_capability=None,
            total_memory_mb=memory_mb,
            sm_count=None,
            bf16=bf16,
            fp16=fp16,
            tf32=False,
            tensor_cores=False,
            cpu_flags=flags,
            vendor="",
            peak_tflops={},
        )
    if device_type != "cuda":
        raise ValueError(f"device_type must be 'cpu' or 'cuda', not {device_type!r}")
    cc = _normalize_cc(compute_capability)
    if vendor is None:
        vendor = "amd" if _looks_amd(name) else "nvidia"
    if vendor == "amd":
        # CDNA matrix cores (MI100: 120 CUs, MI200, MI300: arch 9.4) and RDNA3+ WMMA (11.x+)
        # run fp16/bf16 matrix math; older gfx9 parts (MI50/MI60) do not.
        n = name.upper()
        matrix = cc is not None and (
            cc >= (9, 4)
            or cc[0] >= 11
            or (cc[0] == 9 and (sm_count in (104, 110, 120) or re.search(r"MI(1|2|3)\d\d", n) is not None))
        )
        bf16 = fp16 = tensor_cores = bool(matrix)
        tf32 = False  # ROCm torch does not use TF32-style math for fp32 matmuls by default
    else:
        bf16 = tf32 = cc is not None and cc >= (8, 0)
        fp16 = tensor_cores = cc is not None and cc >= (7, 0)
    key = peak_key(name, sm_count=sm_count)
    return Capabilities(
        device_type="cuda",
        name=name,
        compute_capability=cc,
        total_memory_mb=memory_mb,
        sm_count=sm_count,
        bf16=bf16,
        fp16=fp16,
        tf32=tf32,
        tensor_cores=tensor_cores,
        cpu_flags=flags,
        vendor=vendor,
        peak_tflops=dict(PEAK_TFLOPS[key]) if key else {},
    )


# ---------------------------------------------------------------------------- CPU facts


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags_from_cpuinfo(text: str) -> tuple[str, ...]:
    """The flags of interest from /proc/cpuinfo text (x86 'flags', Arm 'Features')."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            present = set(value.split())
            return tuple(f for f in CPU_FLAGS_OF_INTEREST if f in present)
    return ()


def cpu_model_from_cpuinfo(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...]:
    return cpu_flags_from_cpuinfo(_read("/proc/cpuinfo"))


def cpu_model() -> str:
    return cpu_model_from_cpuinfo(_read("/proc/cpuinfo"))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_from_proc_stat(before: str, after: str) -> tuple[float, float]:
    """(busy jiffies, all jiffies) between two readings of /proc/stat's aggregate `cpu` line."""
    def parse(text: str) -> list[int]:
        for line in text.splitlines():
            if line.startswith("cpu "):
                return [int(x) for x in line.split()[1:]]
        raise ValueError("no aggregate cpu line in /proc/stat")
    a, b = parse(before), parse(after)
    d = [y - x for x, y in zip(a, b)]
    idle = d[3] + (d[4] if len(d) > 4 else 0)  # idle + iowait
    total = sum(d[:8])  # user nice system idle iowait irq softirq steal (steal: the host's other guests)
    return float(total - idle), float(total)


def self_jiffies_from_stat(text: str) -> int:
    """utime + stime of a process from its /proc/<pid>/stat line."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def cpu_busy_other(window_s: float = 0.3) -> Optional[float]:
    """Cores' worth of CPU time used by other processes over `window_s` (this process's own
    time subtracted), from /proc/stat; None where /proc is not there. Take it while this
    process is idle (before a run): its own threads would count as other work's neighbours."""
    import time

    try:
        s0, p0 = _read("/proc/stat"), _read("/proc/self/stat")
        if not s0 or not p0:
            return None
        time.sleep(window_s)
        s1, p1 = _read("/proc/stat"), _read("/proc/self/stat")
        busy, total = busy_from_proc_stat(s0, s1)
        own = self_jiffies_from_stat(p1) - self_jiffies_from_stat(p0)
    except (ValueError, IndexError):
        return None
    if total <= 0:
        return None
    ncpu = os.cpu_count() or 1
    return max(0.0, (busy - own) / total * ncpu)


def physical_cores_from_cpuinfo(text: str, allowed: Optional[set[int]] = None) -> Optional[int]:
    """Distinct (physical id, core id) pairs among the allowed processors; None when the
    file does not say (some VMs and Arm kernels)."""
    cores = set()
    proc = phys = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            proc = int(value) if value.isdigit() else None
        elif key == "physical id":
            phys = value
        elif key == "core id":
            if proc is not None and (allowed is None or proc in allowed):
                cores.add((phys, value))
        elif not line.strip():
            proc = phys = None
    return len(cores) or None


def physical_cores() -> Optional[int]:
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    return physical_cores_from_cpuinfo(_read("/proc/cpuinfo"), allowed)


def host_memory_mb() -> Optional[float]:
    """Total RAM, capped by a cgroup memory limit when one is set."""
    total = None
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    if m:
        total = int(m.group(1)) / 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        raw = _read(limit_file).strip()
        if raw.isdigit():
            limit = int(raw) / 2**20
            if total is None or limit < total:
                total = limit
            break
    return total


# ---------------------------------------------------------------------------- GPU facts


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU is visible to the OS, whether or not torch can use it: a PCI display /
    3D controller of vendor 0x10de, or the NVIDIA driver's /proc entries."""
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    pci = Path("/sys/bus/pci/devices")
    try:
        for dev in pci.iterdir():
            vendor = _read(str(dev / "vendor")).strip().lower()
            cls = _read(str(dev / "class")).strip().lower()
            if vendor == "0x10de" and cls.startswith("0x03"):
                return True
    except OSError:
        pass
    return False


def driver_version() -> Optional[str]:
    """NVIDIA driver version from nvidia-smi, else /proc/driver/nvidia/version."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            first = out.stdout.strip().splitlines()
            if out.returncode == 0 and first and first[0].strip():
                return first[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    m = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", _read("/proc/driver/nvidia/version"))
    return m.group(1) if m else None


# Minimum Linux driver for a CUDA major version (CUDA toolkit release notes, table 3).
_MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v))


def _gpu_caps(index: int) -> Capabilities:
    import torch

    p = torch.cuda.get_device_properties(index)
    return capabilities_for(
        "cuda",
        p.name,
        (p.major, p.minor),
        p.total_memory / 2**20,
        p.multi_processor_count,
        cpu_flags(),
        vendor="amd" if getattr(torch.version, "hip", None) else "nvidia",
    )


def _cpu_caps() -> Capabilities:
    return capabilities_for("cpu", cpu_model(), None, host_memory_mb(), None, cpu_flags())


def detect_capabilities(device: str = "auto") -> Capabilities:
    """Capabilities of the device a run will use. device: 'auto' (cuda when available),
    'cpu', 'cuda' or 'cuda:N'."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return _gpu_caps(torch.cuda.current_device()) if torch.cuda.is_available() else _cpu_caps()
    if device == "cpu":
        return _cpu_caps()
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise UserError(
            f"--device {device!r} is not a device autoopt knows. Fix: use --device auto (a GPU when "
            "there is one), --device cuda, --device cuda:N or --device cpu."
        )
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for, but {_why_no_cuda()} Fix: {_no_cuda_fix()}")
    index = int(m.group(1)) if m.group(1) else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"--device {device} was asked for, but torch sees {count} GPU(s) (indices 0..{count - 1}). "
            "Fix: pick an index below that, or check CUDA_VISIBLE_DEVICES."
        )
    return _gpu_caps(index)


def _torch_gpu_build() -> bool:
    import torch

    return bool(torch.version.cuda or getattr(torch.version, "hip", None))


def _why_no_cuda() -> str:
    import torch

    if not _torch_gpu_build():
        return f"the installed torch {torch.__version__} is a CPU-only build."
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU."
    if not nvidia_gpu_present() and not getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a CUDA build but this machine shows no NVIDIA GPU."
    return f"torch {torch.__version__} is a GPU build but cannot reach a GPU (driver missing or too old?)."


def _no_cuda_fix() -> str:
    if not _torch_gpu_build():
        if nvidia_gpu_present():
            return ("install a CUDA build of torch (pytorch.org lists the install command per CUDA version), "
                    "or run with --device cpu.")
        return "run with --device cpu (or --device auto), or run on a machine with a GPU and a CUDA build of torch."
    return "run `autoopt env` to see what is missing, or use --device cpu."


# ---------------------------------------------------------------------------- reports


def env_facts() -> dict[str, Any]:
    """The env.* facts: global torch settings at run time."""
    import torch

    cuda_available = torch.cuda.is_available()
    return {
        "env.cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "env.matmul_precision": torch.get_float32_matmul_precision(),
        "env.anomaly_detection": bool(torch.is_anomaly_enabled()),
        "env.deterministic": bool(torch.are_deterministic_algorithms_enabled()),
        "env.cuda_available": bool(cuda_available),
        "env.torch_cuda_build": _torch_gpu_build(),
        "env.nvidia_gpu_present": nvidia_gpu_present() or (cuda_available and not getattr(torch.version, "hip", None)),
        "env.num_threads": torch.get_num_threads(),
    }


def env_info() -> dict[str, Any]:
    """Everything `autoopt env --json` prints."""
    import torch

    from autoopt import __version__

    hip = getattr(torch.version, "hip", None)
    cuda_available = torch.cuda.is_available()
    gpus = []
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            caps = _gpu_caps(i)
            g = caps.to_json()
            g["index"] = i
            g["total_memory_mb"] = round(caps.total_memory_mb or 0, 1)
            gpus.append(g)
    flags = cpu_flags()
    nv_present = nvidia_gpu_present() or (cuda_available and not hip)
    cudnn_version = None
    if torch.backends.cudnn.is_available():
        try:
            cudnn_version = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001 - a broken cuDNN install is reported as unknown
            cudnn_version = None
    drv = driver_version() if nv_present else None
    try:
        cpu_capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        cpu_capability = None
    cpu = {
        "model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_mb": None if host_memory_mb() is None else round(host_memory_mb(), 1),
        "flags": list(flags),
        "vector_extensions": {
            "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "avx512_fp16": "avx512_fp16" in flags,
            "amx": "amx_tile" in flags or "amx_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
        },
        "torch_cpu_capability": cpu_capability,
        "bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }
    device = detect_capabilities("auto")
    info: dict[str, Any] = {
        "autoopt_version": __version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "torch_cuda_build": bool(torch.version.cuda),
        "cuda_version": torch.version.cuda,
        "hip_version": hip,
        "cudnn_version": cudnn_version,
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "driver_version": drv,
        "cuda_available": cuda_available,
        "gpu_count": len(gpus),
        "nvidia_gpu_present": nv_present,
        "device": device.to_json(),
        # the selected device, flat, for quick reading
        "gpu_name": gpus[0]["name"] if gpus else None,
        "compute_capability": gpus[0]["compute_capability"] if gpus else None,
        "gpu_memory_mb": gpus[0]["total_memory_mb"] if gpus else None,
        "sm_count": gpus[0]["sm_count"] if gpus else None,
        "bf16": device.bf16,
        "tf32": device.tf32,
        "tensor_cores": device.tensor_cores,
        "gpus": gpus,
        "cpu": cpu,
        "settings": env_facts(),
    }
    info["warnings"] = env_warnings(info)
    return info


def env_warnings(info: dict[str, Any]) -> list[str]:
    """Mismatches worth telling the user about, from an env_info() dict (pure)."""
    w: list[str] = []
    torch_v = info.get("torch_version")
    gpu_build = bool(info.get("cuda_version") or info.get("hip_version"))
    if info.get("nvidia_gpu_present") and not gpu_build:
        w.append(
            f"torch {torch_v} is a CPU-only build, but this machine has an NVIDIA GPU: autoopt can only "
            "use the CPU. Install a CUDA build of torch (pytorch.org lists the install command per CUDA version)."
        )
    if gpu_build and not info.get("cuda_available"):
        if info.get("cuda_version") and not info.get("nvidia_gpu_present"):
            w.append(f"torch {torch_v} is a CUDA {info.get('cuda_version')} build, but no NVIDIA GPU is visible: runs "
                     f"use the CPU.")
        else:
            w.append(
                f"torch {torch_v} is a GPU build and a GPU is present, but torch cannot use it "
                "(check CUDA_VISIBLE_DEVICES and that the driver is installed and new enough)."
            )
    if info.get("nvidia_gpu_present") and gpu_build and info.get("cuda_version") and not info.get("driver_version"):
        w.append("an NVIDIA GPU is present but no NVIDIA driver was found (no nvidia-smi, no "
                 "/proc/driver/nvidia/version).")
    drv, cuda_v = info.get("driver_version"), info.get("cuda_version")
    if drv and cuda_v:
        major = _version_tuple(cuda_v)[0]
        need = _MIN_DRIVER.get(major)
        if need and _version_tuple(drv)[:2] < need:
            w.append(
                f"NVIDIA driver {drv} is older than CUDA {major}.x needs (>= {need[0]}.{need[1]}); "
                "update the driver or install a torch build for an older CUDA."
            )
    if info.get("cuda_version") and not info.get("cudnn_enabled"):
        w.append("cuDNN is disabled (torch.backends.cudnn.enabled = False): convolutions run much slower.")
    if info.get("cuda_available") and info.get("cuda_version") and info.get("cudnn_version") is None:
        w.append("cuDNN is not available to this CUDA build of torch: convolutions fall back to slow kernels.")
    cpu = info.get("cpu") or {}
    threads, avail = cpu.get("torch_threads"), cpu.get("available_cpus")
    cores = cpu.get("physical_cores") or avail  # torch defaults to one thread per physical core
    if threads and cores and threads < cores:
        w.append(
            f"torch uses {threads} intra-op threads but {cores} CPU cores are available "
            "(OMP_NUM_THREADS or torch.set_num_threads limits it): CPU work runs slower than it could."
        )
    if threads and avail and threads > avail:
        w.append(f"torch uses {threads} intra-op threads on {avail} available CPUs: oversubscription slows CPU work.")
    settings = info.get("settings") or {}
    if settings.get("env.anomaly_detection"):
        w.append("autograd anomaly detection is on: every backward op is checked, which is very slow.")
    return w


__all__ = [
    "PEAK_TFLOPS",
    "available_cpus",
    "capabilities_for",
    "cpu_flags",
    "cpu_flags_from_cpuinfo",
    "cpu_model",
    "detect_capabilities",
    "driver_version",
    "env_facts",
    "env_info",
    "env_warnings",
    "nvidia_gpu_present",
    "peak_key",
    "physical_cores",
    "physical_cores_from_cpuinfo",
]
