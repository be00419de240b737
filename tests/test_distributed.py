"""Distributed profiling and optimization (autoopt.distributed.launch, autoopt.distributed.worker,
autoopt.distributed.evaluator, autoopt.pipelines.distributed, autoopt.transforms.ddp).

Fast tests check the pieces in this process (launcher command, failure reports, rank
balance, DDP transforms and their patches, verification, a world-size-1 DDP session on
gloo). The slow ones launch real 2-process gloo jobs through torch.distributed.run: end
to end through the CLI, a planted straggler, a crashing rank, and optimize.
"""
from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import pytest

from autoopt.analyze import balance as B
from autoopt.distributed import launch as D
from autoopt.errors import UserError
from autoopt.pipelines import distributed as P

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


# ---------------------------------------------------------------------------- launcher
def test_launcher_command_is_torch_distributed_run_standalone_by_default():
    cmd = D.launcher_command(2, [], "/tmp/c.json")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert "--standalone" in cmd
    assert cmd[-3:] == ["--module", "autoopt.distributed.worker", "/tmp/c.json"]


def test_launcher_command_keeps_rendezvous_options_for_several_nodes():
    extra = ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "host0:29400"]
    cmd = D.launcher_command(4, extra, "c.json")
    assert "--standalone" not in cmd
    i = cmd.index("--nnodes")
    assert cmd[i:i + len(extra)] == extra
    assert cmd.index("--nnodes") < cmd.index("--module")


def test_launcher_command_rejects_a_second_process_count():
    with pytest.raises(UserError, match="conflicts with --nproc"):
        D.launcher_command(2, ["--nproc-per-node=4"], "c.json")


# ---------------------------------------------------------------------------- failures
def _rec(rank, kind=None, t=0.0, **err):
    r = {"rank": rank, "world_size": 2, "host": "h", "pid": 100 + rank, "ok": kind is None, "traces_on_disk": []}
    if kind:
        r["error"] = dict({"kind": kind, "type": "RuntimeError", "message": "boom", "time": t, "where": None}, **err)
    return r


def test_root_cause_is_the_first_error_that_is_not_a_lost_peer():
    recs = [_rec(0, "peer", t=1.0), _rec(1, "exception", t=2.0, type="ValueError")]
    assert D.root_cause(recs)["rank"] == 1
    assert D.root_cause([_rec(0, "peer", t=3.0), _rec(1, "peer", t=2.0)])["rank"] == 1
    assert D.root_cause([_rec(0), _rec(1)]) is None


def test_job_failure_names_the_rank_its_error_and_the_kept_traces(tmp_path):
    trace = tmp_path / "rank0.123.pt.trace.json.gz"
    trace.write_bytes(b"x")
    recs = [_rec(0, "peer", t=1.5), _rec(1, "exception", t=1.0, type="ValueError", message="bad value",
                                         where="model.py:12 (in forward)")]
    err = D.job_failure(recs, 1, {"stderr": ""}, nproc=2, model="model.py", keep_dirs=[str(tmp_path)])
    msg = err.message
    assert "rank 1 of 2" in msg and "ValueError: bad value" in msg and "model.py:12" in msg
    assert "Rank(s) 0 stopped with it" in msg
    assert trace.name in msg and str(tmp_path) in msg


def test_job_failure_passes_a_model_file_error_through():
    recs = [_rec(0, "user", message="model.py: build_model() returned None"),
            _rec(1, "user", message="model.py: build_model() returned None")]
    msg = D.job_failure(recs, 1, {}, nproc=2, model="model.py", keep_dirs=[]).message
    assert "every rank reported" in msg and "build_model() returned None" in msg
    assert "No rank got as far as writing its trace" in msg


def test_job_failure_without_reports_shows_the_launcher_output():
    msg = D.job_failure([], 2, {"stderr": "error: unrecognized arguments: --bogus", "stderr_path": "/x/err"},
                        nproc=2, model="m.py", keep_dirs=[]).message
    assert "unrecognized arguments: --bogus" in msg and "/x/err" in msg


def test_job_failure_keeps_the_launcher_output_beside_the_traces(tmp_path):
    """The job's own folder is temporary: the message must name a copy that outlives it."""
    job, kept = tmp_path / "job", tmp_path / "run"
    job.mkdir()
    kept.mkdir()
    err = job / "launcher.stderr"
    err.write_text("rank 1: terminate called after throwing an instance of 'gloo::IoException'\n")
    msg = D.job_failure([], -6, {"stderr": err.read_text(), "stderr_path": str(err)}, nproc=2, model="m.py",
                        keep_dirs=[str(kept)]).message
    err.unlink()  # the temporary folder goes
    assert str(kept / "launcher.stderr") in msg
    assert "gloo::IoException" in (kept / "launcher.stderr").read_text()


