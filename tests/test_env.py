"""autoopt.env: capabilities from given facts (real GPU traces' deviceProperties), the live
machine, `autoopt env` info and warnings."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from autoopt.env import (
    PEAK_TFLOPS,
    capabilities_for,
    cpu_flags_from_cpuinfo,
    cpu_model_from_cpuinfo,
    detect_capabilities,
    env_facts,
    env_info,
    env_warnings,
    peak_key,
    physical_cores_from_cpuinfo,
)
from autoopt.errors import UserError
from autoopt.facts import FACTS
from autoopt.output.env_text import render_env

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "tests" / "data" / "traces" / "real"


def _device_props(rel: str) -> dict:
    p = TRACES / rel
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt") as f:
        return json.load(f)["deviceProperties"][0]


def _caps_from_trace(rel: str):
    d = _device_props(rel)
    return capabilities_for(
        "cuda", d["name"], (d["computeMajor"], d["computeMinor"]), d["totalGlobalMem"] / 2**20, d["numSms"]
    )


def test_v100_trace_has_fp16_tensor_cores_but_no_bf16():
    c = _caps_from_trace("kineto/resnet50_v100_num_workers_0.pt.trace.json.gz")
    assert c.name == "Tesla V100-DGXS-32GB" and c.vendor == "nvidia"
    assert c.compute_capability == (7, 0)
    assert c.fp16 and c.tensor_cores
    assert not c.bf16 and not c.tf32
    assert c.peak_tflops == PEAK_TFLOPS["V100-SXM2"]
    assert "bf16" not in c.peak_tflops
    f = c.facts()
    assert f["device.compute_capability"] == 7.0 and f["device.bf16"] is False


def test_a100_trace_has_bf16_and_tf32():
    c = _caps_from_trace("hta/a100_ddp_rank0_2024.json.gz")
    assert c.bf16 and c.tf32 and c.fp16 and c.tensor_cores
    assert c.sm_count == 108
    assert c.peak_tflops["bf16"] > c.peak_tflops["tf32"] > c.peak_tflops["fp32"]
    assert peak_key(c.name) == "A100"


def test_amd_trace_is_recognised_by_compute_units():
    c = _caps_from_trace("hta/amd_mi250_rocm.json.gz")
    assert c.name == "AMD Radeon Graphics"
    assert c.vendor == "amd"
    assert c.bf16 and c.fp16 and c.tensor_cores  # CDNA2 matrix cores
    assert not c.tf32
    assert c.peak_tflops == PEAK_TFLOPS["MI250"]  # 104 CUs per GCD


def test_h100_trace():
    c = _caps_from_trace("kineto/h100_one_kernel_before.json")
    assert c.compute_capability == (9, 0) and c.bf16 and c.tf32
    assert peak_key(c.name, sm_count=c.sm_count) == "H100-SXM"
    assert c.peak_tflops["bf16"] == PEAK_TFLOPS["H100-SXM"]["bf16"]


@pytest.mark.parametrize(
    "name,sms,key",
    [
        ("NVIDIA H100 80GB HBM3", 132, "H100-SXM"),
        ("NVIDIA H100 PCIe", 114, "H100-PCIe"),
        ("NVIDIA H100 NVL", 132, "H100-NVL"),
        ("NVIDIA H200", 132, "H200"),
        ("NVIDIA A100-SXM4-80GB", 108, "A100"),
        ("NVIDIA A100 80GB PCIe", 108, "A100"),
        ("NVIDIA A10", 72, "A10"),
        ("NVIDIA A10G", 80, None),  # not an A10: no guessed numbers
        ("NVIDIA L4", 58, "L4"),
        ("NVIDIA L40S", 142, "L40S"),
        ("NVIDIA L40", 142, None),
        ("Tesla T4", 40, "T4"),
        ("Tesla V100-PCIE-16GB", 80, "V100-PCIe"),
        ("Tesla V100-SXM2-32GB", 80, "V100-SXM2"),
        ("NVIDIA GeForce RTX 3090", 82, "RTX 3090"),
        ("NVIDIA GeForce RTX 3090 Ti", 84, None),
        ("NVIDIA GeForce RTX 4090", 128, "RTX 4090"),
        ("AMD Instinct MI300X", 304, "MI300X"),
        ("AMD Instinct MI250X", 110, "MI250X"),
        ("NVIDIA GeForce GTX 1080", 20, None),
    ],
)
def test_peak_table_matching(name, sms, key):
    assert peak_key(name, sm_count=sms) == key


def test_peak_table_is_dense_and_ordered():
    for key, peaks in PEAK_TFLOPS.items():
        assert set(peaks) <= {"fp32", "tf32", "bf16", "fp16"}, key
        assert peaks["fp32"] > 0
        for mode in ("tf32", "bf16", "fp16"):
            if mode in peaks:
                assert peaks[mode] >= peaks["fp32"], key


@pytest.mark.parametrize(
    "cc,bf16,fp16,tf32",
    [((6, 1), False, False, False), ((7, 5), False, True, False), ((8, 6), True, True, True), ("9.0", True, True, True)],
)
def test_gpu_generations(cc, bf16, fp16, tf32):
    c = capabilities_for("cuda", "Some NVIDIA GPU", cc, 8192, 40)
    assert (c.bf16, c.fp16, c.tf32, c.tensor_cores) == (bf16, fp16, tf32, fp16)
    assert c.peak_tflops == {}


CPUINFO_SPR = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme avx avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
CPUINFO_ZEN2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme avx avx2 fma
"""


