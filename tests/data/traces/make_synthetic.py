"""Writes the small synthetic traces next to this file. Every number in them is chosen so the
expected analysis can be worked out by hand (see tests/test_analyze.py for the arithmetic).
Run: python tests/data/traces/make_synthetic.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def x(cat, name, ts, dur, pid=100, tid=100, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def pt2_trace():
    """PyTorch-2-era trace: snake_case categories, fractional timestamps, baseTimeNanoseconds,
    a DataLoader user annotation, a gpu_user_annotation on the GPU track, a sync via item()."""
    ev = [
        {"name": "process_labels", "ph": "M", "pid": 0, "tid": 0, "args": {"labels": "GPU 0"}},
        x("user_annotation", "ProfilerStep#1", 1000.5, 100.0, **{"External id": 1}),
        x("user_annotation", "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 1000.5, 30.0,
          **{"External id": 2}),
        x("cpu_op", "aten::mm", 1030.5, 20.0, **{"External id": 3, "Input type": ["float", "float"]}),
        x("cuda_runtime", "cudaLaunchKernel", 1035.5, 5.0, **{"External id": 3, "correlation": 11}),
        x("kernel", "volta_sgemm_128x64_nn", 1045.5, 40.0, pid=0, tid=7,
          **{"device": 0, "stream": 7, "correlation": 11, "External id": 3, "blocks per SM": 0.5,
             "est. achieved occupancy %": 20, "grid": [40, 1, 1], "block": [256, 1, 1]}),
        x("gpu_user_annotation", "## forward ##", 1040.0, 55.0, pid=0, tid=7, **{"External id": 4}),
        x("cpu_op", "aten::copy_", 1051.0, 4.0, **{"External id": 5}),
        x("cuda_runtime", "cudaMemcpyAsync", 1051.5, 2.0, **{"External id": 5, "correlation": 12}),
        x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 1090.5, 2.0, pid=0, tid=7,
          **{"device": 0, "stream": 7, "correlation": 12, "bytes": 1000}),
        x("user_annotation", "ProfilerStep#2", 1100.5, 100.0, **{"External id": 6}),
        x("python_function", "train.py(42): train_step", 1101.0, 98.0),
        x("python_function", "/usr/lib/python3.11/site-packages/torch/_tensor.py(10): item", 1110.0, 41.0),
        x("cpu_op", "aten::item", 1110.5, 40.0, **{"External id": 7}),
        x("cpu_op", "aten::_local_scalar_dense", 1111.5, 38.0, **{"External id": 8}),
        x("cuda_runtime", "cudaMemcpyAsync", 1115.5, 3.0, **{"External id": 8, "correlation": 13}),
        x("cuda_runtime", "cudaStreamSynchronize", 1120.5, 25.0, **{"External id": 8, "correlation": 14}),
        x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1125.5, 1.0, pid=0, tid=7,
          **{"device": 0, "stream": 7, "correlation": 13, "bytes": 4}),
        x("cpu_op", "aten::copy_", 1160.5, 4.0, **{"External id": 9}),
        x("cuda_runtime", "cudaMemcpyAsync", 1161.0, 2.0, **{"External id": 9, "correlation": 15}),
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1170.5, 3.0, pid=0, tid=7,
          **{"device": 0, "stream": 7, "correlation": 15, "bytes": 3000}),
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 100, "tid": 100, "ts": 1031.0,
         "args": {"Device Type": 1, "Device Id": 0, "Bytes": 1048576, "Total Allocated": 1048576}},
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 100, "tid": 100, "ts": 1032.0,
         "args": {"Device Type": 1, "Device Id": 0, "Bytes": 2097152, "Total Allocated": 3145728}},
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 100, "tid": 100, "ts": 1033.0,
         "args": {"Device Type": 1, "Device Id": 0, "Bytes": -2097152, "Total Allocated": 1048576}},
        {"ph": "s", "id": 11, "pid": 100, "tid": 100, "ts": 1035.5, "cat": "ac2g", "name": "ac2g"},
        {"ph": "f", "id": 11, "pid": 0, "tid": 7, "ts": 1045.5, "cat": "ac2g", "name": "ac2g", "bp": "e"},
    ]
    return {"schemaVersion": 1, "baseTimeNanoseconds": 1700000000000000000,
            "deviceProperties": [{"id": 0, "name": "Tesla V100-SXM2-16GB", "totalGlobalMem": 16945512448,
                                  "computeMajor": 7, "computeMinor": 0, "numSms": 80}],
            "traceEvents": ev, "displayTimeUnit": "ms"}


def legacy_list():
    """The legacy autograd profiler's export_chrome_trace: a bare list, no categories."""
    return [
        {"name": "aten::mm", "ph": "X", "ts": 10, "dur": 50, "tid": 1, "pid": "CPU functions", "args": {}},
        {"name": "aten::relu", "ph": "X", "ts": 70, "dur": 10, "tid": 1, "pid": "CPU functions", "args": {}},
        {"name": "gemm_kernel", "ph": "X", "ts": 20, "dur": 30, "tid": 0, "pid": "CUDA functions", "args": {}},
        {"name": "aten::mm", "ph": "s", "ts": 10, "tid": 1, "pid": "CPU functions", "id": "1",
         "cat": "cpu_to_cuda", "args": {}},
    ]