# ---------------------------------------------------------------------------- rank balance
def _analysis(busy_per_rank, wait_per_rank):
    traces, per_rank = [], []
    for r, (busy, wait) in enumerate(zip(busy_per_rank, wait_per_rank)):
        steps = [{"step": str(i), "total": b + w, "communication": w} for i, (b, w) in enumerate(zip(busy, wait))]
        mean = sum(s["total"] for s in steps) / len(steps)
        traces.append({"rank": r, "path": f"rank{r}.json", "step_time_ms": {"mean": mean},
                       "breakdown_ms": {"communication": sum(wait) / len(wait)}, "breakdown_per_step_ms": steps})
        per_rank.append({"rank": r, "step_time_ms": mean})
    return {"traces": traces, "ranks": {"rank_count": len(traces), "per_rank": per_rank, "straggler_rank": None,
                                        "slowest_rank": 0, "fastest_rank": 1},
            "metrics": {"rank_step_skew": 0.01}}


def test_rank_balance_names_the_busy_rank_when_the_wall_clock_cannot():
    res = _analysis([[10, 11, 10], [50, 52, 51]], [[41, 42, 41], [1, 1, 0.5]])  # equal wall-clock steps
    bal = B.rank_balance(res)
    assert bal["clearly_apart"] and bal["straggler_rank"] == 1
    assert res["ranks"]["straggler_rank"] == 1 and res["ranks"]["slowest_rank"] == 1
    assert res["metrics"]["rank_step_skew"] == pytest.approx((51 - 10) / 10, rel=1e-3)  # medians
    assert res["ranks"]["per_rank"][1]["busy_ms_per_step"] == pytest.approx(51.0)
    assert any("busy time" in n for n in res["notes"])


def test_one_noisy_step_neither_makes_nor_hides_a_straggler():
    assert B._apart([60, 58, 20, 61, 59], [10, 11, 40, 10, 12])  # one descheduled step on the fast rank
    assert not B._apart([10, 11, 80, 10, 12], [10, 11, 11, 10, 11])  # one slow step is not a straggler
    assert not B._apart([10.5, 10.6], [10.0, 10.1])  # below the minimum gap


def test_rank_balance_leaves_overlapping_ranks_alone():
    res = _analysis([[10, 14, 12], [11, 13, 15]], [[3, 2, 3], [2, 3, 1]])
    bal = B.rank_balance(res)
    assert not bal["clearly_apart"] and bal["straggler_rank"] is None
    assert res["metrics"]["rank_step_skew"] == 0.01


def test_straggler_rule_fires_on_the_balanced_skew_and_names_the_rank():
    res = _analysis([[10, 11, 10], [50, 52, 51]], [[41, 42, 41], [1, 1, 0.5]])
    B.rank_balance(res)
    res["metrics"]["rank_count"] = 2
    from autoopt.diagnosis.facts_builder import build_facts, diagnose

    facts = build_facts(analysis=res, env={"device.type": "cpu"})
    codes = {f.code: f for f in diagnose(facts, res)}
    assert "AO804" in codes
    assert "rank 1" in codes["AO804"].message and codes["AO804"].evidence["straggler_rank"] == 1


