"""Trace analysis against real GPU traces (expected values from torch-tb-profiler's own expected
file, or recomputed here from the raw JSON by a separate plain-Python implementation) and
hand-checked synthetic traces."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.analyze import analyze_paths, analyze_trace, load_trace, render_text
from autoopt.errors import TraceError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "traces"
TRACES = DATA / "real"  # real GPU traces from kineto, HTA and param (README.md there)
EXPECTED = TRACES / "kineto" / "tb_profiler_expected_results.txt"


def _raw(path: Path):
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return json.loads(data)


def _expected(run: int) -> list[dict]:
    lines = [json.loads(s) for s in EXPECTED.read_text().splitlines() if s.strip()]
    return lines[run * 5:(run + 1) * 5]


# ------------------------------------------------------------------------------------------------
# torch-tb-profiler's expected numbers on the two ResNet-50 V100 traces
# ------------------------------------------------------------------------------------------------
TB_RUNS = [(0, "resnet50_v100_num_workers_0.pt.trace.json.gz"), (1, "resnet50_v100_num_workers_4.pt.trace.json.gz")]
_COLS = ["kernel", "memcpy", "memset", "runtime", "dataloader", "cpu_exec", "other"]


@pytest.fixture(scope="module", params=TB_RUNS, ids=["workers0", "workers4"])
def tb_case(request):
    run, name = request.param
    result = analyze_paths([TRACES / "kineto" / name], top_n=200)
    return _expected(run), result


def test_tb_per_step_breakdown_matches(tb_case):
    exp, result = tb_case
    t = result["traces"][0]
    rows = exp[0]["steps"]["rows"]
    assert [r[0] for r in rows] == t["step_names"]
    for row, ours in zip(rows, t["breakdown_per_step_ms"]):
        want = dict(zip(_COLS, row[1::2]))
        total_us = int(row[2].split("Total: ")[1].split("us")[0])
        assert ours["total"] * 1e3 == pytest.approx(total_us, abs=1)
        for c in _COLS:
            assert ours[c] * 1e3 == pytest.approx(want[c], abs=1), (row[0], c)
        assert sum(ours[c] for c in _COLS + ["communication"]) == pytest.approx(ours["total"], abs=1e-3)


@pytest.mark.parametrize("field,title", [("gpu_utilization", "GPU Utilization"),
                                         ("sm_efficiency", "Est. SM Efficiency"),
                                         ("achieved_occupancy", "Est. Achieved Occupancy"),
                                         ("tensor_core_kernel_ratio", "Kernel Time using Tensor Cores")])
def test_tb_gpu_metrics_within_half_a_point(tb_case, field, title):
    exp, result = tb_case
    data = {d["title"]: d["value"] for d in exp[0]["gpu_metrics"]["data"]}
    want = float(data[title].rstrip(" %"))
    assert 100 * result["traces"][0][field] == pytest.approx(want, abs=0.5)
    # and to tb's own rounding
    assert round(100 * result["traces"][0][field], 2) == pytest.approx(want, abs=0.011)


def test_tb_average_step_and_device_info(tb_case):
    exp, result = tb_case
    perf = exp[0]["performance"][0]
    t = result["traces"][0]
    assert t["step_time_ms"]["mean"] * 1e3 == pytest.approx(perf["value"], abs=1)
    assert t["device"]["name"] == "Tesla V100-DGXS-32GB"
    assert t["device"]["compute_capability"] == "7.0"
    assert result["device_facts"]["device.bf16"] is False
    assert result["device_facts"]["device.tensor_cores"] is True


def test_tb_operator_and_kernel_tables(tb_case):
    exp, result = tb_case
    t = result["traces"][0]
    ops = {o["name"]: o for o in t["top_operators"]}
    for name, us in exp[1]["device_self_time"]["rows"]:
        assert ops[name]["device_self_ms"] * 1e3 == pytest.approx(us, abs=1), name
    for name, us in exp[1]["device_total_time"]["rows"][:20]:
        assert ops[name]["device_total_ms"] * 1e3 == pytest.approx(us, abs=1), name
    for row in exp[2]["data"]:
        o = ops.get(row["name"])
        if o is None or row["device_self_duration"] == 0:
            continue
        assert o["calls"] == row["calls"], row["name"]
        assert o["host_self_ms"] * 1e3 == pytest.approx(row["host_self_duration"], abs=2), row["name"]
    kernels = {k["name"]: k for k in t["top_kernels"]}
    for name, us in exp[4]["total"]["rows"]:
        assert kernels[name]["total_ms"] * 1e3 == pytest.approx(us, abs=1), name
        assert not kernels[name]["tensor_cores"]


# ------------------------------------------------------------------------------------------------
# every real trace, checked against a plain-Python recomputation from the raw JSON
# ------------------------------------------------------------------------------------------------
def _plain_gpu_util(raw, lo_us: float, hi_us: float) -> float:
    """Union of kernel intervals inside [lo, hi] over (hi - lo), with plain Python."""
    evs = raw["traceEvents"] if isinstance(raw, dict) else raw
    iv = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in evs
                if e.get("ph") == "X" and str(e.get("cat", "")).lower() == "kernel")
    busy, cur = 0.0, None
    for s, e in iv:
        s, e = max(s, lo_us), min(e, hi_us)
        if e <= s:
            continue
        if cur and s <= cur[1]:
            cur[1] = max(cur[1], e)
        else:
            if cur:
                busy += cur[1] - cur[0]
            cur = [s, e]
    if cur:
        busy += cur[1] - cur[0]
    return busy / (hi_us - lo_us)


ALL_REAL = sorted(p.relative_to(TRACES).as_posix() for p in TRACES.glob("*/*.json*")
                  if "expected" not in p.name)


@pytest.mark.parametrize("rel", ALL_REAL)
def test_every_shared_trace(rel):
    path = TRACES / rel
    tr = load_trace(path)
    t = analyze_trace(tr)
    raw = _raw(path)
    evs = raw["traceEvents"] if isinstance(raw, dict) else raw
    n_kernels = sum(1 for e in evs if e.get("ph") == "X" and str(e.get("cat", "")).lower() == "kernel")
    assert t["metrics"]["steps"] == (t["steps"])
    assert set(t["breakdown_ms"]) == {"kernel", "memcpy", "memset", "communication", "runtime", "dataloader",
                                      "cpu_exec", "other"}
    if t["step_time_ms"]:
        assert sum(t["breakdown_ms"].values()) == pytest.approx(t["step_time_ms"]["mean"], rel=1e-6, abs=1e-3)
    if n_kernels == 0:
        assert t["gpu_utilization"] is None and t["device"]["type"] == "cpu"
        return
    assert t["device"]["type"] == "cuda"
    lo, hi = _window(tr)
    assert t["gpu_utilization"] == pytest.approx(_plain_gpu_util(raw, lo, hi), abs=1e-4)


def _window(tr):
    from autoopt.analyze.steps import find_steps
    lo, hi = find_steps(tr).span
    return lo + tr.t0_us, hi + tr.t0_us


def test_gpu_user_annotations_are_not_gpu_work():
    path = TRACES / "hta" / "a100_ddp_rank0_2024.json.gz"
    tr = load_trace(path)
    t = analyze_trace(tr)
    raw = _raw(path)
    lo, hi = _window(tr)
    assert t["gpu_utilization"] == pytest.approx(_plain_gpu_util(raw, lo, hi), abs=1e-6)
    assert t["metrics"]["comm_backend"] == "nccl"
    assert t["communication"]["comm_kernel_ms_per_step"] > 0
    assert 0 < t["metrics"]["comm_overlap_fraction"] <= 1
    assert t["breakdown_ms"]["communication"] > 0
    assert t["metrics"]["tensor_core_kernel_ratio"] > 0  # A100 run with sm80 / xmma GEMMs


def test_schema_eras_and_vendors():
    amd = analyze_paths([TRACES / "hta" / "amd_mi250_rocm.json.gz"])
    assert amd["device_facts"]["device.vendor"] == "amd"
    assert amd["traces"][0]["breakdown_ms"]["runtime"] > 0  # hip* runtime calls
    cpu = analyze_paths([TRACES / "hta" / "cpu_only.pt.trace.json.gz"])
    assert cpu["device_facts"]["device.type"] == "cpu"
    assert cpu["metrics"]["gpu_utilization"] is None
    h100 = analyze_paths([TRACES / "kineto" / "h100_one_kernel_after.json"])
    assert h100["device_facts"]["device.compute_capability"] == 9.0
    assert h100["device_facts"]["device.bf16"] is True and h100["device_facts"]["device.tf32"] is True
    nostep = analyze_paths([TRACES / "param" / "resnet_rtx2080ti_no_profiler_step.json.gz"])
    assert nostep["metrics"]["steps"] == 0
    assert any("no ProfilerStep" in n for n in nostep["traces"][0]["notes"])
    old = analyze_paths([TRACES / "kineto" / "gpu_metrics_input.json"])  # computeProperties, 2021 categories
    assert old["traces"][0]["device"]["sm_count"] == 80
    ns = analyze_paths([TRACES / "hta" / "v100_gpu_bound_ns_resolution_2024.pt.trace.json.gz"])
    assert ns["metrics"]["steps"] >= 4 and ns["metrics"]["gpu_utilization"] > 0.9  # a GPU-bound run


def test_small_blocks_give_the_same_result():
    """Chunk boundaries (candidate cuts and the exact scanner) must not change anything."""
    path = TRACES / "hta" / "gp100_gpu_user_annotation.json.gz"
    a = analyze_trace(load_trace(path))
    b = analyze_trace(load_trace(path, block=4096))
    a.pop("path"), b.pop("path")
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------
# synthetic traces (numbers worked out by hand)
# ------------------------------------------------------------------------------------------------
def test_pt2_trace_by_hand():
    r = analyze_paths([DATA / "pt2_dataloader_sync.json"])
    t = r["traces"][0]
    s1, s2 = t["breakdown_per_step_ms"]
    # step 1: kernel 40 us; runtime 5; DataLoader annotation 30; aten::mm 20 minus its launch (5) and
    # the kernel it overlaps (5) = 10 of CPU exec; H2D memcpy 2; other = 100 - 87 = 13
    assert (s1["kernel"], s1["runtime"], s1["dataloader"], s1["cpu_exec"], s1["memcpy"], s1["other"]) == (
        0.04, 0.005, 0.03, 0.01, 0.002, 0.013)
    # step 2: runtime 3 + 25 + 2 minus the 1 us DtoH copy under the sync = 29; memcpy 1 + 3;
    # aten::item 40 - 28 = 12 and copy_ 4 - 2 = 2 of CPU exec; python_function frames are not work
    assert (s2["runtime"], s2["memcpy"], s2["cpu_exec"], s2["other"]) == (0.029, 0.004, 0.014, 0.053)
    m = r["metrics"]
    assert m["gpu_utilization"] == pytest.approx(40 / 200)  # the gpu_user_annotation is not GPU work
    assert m["dataloader_fraction"] == pytest.approx(30 / 200)
    assert m["pageable_h2d_fraction"] == pytest.approx(1000 / 4000)
    assert m["h2d_copies_per_step"] == 1.0
    assert m["peak_memory_mb"] == 3.0
    assert m["sync_count_per_step"] == 0.5  # one site: item() with its memcpy + synchronize
    # the site's stall: the D2H cudaMemcpyAsync (3) and cudaStreamSynchronize (25) it blocks in, plus the GPU
    # idle gap after the sync (ends 1145.5, nothing running; next device work, the HtoD copy, starts 1170.5: 25)
    assert m["sync_time_fraction"] == pytest.approx((3 + 25 + 25) / 200)
    assert t["syncs"]["sites"][0]["blocked_ms"] == pytest.approx(0.028)
    assert m["fp32_matmul_fraction"] == 1.0
    site = t["syncs"]["sites"][0]
    assert site["name"] == "aten::item" and site["source"] == "train.py:42 (train_step)"
    assert t["step_names"] == ["1", "2"]
    assert "train.py:42" in render_text(r)


def test_legacy_bare_list():
    r = analyze_paths([DATA / "legacy_autograd_list.json"])
    t = r["traces"][0]
    assert t["steps"] == 0 and t["device"]["type"] == "cuda"
    # window = CPU extent [10, 80]; the one kernel runs 30 us of it
    assert t["gpu_utilization"] == pytest.approx(30 / 70)
    assert any("legacy" in n for n in t["notes"])


def test_two_ranks_by_hand():
    r = analyze_paths([DATA / "ddp_two_ranks"])
    ranks = r["ranks"]
    assert ranks["rank_count"] == 2 and r["metrics"]["rank_count"] == 2
    assert r["metrics"]["rank_step_skew"] == pytest.approx((250 - 200) / 200)
    assert ranks["slowest_rank"] == 1
    # rank 0: NCCL kernel [45, 85] overlaps the GEMM [5, 55] for 10 of 40 us; rank 1: 10 of 20
    per = {p["rank"]: p for p in ranks["per_rank"]}
    assert per[0]["comm_overlap_fraction"] == pytest.approx(0.25)
    assert per[1]["comm_overlap_fraction"] == pytest.approx(0.5)
    assert r["metrics"]["comm_overlap_fraction"] == pytest.approx(0.375)
    assert ranks["straggler_rank"] == 1  # the least time waiting in the collective
    assert r["metrics"]["comm_backend"] == "nccl"
    assert r["metrics"]["step_time_ms"] == pytest.approx(0.25)  # the slowest rank bounds the job


def test_ranks_without_distributed_info_use_file_names():
    r = analyze_paths([DATA / "ranks_without_info"])
    assert sorted(t["rank"] for t in r["traces"]) == [0, 1]
    assert r["metrics"]["rank_step_skew"] == 0.0


# ------------------------------------------------------------------------------------------------
# bad input: one paragraph, exit 2, never a traceback
# ------------------------------------------------------------------------------------------------
GOOD = (DATA / "pt2_dataloader_sync.json").read_bytes() if (DATA / "pt2_dataloader_sync.json").exists() else b""


@pytest.mark.parametrize("name,content,needle", [
    ("empty.json", b"", "empty"),
    ("spaces.json", b"   \n", "no JSON"),
    ("truncated.json", GOOD[: len(GOOD) // 2], "truncated"),
    ("garbage.json.gz", b"\x1f\x8b\x08\x00garbage-garbage", "gzip"),
    ("trunc.json.gz", gzip.compress(GOOD)[:200], "truncated"),
    ("exec_trace.json", json.dumps({"schema": "1.0.1", "pid": 1, "nodes": [{"id": 1}]}).encode(), "execution trace"),
    ("snapshot.json", json.dumps({"segments": [], "device_traces": []}).encode(), "memory snapshot"),
    ("no_events.json", json.dumps({"traceEvents": []}).encode(), "no trace events"),
    ("html.json", b"<html>nope</html>", "not JSON"),
    ("instants.json", json.dumps({"traceEvents": [{"ph": "i", "ts": 1, "name": "x"}]}).encode(), "not a Kineto"),
])
def test_bad_input_is_a_trace_error(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(TraceError) as ei:
        analyze_paths([p])
    msg = ei.value.message
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        analyze_paths([tmp_path / "nope.json"])
    with pytest.raises(TraceError, match="no .json"):
        analyze_paths([tmp_path])


def test_cli_json_only_and_exit_codes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "autoopt.analyze", str(DATA / "pt2_dataloader_sync.json"), "--json"],
                         capture_output=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert set(doc) == {"traces", "ranks", "metrics", "device_facts", "notes"}
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{\"traceEvents\": [{\"ph\": \"X\"")
    out = subprocess.run([sys.executable, "-m", "autoopt.analyze", str(bad), "--json"], capture_output=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stdout == b"" and b"Traceback" not in out.stderr


def test_analysis_never_imports_torch():
    code = ("import sys, autoopt.analyze as a; a.analyze_paths([sys.argv[1]]); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code, str(DATA / "ddp_two_ranks")], capture_output=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr.decode()


def test_json_keys_follow_design():
    r = analyze_paths([DATA / "pt2_dataloader_sync.json"])
    t = r["traces"][0]
    for k in ("path", "rank", "device", "steps", "step_time_ms", "gpu_utilization", "breakdown_ms",
              "tensor_core_kernel_ratio", "sm_efficiency", "achieved_occupancy", "top_kernels"):
        assert k in t
    assert set(t["device"]) >= {"name", "type", "sm_count", "compute_capability"}
    assert set(t["step_time_ms"]) == {"mean", "median", "min", "max"}
    assert set(t["top_kernels"][0]) >= {"name", "calls", "total_ms"}
    from autoopt.facts import FACTS
    for k in r["metrics"]:
        assert f"metrics.{k}" in FACTS
    for k in r["device_facts"]:
        assert k in FACTS
    json.dumps(r)  # plain JSON types only


def test_flushing_rows_into_arrays_changes_nothing(monkeypatch):
    from autoopt.analyze import loader
    path = DATA / "pt2_dataloader_sync.json"
    a = analyze_trace(load_trace(path))
    monkeypatch.setattr(loader, "FLUSH_ROWS", 3)
    b = analyze_trace(load_trace(path, block=256))
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("name,tc,mm,fp32_name", [
    ("volta_sgemm_64x64_nt", False, True, True),
    ("volta_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1", False, True, True),
    ("void implicit_convolve_sgemm<float, float, 1024, 6, 7, 3, 3, 5, 1, false, true, true>(int)", False, True, True),
    ("volta_h884gemm_64x64_nn", True, True, None),  # Volta fp16 HMMA
    ("turing_h1688gemm_128x128_ldg8_nn", True, True, None),  # Turing
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn", True, True, False),  # Ampere cuBLAS
    ("sm80_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x32_stage4_warpsize2x2x1_tensor16x8x16_kernel",
     True, True, False),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x128x32_warpgroupsize1x1x1_execute_kernel__5x_cublas",
     True, True, None),  # Hopper TF32
    ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNN", True, True, False),  # Hopper cuBLASLt
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)",
     True, True, False),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t> >(Flash_fwd_params)",
     True, True, False),
    ("sm86_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4_kernel", True, True,
     False),  # cuDNN v8 engine
    ("Cijk_Ailk_Bljk_HHS_BH_MT128x128x32_MI32x32x8x1_SN_1LDSB0", True, True, False),  # rocBLAS on MFMA
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, 512, true, 1>(cudnnTensorStruct)", False, False, None),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float> >(int)", False, False, None),
])
def test_kernel_name_classes(name, tc, mm, fp32_name):
    from autoopt.analyze.kernels import is_matmul_or_conv, name_says_reduced_precision, uses_tensor_cores
    assert uses_tensor_cores(name) is tc
    assert is_matmul_or_conv(name) is mm
    if fp32_name is not None:
        assert (not tc and not name_says_reduced_precision(name)) is fp32_name


def test_directory_prefers_profiler_files(tmp_path):
    (tmp_path / "host_1.123.pt.trace.json").write_bytes((DATA / "pt2_dataloader_sync.json").read_bytes())
    (tmp_path / "report.json").write_text(json.dumps({"model": "x", "final": {}}))  # not a trace
    r = analyze_paths([tmp_path])
    assert len(r["traces"]) == 1 and r["traces"][0]["path"].endswith(".pt.trace.json")


def test_event_larger_than_many_blocks(tmp_path):
    doc = json.loads((DATA / "pt2_dataloader_sync.json").read_text())
    doc["traceEvents"][3]["args"]["Call stack"] = "x.py(1): f;" * 20000  # one 220 KB event
    p = tmp_path / "big_event.json"
    p.write_text(json.dumps(doc, indent=2))
    a = load_trace(p, block=256)
    b = load_trace(DATA / "pt2_dataloader_sync.json")
    assert a.n == b.n and a.names == b.names


def test_traces_of_separate_runs_are_never_ranks(tmp_path, capsys):
    """A baseline's and a final configuration's traces (no rank in distributedInfo or the file
    names) are two runs, each diagnosed on its own: no rank table, no straggler (AO804)."""
    from autoopt.cli import main

    src = (DATA / "ranks_without_info" / "worker0.pt.trace.json").read_text()
    (tmp_path / "baseline").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "baseline" / "host_1.pt.trace.json").write_text(src)
    (tmp_path / "final" / "host_2.pt.trace.json").write_text(
        (DATA / "ranks_without_info" / "worker1.pt.trace.json").read_text())
    r = analyze_paths([tmp_path / "baseline", tmp_path / "final"])
    assert r["runs"] == "separate" and r["ranks"] == {} and "separate runs" in r["notes"][0]
    assert len(r["traces"]) == 2
    assert main(["analyze", str(tmp_path / "baseline"), str(tmp_path / "final"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not any(f["code"] == "AO804" for f in doc["findings"])
    assert all(f["trace"].endswith(".pt.trace.json") for f in doc["findings"])
    # the same two files named after their ranks are one job's ranks
    assert analyze_paths([DATA / "ranks_without_info"])["runs"] == "ranks"
