"""A real CPU-only torch.profiler trace, recorded the way autoopt's profile records one
(record_shapes, profile_memory, with_stack, a schedule giving ProfilerStep#N spans, a
DataLoader, an SGD optimizer, an item() call), must give meaningful CPU metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from autoopt.analyze import analyze_paths, render_text  # noqa: E402

ACTIVE = 3


@pytest.fixture(scope="module")
def cpu_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpu_trace")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, foreach=False)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    sched = torch.profiler.schedule(wait=0, warmup=1, active=ACTIVE, repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=sched,
                                record_shapes=True, profile_memory=True, with_stack=True,
                                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out))) as prof:
        for i, (x, y) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            _ = loss.item()  # a host-device sync on a GPU
            prof.step()
            if i >= ACTIVE + 1:
                break
    files = list(out.glob("*.pt.trace.json*"))
    assert files, "torch.profiler wrote no trace"
    return out


@pytest.mark.slow
def test_cpu_trace_metrics(cpu_trace):
    r = analyze_paths([cpu_trace])  # a tensorboard run directory
    m = r["metrics"]
    t = r["traces"][0]
    assert r["device_facts"]["device.type"] == "cpu"
    assert m["steps"] == ACTIVE and len(t["step_times_ms"]) == ACTIVE
    assert m["gpu_utilization"] is None and m["kernels_per_step"] is None
    assert 0 < m["matmul_fraction"] < 1
    assert 0 < m["conv_fraction"] <= m["matmul_fraction"]
    assert m["fp32_matmul_fraction"] == 1.0  # every conv / linear ran on float inputs
    assert m["ops_per_step"] > 5
    assert 0 < m["optimizer_fraction"] < 1
    assert m["optimizer_ops_per_step"] >= 4  # for-loop SGD: ops per parameter (4 parameters)
    assert m["dataloader_fraction"] > 0  # enumerate(DataLoader)#...__next__ user annotations
    # loss.item() once per step: a host read that would sync on a GPU, never a device-sync figure here
    assert m["host_reads_per_step"] == pytest.approx(1.0)
    assert m["sync_count_per_step"] is None and m["sync_time_fraction"] is None
    assert "host-device syncs" not in render_text(r)
    assert m["peak_memory_mb"] is not None and m["peak_memory_mb"] > 0
    site = t["syncs"]["sites"][0]
    assert site["name"] == "aten::item"
    assert site["source"] is not None and "test_analyze_cpu_trace.py" in site["source"]
    bd = t["breakdown_ms"]
    assert bd["kernel"] == 0 and bd["cpu_exec"] > 0
    # each of the 8 categories and the mean are rounded to 0.1 us (4 decimals of a ms)
    assert sum(bd.values()) == pytest.approx(t["step_time_ms"]["mean"], abs=1e-3)
    assert "CPU only" in render_text(r)
    json.dumps(r)