# ---------------------------------------------------------------------------- DDP transforms
def test_ddp_transforms_change_only_their_setting():
    from autoopt.transforms.ddp import apply_all, ddp_kwargs, default_settings, describe_settings

    base = default_settings()
    assert base == {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": False, "static_graph": False, "no_sync": False}
    s = apply_all(base, [("ddp_bucket_size", {"bucket_cap_mb": 5}), ("ddp_static_graph", {})])
    assert s["bucket_cap_mb"] == 5.0 and s["static_graph"] and not s["gradient_as_bucket_view"]
    assert base["bucket_cap_mb"] == 25.0  # a copy
    assert ddp_kwargs(s) == {"bucket_cap_mb": 5.0, "gradient_as_bucket_view": False, "static_graph": True}
    assert "static_graph=True" in describe_settings(s)


def _workload(module=None, batch_size=16, mode_train=True, facts=None):
    from autoopt.types import Capabilities, ModelSpec, Workload

    spec = ModelSpec(path=Path("m.py"), name="m", module=module or types.SimpleNamespace(), build_model=lambda: None,
                     make_batch=lambda n: None, build_optimizer=(lambda m: None) if mode_train else None)
    return Workload(spec=spec, caps=Capabilities("cpu"), batch_size=batch_size, facts=facts or {})


def test_no_sync_is_safe_when_the_file_accumulates_and_manual_when_it_introduces_accumulation():
    from autoopt.transforms.ddp import get_ddp_transform
    from autoopt.types import ExecConfig

    t = get_ddp_transform("ddp_no_sync")
    wl_acc = _workload(types.SimpleNamespace(GRAD_ACCUM_STEPS=4))
    p = t.resolve_params(wl_acc, wl_acc.caps, {})
    assert p == {"steps": 4, "introduces_accumulation": False} and t.safety_for(p) == "safe"
    assert t.apply(ExecConfig(batch_size=16, grad_accum_steps=4), p).batch_size == 16
    wl = _workload(batch_size=16)
    p2 = t.resolve_params(wl, wl.caps, {"steps": 2})
    assert t.safety_for(p2) == "manual"
    cfg = t.apply(ExecConfig(batch_size=16), p2)
    assert (cfg.batch_size, cfg.grad_accum_steps) == (8, 2)
    assert t.check(_workload(batch_size=15), wl.caps, {"steps": 2}) is not None
    assert t.check(_workload(mode_train=False), wl.caps, {"steps": 2}) is not None


def test_static_graph_is_skipped_for_changing_shapes():
    from autoopt.transforms.ddp import get_ddp_transform

    wl = _workload(facts={"workload.static_shapes": False})
    assert "shape" in get_ddp_transform("ddp_static_graph").check(wl, wl.caps, {})


def test_ddp_patch_writes_constants_the_worker_reads_back(tmp_path):
    from autoopt.patching.editor import SourceEditor
    from autoopt.transforms.ddp import default_settings, get_ddp_transform, snippet_for
    from autoopt.workload.load import load_model_file

    src = (SCRIPTS / "ddp_tiny.py").read_text()
    ed = SourceEditor(src, "ddp_tiny.py")
    items = [("ddp_bucket_size", {"bucket_cap_mb": 50.0}), ("ddp_gradient_as_bucket_view", {}),
             ("ddp_static_graph", {})]
    for name, params in items:
        get_ddp_transform(name).patch(ed, params, None)
    patched = tmp_path / "ddp_tiny.py"
    patched.write_text(ed.code)
    spec = load_model_file(patched)
    assert default_settings(spec.module) == {"bucket_cap_mb": 50.0, "gradient_as_bucket_view": True,
                                             "static_graph": True, "no_sync": False}
    snip = snippet_for(items)
    assert "bucket_cap_mb=50" in snip and "gradient_as_bucket_view=True" in snip and "static_graph=True" in snip


def test_default_settings_reject_bad_constants():
    from autoopt.transforms.ddp import default_settings

    with pytest.raises(ValueError, match="DDP_BUCKET_CAP_MB"):
        default_settings(types.SimpleNamespace(DDP_BUCKET_CAP_MB=-1))
    with pytest.raises(ValueError, match="DDP_STATIC_GRAPH"):
        default_settings(types.SimpleNamespace(DDP_STATIC_GRAPH="yes"))


# ---------------------------------------------------------------------------- verification
def test_verification_with_parameters_accepts_rounding_and_rejects_real_differences():
    """A distributed job verifies losses and the parameters reached (autoopt.run.verify.compare
    with parameters recorded)."""
    import dataclasses

    import torch

    from autoopt.run.verify import RunRecord, compare

    base = RunRecord([], [2.0, 1.5, 1.2], "a", params=[torch.ones(3, 3), torch.arange(4.0)])
    same = RunRecord([], [2.0, 1.5 * (1 + 1e-7), 1.2], "a", params=[torch.ones(3, 3), torch.arange(4.0) * (1 + 1e-7)])
    ok = compare(base, same, 1e-4)
    assert ok.ok and ok.max_rel_error < 1e-6
    off = RunRecord([], [2.0, 1.5, 1.2], "a", params=[torch.ones(3, 3), torch.arange(4.0) + 0.01])
    bad = compare(base, off, 1e-4)
    assert not bad.ok and "parameters after 3 steps" in bad.reason and bad.max_rel_error > 1e-3
    diverged = dataclasses.replace(same, losses=[2.0, 1.6, 1.2])
    assert "diverged" in compare(base, diverged, 1e-4).reason
    nan = dataclasses.replace(same, losses=[2.0, math.nan, 1.0])
    assert compare(base, nan, 1e-4).reason.startswith("produced inf/NaN")
    assert "weights" in compare(base, dataclasses.replace(same, checksum="b"), 1e-4).reason


def test_split_batch_makes_equal_micro_batches():
    import torch

    from autoopt.run.session import split_batch

    x, y = torch.arange(8.0).reshape(8, 1), torch.arange(8)
    parts = split_batch((x, y), 2)
    assert [p[0].shape[0] for p in parts] == [4, 4]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert split_batch({"a": x}, 1) == [{"a": x}]


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import datetime

    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_session_no_sync_accumulation_matches_one_full_batch(gloo_world_of_one):
    from autoopt.env import detect_capabilities
    from autoopt.run.session import DistContext, Session
    from autoopt.run.verify import compare, record_run
    from autoopt.transforms.ddp import default_settings, get_ddp_transform
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    spec = load_model_file(SCRIPTS / "ddp_tiny.py")
    wl = build_workload(spec, detect_capabilities("cpu"), batch_size=8, seed=0)
    base_cfg = wl.base_config().with_(ddp=default_settings())
    with Session(wl, base_cfg, dist=DistContext(rank=0)) as s:
        assert type(s.model).__name__ == "DistributedDataParallel"
        base = record_run(s, steps=3, keep_params=True)
    t = get_ddp_transform("ddp_no_sync")
    params = t.resolve_params(wl, wl.caps, {"steps": 2})
    cfg = t.apply(base_cfg, params, wl)
    assert cfg.ddp["no_sync"] is True
    with Session(wl, cfg, dist=DistContext(rank=0)) as s:
        assert s.accum == 2 and s.cfg.batch_size == 4
        var = record_run(s, steps=3, keep_params=True)
    res = compare(base, var, t.tolerance)
    assert res.ok, res
    assert res.max_rel_error < 1e-4
    # a different rank trains on different data: the check can fail
    with Session(wl, base_cfg, dist=DistContext(rank=1)) as s:
        other = record_run(s, steps=3, keep_params=True)
    assert not compare(base, other, 1e-4).ok


# ---------------------------------------------------------------------------- real jobs
@pytest.mark.slow
def test_two_process_gloo_profile_end_to_end_through_the_cli(tmp_path, capsys):
    from autoopt.cli import main

    rc = main(["profile", str(SCRIPTS / "ddp_tiny.py"), "--nproc", "2", "--device", "cpu", "--steps", "2",
               "--logdir", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    assert res["nproc"] == 2 and res["world_size"] == 2 and res["backend"] == "gloo" and res["mode"] == "train"
    run = Path(res["logdir"])
    files = sorted(p.name for p in run.glob("*.pt.trace.json.gz"))
    assert len(files) == 2 and files[0].startswith("rank0.") and files[1].startswith("rank1.")
    assert sorted(t["rank"] for t in res["traces"]) == [0, 1]
    assert all(t["steps"] == 2 for t in res["traces"])
    assert res["metrics"]["rank_count"] == 2 and res["metrics"]["comm_backend"] == "gloo"
    assert res["ranks"]["rank_count"] == 2
    rows = res["per_rank"]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["measured_step_time_ms"] > 0 and r["busy_ms_per_step"] > 0
        assert r["collective_wait_ms_per_step"] is not None
    # every rank's all-reduce is in its trace: the communication share is measured, not assumed
    assert res["metrics"]["communication_fraction"] > 0
    assert res["measurement"]["samples_per_step"] == 2 * res["batch_size"]
    assert isinstance(res["findings"], list)
    assert all({"code", "title", "message", "evidence", "safety"} <= set(f) for f in res["findings"])


@pytest.mark.slow
def test_planted_straggler_is_found_and_named(tmp_path):
    res = P.profile_distributed(str(SCRIPTS / "ddp_straggler.py"), nproc=2, device="cpu", steps=5,
                                logdir=str(tmp_path), measure_steps=3, warmup_steps=1, timeout_s=600)
    assert res["ranks"]["straggler_rank"] == 1
    rows = {r["rank"]: r for r in res["per_rank"]}
    # rank 1 sleeps 250 ms per step; rank 0 spends that time waiting in the all-reduce
    assert rows[1]["busy_ms_per_step"] > rows[0]["busy_ms_per_step"] + 100
    assert rows[0]["collective_wait_ms_per_step"] > rows[1]["collective_wait_ms_per_step"]
    assert res["metrics"]["rank_step_skew"] >= 0.5
    f = next(f for f in res["findings"] if f["code"] == "AO804")
    assert "rank 1" in f["message"] and f["evidence"]["straggler_rank"] == 1


@pytest.mark.slow
def test_a_crashing_rank_ends_the_job_with_its_error_and_the_other_traces_kept(tmp_path):
    with pytest.raises(UserError) as ei:
        P.profile_distributed(str(SCRIPTS / "ddp_crash.py"), nproc=2, device="cpu", steps=3, logdir=str(tmp_path),
                              measure_steps=3, warmup_steps=1, timeout_s=600, collective_timeout_s=120)
    msg = ei.value.message
    assert "rank 1 of 2" in msg and "ValueError: planted failure on rank 1" in msg
    # the model-file error: the file, the function and the line that raised
    assert "ddp_crash.py: forward:" in msg and re.search(r"at line \d+ of ddp_crash\.py", msg)
    rank0 = list(tmp_path.rglob("rank0.*.pt.trace.json.gz"))
    assert rank0, "rank 0's trace was not kept"
    assert rank0[0].name in msg
    from autoopt.analyze import analyze_paths

    assert analyze_paths([str(rank0[0])])["traces"][0]["rank"] == 0  # a readable trace


@pytest.mark.slow
def test_optimize_distributed_measures_and_verifies_ddp_transforms_side_by_side(tmp_path):
    from autoopt.settings import DistributedSettings, MeasureSettings, OptimizeSettings

    link = tmp_path / "my_ddp.py"  # reached through a symbolic link: the patch names the link
    link.symlink_to(SCRIPTS / "ddp_tiny.py")
    rep = P.optimize_distributed(OptimizeSettings(
        model_path=str(link), device="cpu", out_dir=str(tmp_path / "r"),
        measure=MeasureSettings.quick(), distributed=DistributedSettings(nproc=2, timeout_s=900)))
    for key in ("model", "device", "mode", "batch_size", "baseline", "findings", "variants", "final", "artifacts"):
        assert key in rep
    assert rep["mode"] == "train" and rep["nproc"] == 2 and rep["baseline"]["throughput_per_s"] > 0
    names = [v["name"] for v in rep["variants"]]
    assert names[0] == "baseline"
    assert any(n.startswith("ddp_bucket_size=") for n in names)
    assert "ddp_gradient_as_bucket_view" in names and "ddp_static_graph" in names
    by = {v["name"]: v for v in rep["variants"]}
    assert by["ddp_no_sync"]["status"] == "skipped" and "training semantics" in by["ddp_no_sync"]["reason"]
    for v in rep["variants"]:
        assert v["status"] in ("kept", "rejected", "failed", "skipped")
        if v["status"] in ("kept", "rejected") and v["name"] != "baseline":
            assert v["max_rel_error"] is not None and v["max_rel_error"] <= v["tolerance"] or v["status"] == "rejected"
            assert v["step_time_ms"]["median"] > 0 and v["speedup"] > 0
    f = rep["final"]
    assert f["speedup"] > 0 and "ddp" in f
    for k in ("report_md", "report_html", "plan", "patch", "logdir"):
        assert Path(rep["artifacts"][k]).exists()
    assert len(list((tmp_path / "r" / "tb" / "baseline").glob("rank*.pt.trace.json.gz"))) == 2
    saved = json.loads(Path(rep["artifacts"]["report_json"]).read_text())
    assert saved["variants"] == json.loads(json.dumps(rep["variants"]))
    plan = json.loads(Path(rep["artifacts"]["plan"]).read_text())
    assert plan["ddp"]["nproc"] == 2 and plan["transforms"] == []
    from test_report_schema import check_report

    check_report(rep, plan)
    # every judged variant was decided side by side with its anchor, on every rank alike
    judged = [v for v in rep["variants"] if v["decision"] is not None]
    assert judged and all("side by side in" in v["reason"] and v["decision"]["rounds"] >= 6 for v in judged)
    if f["transforms"]:
        diff = Path(rep["artifacts"]["patch"]).read_text()
        assert "DDP_" in diff and "a/my_ddp.py" in diff and "ddp_tiny" not in diff.split("@@")[0]
        assert any("--follow-symlinks" in n for n in rep["notes"])