def rank_trace(rank, step_us, comm_us, with_info=True):
    """Two steps of one rank: a compute kernel, then an NCCL kernel overlapping it by 10 us."""
    ev = []
    for s in range(2):
        t0 = 1000 + s * step_us
        ev += [
            x("user_annotation", f"ProfilerStep#{s}", t0, step_us, **{"External id": 10 * s + 1}),
            x("cpu_op", "aten::addmm", t0 + 1, 10, **{"External id": 10 * s + 2}),
            x("cuda_runtime", "cudaLaunchKernel", t0 + 2, 2, **{"External id": 10 * s + 2,
                                                                 "correlation": 100 * s + 1}),
            x("kernel", "ampere_sgemm_128x64_nn", t0 + 5, 50, pid=0, tid=7,
              **{"device": 0, "stream": 7, "correlation": 100 * s + 1}),
            x("cpu_op", "nccl:all_reduce", t0 + 12, 5, **{"External id": 10 * s + 3}),
            x("cuda_runtime", "cudaLaunchKernel", t0 + 13, 2, **{"External id": 10 * s + 3,
                                                                  "correlation": 100 * s + 2}),
            x("kernel", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", t0 + 45, comm_us, pid=0, tid=20,
              **{"device": 0, "stream": 20, "correlation": 100 * s + 2}),
        ]
    d = {"schemaVersion": 1, "traceEvents": ev,
         "deviceProperties": [{"id": 0, "name": "NVIDIA A100-SXM4-40GB", "totalGlobalMem": 42505273344,
                               "computeMajor": 8, "computeMinor": 0, "numSms": 108}]}
    if with_info:
        d["distributedInfo"] = {"backend": "nccl", "rank": rank, "world_size": 2}
    return d


def main():
    (HERE / "pt2_dataloader_sync.json").write_text(json.dumps(pt2_trace(), indent=1))
    (HERE / "legacy_autograd_list.json").write_text(json.dumps(legacy_list()))
    d = HERE / "ddp_two_ranks"
    d.mkdir(exist_ok=True)
    (d / "rank0.json").write_text(json.dumps(rank_trace(0, 200, 40)))
    (d / "rank1.json").write_text(json.dumps(rank_trace(1, 250, 20)))
    n = HERE / "ranks_without_info"
    n.mkdir(exist_ok=True)
    (n / "worker0.pt.trace.json").write_text(json.dumps(rank_trace(0, 200, 40, with_info=False)))
    (n / "worker1.pt.trace.json").write_text(json.dumps(rank_trace(1, 200, 40, with_info=False)))


if __name__ == "__main__":
    main()
