"""Precision, measured: model files with one planted bottleneck each make exactly their
family fire; control files keep those rules silent.

The models live in tests/planted/ (each file's docstring says what is planted). The
first group of tests profiles each model file on this machine's CPU — measure, trace
with torch.profiler, analyze the trace, evaluate the shipped rules — as
`autoopt profile --device cpu` does (autoopt.pipelines.profile.profile_model; `cpu_run` below
runs the same stages with fewer steps and keeps the facts), and asserts on which rules
fire, never on timings.

Families whose rules need a GPU fact are tested in two honest ways:

- AO1 (precision): the CPU runs are judged on the capabilities of an AVX2 CPU without fast
  bf16 (passed in, whatever this machine has), so the CPU rule AO104 must stay silent there
  (and fires where the CPU has AVX-512 BF16 / AMX). The GPU rules are checked on the
  fp32-GEMM model's real CPU-trace facts with the device facts replaced by a real GPU's
  capabilities, taken from the deviceProperties of the real traces in tests/data/traces/real
  (A100 and H100: bf16 + TF32; V100: fp16 with GradScaler, never bf16). The matmul shares
  come from the CPU trace, which is where this model spends its time.
- Every family, AO6 (host-device synchronisation, which has no CPU rule: on a CPU
  `.item()` waits for nothing) included, is also checked on traces of the same model
  files recorded on a real GPU (an H200; tests/planted/gpu_traces/, written by
  tests/planted/record_gpu_traces.py) and analyzed here.

AO9 (environment) is left out of "exactly": its rules describe the machine (thread count,
CUDA build), not the model file.
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from autoopt.diagnosis import rules as R
from autoopt.diagnosis.facts_builder import from_analysis

HERE = Path(__file__).resolve().parent
PLANTED = HERE / "planted"
GPU_TRACES = PLANTED / "gpu_traces"
TRACES = HERE / "data" / "traces" / "real"
RULES = R.load_rules()

MODEL_FAMILIES = tuple(f"AO{i}" for i in range(1, 9))


@pytest.fixture(autouse=True)
def _no_host_capabilities(monkeypatch):
    """These tests judge the planted models on capabilities they pass in (AVX2_CPU, real GPU
    traces' deviceProperties), never on the machine running them: reading the host's CPU or
    GPU capabilities fails the test, so the suite gives the same verdicts on a CPU with fast
    bf16 / AMX and on one without."""
    import autoopt.env as env

    def host_read(*_a, **_k):
        raise AssertionError("a planted test read the host's capabilities; pass them in instead")

    for name in ("detect_capabilities", "cpu_flags", "cpu_model"):
        monkeypatch.setattr(env, name, host_read)


def families(codes) -> set[str]:
    return {c[:3] for c in codes if c[:3] in MODEL_FAMILIES}


def codes(findings) -> list[str]:
    return [f.code for f in findings]


@functools.lru_cache(maxsize=None)
def cpu_run(name: str, with_stack: bool = False) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Profile tests/planted/<name>.py on the CPU the way profile_model does (load, build the
    workload, measure, trace, analyze, build_facts, evaluate), with few steps; returns the
    facts the rules read and the codes that fired. Cached: one profile per model per run."""
    import tempfile

    from autoopt.analyze import analyze_paths
    from autoopt.diagnosis.facts_builder import build_facts
    from autoopt.run.measure import MeasureSettings, measure
    from autoopt.run.session import Session
    from autoopt.run.trace import ProfileSettings, new_run_dir, trace_session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    spec = load_model_file(str(PLANTED / f"{name}.py"))
    caps = AVX2_CPU
    wl = build_workload(spec, caps, seed=0)
    few = MeasureSettings(warmup_steps=1, warmup_min_s=0.0, min_steps=3, max_steps=3, min_time_s=0.0, max_time_s=5.0)
    with tempfile.TemporaryDirectory() as tmp:
        with Session(wl, wl.base_config()) as s:
            m = measure(s, caps, few)
            run = trace_session(s, new_run_dir(Path(tmp), name),
                                ProfileSettings(wait=0, warmup=1, active=2, with_stack=with_stack))
        analysis = analyze_paths([str(run.run_dir)])
    facts = build_facts(analysis=analysis, device=caps, live=True, workload=wl.facts, measurement=m)
    return facts, tuple(codes(R.evaluate(RULES, facts)))


def gpu_facts(rel: str) -> dict[str, Any]:
    """device.* facts from a real GPU trace's deviceProperties (autoopt.env.capabilities_for)."""
    from autoopt.env import capabilities_for

    p = TRACES / rel
    if not p.exists():
        pytest.skip(f"{p} is not available")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt") as f:
        d = json.load(f)["deviceProperties"][0]
    caps = capabilities_for("cuda", d["name"], (d["computeMajor"], d["computeMinor"]),
                            d["totalGlobalMem"] / 2**20, d["numSms"])
    return caps.facts()


def _avx2_cpu():
    """A 2-core CPU with AVX2 and no fast bf16 (no AVX-512 BF16, no AMX): the capabilities the
    CPU runs below are judged on, whatever the machine running the tests has."""
    from autoopt.env import capabilities_for

    return capabilities_for("cpu", "AMD EPYC (AVX2 only)", None, 24 * 1024, None, ("avx2", "fma"))


AVX2_CPU = _avx2_cpu()


def amx_cpu_facts() -> dict[str, Any]:
    """device.* facts of a CPU with AVX-512 BF16 and AMX (Sapphire Rapids flags)."""
    from autoopt.env import capabilities_for

    caps = capabilities_for("cpu", "Intel Xeon Platinum 8480", None, 512 * 1024, None,
                            ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    return caps.facts()


def evaluate_on(facts: dict[str, Any], device: dict[str, Any]) -> list[str]:
    return codes(R.evaluate(RULES, {**facts, **device}))


H100 = "kineto/h100_one_kernel_before.json"
A100 = "hta/a100_ddp_rank0_2024.json.gz"
V100 = "kineto/resnet50_v100_num_workers_0.pt.trace.json.gz"


# --------------------------------------------------------------------------- planted, on this CPU


@pytest.mark.slow  # profiles a real model on the CPU
def test_slow_input_pipeline_fires_ao5_only():
    facts, found = cpu_run("slow_loader")
    assert facts["workload.dataloader_workers"] == 0
    assert "AO501" in found, (found, facts["metrics.dataloader_fraction"])
    assert facts["metrics.dataloader_fraction"] >= 0.1
    assert families(found) == {"AO5"}, found


@pytest.mark.slow  # profiles a real model on the CPU
def test_host_read_in_every_block_shows_in_the_trace():
    facts, found = cpu_run("host_read", with_stack=True)
    src = (PLANTED / "host_read.py").read_text().splitlines()
    item_line = next(i for i, s in enumerate(src, 1) if ".item()" in s and "planted" in s)
    # torch.profiler's Python frames name a function by its first line (co_firstlineno), so
    # the site is the `def forward` of the block that calls .item(), the closest the trace knows
    def_line = max(i for i, s in enumerate(src[:item_line], 1) if s.strip().startswith("def forward"))
    assert facts["metrics.host_reads_per_step"] >= 8  # one host read per block, 8 blocks
    assert facts["metrics.sync_count_per_step"] is None  # a CPU has no device to wait for
    sites = facts.get("metrics.sync_sites") or []
    assert any(f"host_read.py:{def_line} (forward)" in s and "item" in s for s in sites), sites
    # no CPU rule: on a CPU .item() waits for nothing; and no other family fires
    assert families(found) == set(), found


@pytest.mark.slow  # profiles a real model on the CPU
def test_thousands_of_tiny_operators_fire_ao3_only():
    facts, found = cpu_run("tiny_ops")
    assert facts["metrics.ops_per_step"] >= 200
    assert "AO303" in found
    assert families(found) == {"AO3"}, found


@pytest.mark.slow  # profiles a real model on the CPU
def test_fp32_gemms_fire_ao1_by_device():
    facts, found = cpu_run("fp32_gemm")
    assert facts["metrics.matmul_fraction"] >= 0.3 and facts["metrics.fp32_matmul_fraction"] >= 0.99
    # on an AVX2 CPU (the capabilities cpu_run passes in): no fast bf16, so AO104 stays silent
    assert facts["device.bf16"] is False
    expected = {"AO1"} if facts["device.bf16"] else set()
    assert families(found) == expected, found
    assert ("AO104" in found) == bool(facts["device.bf16"])
    # the same trace facts on devices with fast reduced precision
    assert "AO104" in evaluate_on(facts, amx_cpu_facts())
    for trace in (H100, A100):
        on_gpu = evaluate_on(facts, gpu_facts(trace))
        assert "AO101" in on_gpu and "AO103" in on_gpu and "AO102" not in on_gpu, (trace, on_gpu)
    on_v100 = evaluate_on(facts, gpu_facts(V100))
    assert "AO102" in on_v100 and "AO101" not in on_v100 and "AO103" not in on_v100, on_v100


@pytest.mark.slow  # profiles a real model on the CPU
def test_nchw_cnn_fires_ao2_only():
    facts, found = cpu_run("nchw_cnn")
    assert facts["model.conv2d_count"] == 3 and facts["workload.input_is_4d"] is True
    assert "AO202" in found
    assert families(found) == {"AO2"}, found


@pytest.mark.slow  # profiles a real model on the CPU
def test_nchw_cnn_through_profile_model():
    """The public entry point gives the same diagnosis (profile_model, few steps)."""
    import tempfile

    from autoopt.pipelines.profile import profile_model
    from autoopt.run.measure import MeasureSettings

    with tempfile.TemporaryDirectory() as tmp:
        res = profile_model(str(PLANTED / "nchw_cnn.py"), device="cpu", steps=2, logdir=tmp,
                            measure_settings=MeasureSettings.quick(), caps=AVX2_CPU)
    found = [f["code"] for f in res["findings"]]
    assert "AO202" in found and families(found) == {"AO2"}, found


@pytest.mark.slow  # profiles a real model on the CPU
def test_per_parameter_optimizer_loop_fires_ao7_only():
    facts, found = cpu_run("optimizer_loop")
    assert facts["workload.optimizer_impl"] == "for-loop"
    assert "AO701" in found, facts["metrics.optimizer_fraction"]
    assert families(found) == {"AO7"}, found


# --------------------------------------------------------------------------- controls, on this CPU


@pytest.mark.slow  # profiles a real model on the CPU
def test_control_already_bf16_keeps_ao1_silent():
    facts, found = cpu_run("control_bf16")
    assert facts["workload.autocast"] is True
    for device in (None, amx_cpu_facts(), gpu_facts(H100), gpu_facts(A100), gpu_facts(V100)):
        fired = found if device is None else evaluate_on(facts, device)
        assert not [c for c in fired if c.startswith("AO1")], (device and device["device.name"], fired)


@pytest.mark.slow  # profiles a real model on the CPU
def test_control_no_convolutions_keeps_ao2_silent():
    facts, found = cpu_run("control_no_conv")
    assert facts["workload.input_is_4d"] is True and facts["model.conv2d_count"] == 0
    for device in (None, gpu_facts(H100)):
        fired = found if device is None else evaluate_on(facts, device)
        assert not [c for c in fired if c.startswith("AO2")], fired


@pytest.mark.slow  # profiles a real model on the CPU
def test_control_no_loader_keeps_ao5_silent():
    facts, found = cpu_run("control_no_loader")
    assert facts["workload.has_dataloader"] is False
    assert not [c for c in found if c.startswith("AO5")], found
    assert families(found) == set(), found


@pytest.mark.slow  # profiles a real model on the CPU
def test_control_inference_only_keeps_ao7_silent():
    facts, found = cpu_run("control_inference")
    assert facts["workload.mode"] == "infer"
    assert not [c for c in found if c.startswith("AO7")], found
    assert not [c for c in found if c in ("AO403", "AO404")], found  # training-memory rules
    assert families(found) == set(), found


@pytest.mark.slow  # profiles a real model on the CPU
def test_control_no_host_read_has_no_sync():
    facts, found = cpu_run("control_no_host_read")
    assert facts["metrics.host_reads_per_step"] == 0
    assert families(found) == set(), found


# --------------------------------------------------------------------------- recorded on a real GPU
#
# The same model files, profiled on one NVIDIA H200 (tests/planted/record_gpu_traces.py).
# At their own small batch sizes every one of them leaves the H200 idle over 90 % of the
# step, so the launch-overhead and batch-size rules (AO3, AO4) rightly fire on all of them,
# and the precision rules wherever fp32 GEMMs are a share of GPU time. "Exactly" therefore
# covers the families planted here that do not overlap: input pipeline, layout, host
# synchronisation and optimizer.

DISJOINT = ("AO2", "AO5", "AO6", "AO7")


def disjoint_families(found) -> set[str]:
    return {c[:3] for c in found if c[:3] in DISJOINT}


def recorded_gpu_run(name: str) -> tuple[dict[str, Any], list[str]]:
    """Facts and findings of tests/planted/gpu_traces/<name>/ (<model>-b<batch>): the real
    GPU trace, analyzed here, with the live facts recorded beside it laid over it (as
    build_facts does)."""
    from autoopt.analyze import analyze_paths

    d = GPU_TRACES / name
    model = name.rsplit("-b", 1)[0]
    trace = d / f"{model}.pt.trace.json.gz"
    assert trace.exists(), f"{trace} is missing: run tests/planted/record_gpu_traces.py on a GPU machine"
    recorded = json.loads((d / "facts.json").read_text())
    facts = from_analysis(analyze_paths([str(trace)]))
    facts.update(recorded["facts"])
    assert facts["device.type"] == "cuda" and "H200" in facts["device.name"]
    return facts, codes(R.evaluate(RULES, facts))


def test_gpu_slow_input_pipeline():
    facts, found = recorded_gpu_run("slow_loader-b96")
    assert "AO501" in found and facts["metrics.dataloader_fraction"] >= 0.5
    assert disjoint_families(found) == {"AO5"}, found
    # the GPU waits for batches, not for launches: no CUDA-graph or host-bound proposal
    assert "AO304" not in found and "AO302" not in found, found
    # fp32 GEMMs are half the kernel time, but the GPU idles 99 % of the step: no autocast
    assert facts["metrics.idle_fraction"] >= 0.7 and "AO101" not in found, found
    _, ctl = recorded_gpu_run("control_no_loader-b96")
    assert disjoint_families(ctl) == set(), ctl


def test_gpu_tiny_operators():
    facts, found = recorded_gpu_run("tiny_ops-b128")
    assert facts["metrics.kernels_per_step"] >= 200 and facts["metrics.small_kernel_fraction"] >= 0.5
    assert "AO301" in found
    assert disjoint_families(found) == set(), found


def test_gpu_nchw_cnn():
    facts, found = recorded_gpu_run("nchw_cnn-b128")
    assert "AO201" in found
    assert disjoint_families(found) == {"AO2"}, found
    _, ctl = recorded_gpu_run("control_no_conv-b128")
    assert disjoint_families(ctl) == set(), ctl


def test_gpu_optimizer_loop():
    facts, found = recorded_gpu_run("optimizer_loop-b128")
    assert "AO701" in found
    assert disjoint_families(found) == {"AO7"}, found
    _, ctl = recorded_gpu_run("control_inference-b128")
    assert disjoint_families(ctl) == set(), ctl


def test_gpu_control_bf16_keeps_ao1_silent():
    facts, found = recorded_gpu_run("control_bf16-b16384")
    assert facts["workload.autocast"] is True
    assert not [c for c in found if c.startswith("AO1")], found


def test_gpu_control_no_host_read_keeps_ao6_silent():
    facts, found = recorded_gpu_run("control_no_host_read-b65536")
    assert not [c for c in found if c.startswith("AO6")], found


def test_gpu_fp32_gemms_fire_bf16_and_tf32():
    # every GEMM of this all-fp32 MLP runs in cuBLAS's SIMT kernels (sm80_xmma_gemm_f32f32_f32f32_f32_*_ffma_*,
    # cutlass_80_simt_sgemm_*): plain FFMA, no tensor cores, no TF32 (float32 matmul precision "highest")
    facts, found = recorded_gpu_run("fp32_gemm-b16384")
    assert facts["metrics.fp32_matmul_fraction"] >= 0.9, facts["metrics.fp32_matmul_fraction"]
    assert facts["metrics.tensor_core_kernel_ratio"] == 0.0, facts["metrics.tensor_core_kernel_ratio"]
    assert "AO101" in found and "AO103" in found and "AO102" not in found, found


def test_gpu_host_read_fires_ao601():
    # each of the 8 blocks' .item() waits in its D2H cudaMemcpyAsync and the cudaStreamSynchronize after it,
    # and leaves the GPU idle until the next block's first kernel (autoopt/analyze/sync.py)
    facts, found = recorded_gpu_run("host_read-b65536")
    assert facts["metrics.sync_count_per_step"] == 8
    assert any("host_read.py" in s for s in facts.get("metrics.sync_sites") or []), facts.get("metrics.sync_sites")
    assert "AO601" in found, facts["metrics.sync_time_fraction"]


def test_gpu_bound_cnn_without_host_reads_keeps_ao6_silent():
    # this trace was recorded before commit 32964b7 took autoopt's own per-step torch.cuda.synchronize out
    # of profile.trace_session: its frame reads 'autoopt/runner.py(212): sync', autoopt's harness, which
    # the analysis leaves out of the user's syncs (reported under syncs["harness"])
    facts, found = recorded_gpu_run("nchw_cnn-b8192")
    assert facts["metrics.gpu_utilization"] >= 0.7
    assert facts["metrics.sync_count_per_step"] == 0
    assert not [c for c in found if c.startswith("AO6")], (found, facts.get("metrics.sync_sites"))