def test_cpu_bf16_needs_avx512_bf16_or_amx():
    spr = cpu_flags_from_cpuinfo(CPUINFO_SPR)
    assert {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"} <= set(spr)
    assert cpu_model_from_cpuinfo(CPUINFO_SPR) == "Intel(R) Xeon(R) Platinum 8480+"
    c = capabilities_for("cpu", "spr", None, 1024, None, spr)
    assert c.bf16 and c.facts()["device.cpu_amx"] and c.facts()["device.cpu_avx512_bf16"]
    assert not c.tensor_cores and c.peak_tflops == {} and c.vendor == ""
    z = capabilities_for("cpu", "zen2", None, 1024, None, cpu_flags_from_cpuinfo(CPUINFO_ZEN2))
    assert not z.bf16 and not z.fp16
    assert z.cpu_flags == ("avx2", "fma")
    amx_only = capabilities_for("cpu", "x", None, None, None, ("amx_tile", "amx_bf16"))
    assert amx_only.bf16


def test_physical_cores_counts_distinct_cores_in_the_affinity_set():
    smt = "".join(
        f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 4}\n\n" for i in range(8)
    )
    assert physical_cores_from_cpuinfo(smt) == 4
    assert physical_cores_from_cpuinfo(smt, {0, 4}) == 1
    assert physical_cores_from_cpuinfo(smt, {0, 1}) == 2
    assert physical_cores_from_cpuinfo("processor\t: 0\n") is None


def test_detect_cpu_reads_this_machine():
    c = detect_capabilities("cpu")
    assert c.device_type == "cpu"
    flags = cpu_flags_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert c.cpu_flags == tuple(sorted(flags))
    assert c.bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert c.total_memory_mb and c.total_memory_mb > 0
    assert c.peak_tflops == {}


def test_auto_picks_cuda_only_when_available():
    c = detect_capabilities("auto")
    assert c.device_type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_or_missing_device_is_a_user_error():
    with pytest.raises(UserError) as info:
        detect_capabilities("tpu")
    assert "--device" in info.value.message and "Fix:" in info.value.message
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as info:
            detect_capabilities("cuda")
        assert "Fix:" in info.value.message and "--device cpu" in info.value.message


def test_env_info_is_json_and_complete():
    info = env_info()
    json.dumps(info)  # serialisable as-is
    for key in (
        "torch_version", "cuda_version", "cudnn_version", "driver_version", "gpu_name", "compute_capability",
        "gpu_memory_mb", "sm_count", "bf16", "tf32", "tensor_cores", "cpu", "warnings", "device", "gpus",
    ):
        assert key in info, key
    assert info["torch_version"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["cpu"]["vector_extensions"]) >= {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert isinstance(info["warnings"], list)
    text = render_env(info)
    assert torch.__version__ in text and "AVX-512 BF16" in text and "Selected device" in text


def test_env_facts_cover_the_registry():
    facts = env_facts()
    # the other work on the cores is measured before a run, while autoopt is idle (autoopt.workload.
    # inspect.note_cpu_load), and the free cores derived from it (facts_builder.cpu_share_facts)
    measured_apart = {"env.cpus_busy_other", "env.cpus_free", "env.threads_over_free"}
    assert set(facts) == {k for k in FACTS if k.startswith("env.")} - measured_apart
    assert facts["env.num_threads"] == torch.get_num_threads()
    assert facts["env.matmul_precision"] == torch.get_float32_matmul_precision()


def _info(**over):
    base = {
        "torch_version": "2.5.0+cpu",
        "cuda_version": None,
        "hip_version": None,
        "cudnn_version": None,
        "cudnn_enabled": True,
        "driver_version": None,
        "cuda_available": False,
        "nvidia_gpu_present": False,
        "cpu": {"torch_threads": 4, "available_cpus": 4},
        "settings": {},
    }
    base.update(over)
    return base


def test_warnings_for_mismatches():
    assert env_warnings(_info()) == []
    w = env_warnings(_info(nvidia_gpu_present=True, driver_version="550.54.15"))
    assert len(w) == 1 and "CPU-only build" in w[0] and "NVIDIA GPU" in w[0]
    w = env_warnings(_info(torch_version="2.5.0+cu124", cuda_version="12.4"))
    assert any("no NVIDIA GPU is visible" in x for x in w)
    w = env_warnings(_info(torch_version="2.5.0+cu124", cuda_version="12.4", cuda_available=True,
                           nvidia_gpu_present=True, driver_version="470.82.01", cudnn_version=90100))
    assert any("older than CUDA 12.x needs" in x for x in w)
    w = env_warnings(_info(torch_version="2.5.0+cu124", cuda_version="12.4", cuda_available=True,
                           nvidia_gpu_present=True, driver_version="550.54.15", cudnn_version=90100,
                           cudnn_enabled=False))
    assert w == ["cuDNN is disabled (torch.backends.cudnn.enabled = False): convolutions run much slower."]
    w = env_warnings(_info(cpu={"torch_threads": 1, "available_cpus": 8}))
    assert any("1 intra-op threads but 8" in x for x in w)
    # torch's default of one thread per physical core on an SMT machine is not a mismatch
    assert env_warnings(_info(cpu={"torch_threads": 8, "available_cpus": 16, "physical_cores": 8})) == []
    assert "Warnings" in render_env({**_info(nvidia_gpu_present=True), "warnings": ["x"]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_live_gpu_capabilities():
    c = detect_capabilities("cuda")
    p = torch.cuda.get_device_properties(0)
    assert c.name == p.name and c.sm_count == p.multi_processor_count
    assert c.compute_capability == (p.major, p.minor)
    assert c.bf16 == (torch.version.hip is not None or (p.major, p.minor) >= (8, 0))
    info = env_info()
    assert info["gpu_name"] == p.name and info["gpu_count"] == torch.cuda.device_count()
    assert info["driver_version"]
    assert detect_capabilities("cuda:0").name == p.name
    with pytest.raises(UserError):
        detect_capabilities(f"cuda:{torch.cuda.device_count()}")
