"""The child that runs a configuration of an unmodified training script
(autoopt.scripting.driver), driven through the parent's handle (autoopt.scripting.worker).
The scripts are in tests/data/script_core/; probe.py writes what it sees to a JSON file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoopt.errors import UserError
from autoopt.scripting.protocol import cannot_apply, where
from autoopt.scripting.target import check_script, script_target
from autoopt.scripting.worker import ScriptEnded, ScriptWorker, WorkerFailed
from autoopt.types import ExecConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "script_core"


PLAIN = ExecConfig()


def _worker(tmp_path, script: str, args: list[str], cfg: ExecConfig = PLAIN, *, name: str = "w",
            verify: int = 3, warmup: int = 1, **kw) -> ScriptWorker:
    target = script_target(str(DATA / script), args, cwd=str(tmp_path))
    return ScriptWorker(target, cfg, name=name, seed=0, verify_steps=verify, warmup_steps=warmup,
                        log_dir=tmp_path / "logs", **kw)


def _probe(tmp_path, cfg: ExecConfig = PLAIN, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    out = tmp_path / "seen.json"
    with _worker(tmp_path, "probe.py", ["--out", str(out), *extra], cfg) as w:
        w.start()
        ready = w.wait_ready()
        w.stop()
        assert w.proc.returncode == 0, w.log_tail()
    return ready, json.loads(out.read_text())


@pytest.fixture(scope="module")
def base_probe(tmp_path_factory) -> tuple[dict, dict]:
    """The probe script run as written (its losses are every variant's reference)."""
    return _probe(tmp_path_factory.mktemp("base"))


def _line(script: str, site: dict) -> str:
    return (DATA / script).read_text().splitlines()[site["line"] - 1].strip()


# ------------------------------------------------------------------------------ target and protocol
def test_check_script_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist.*autoopt optimize --script"):
        check_script(str(tmp_path / "nope.py"), "optimize")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    with pytest.raises(UserError, match="line 1"):
        script_target(str(bad), [])


def test_cannot_apply_names_each_field_a_script_cannot_take():
    assert cannot_apply(ExecConfig(amp_dtype="bfloat16", channels_last=True, optimizer_impl="fused",
                                   compile_mode="default", dataloader={"num_workers": 2}, batch_size=16),
                        batch_size=16) == []
    reasons = cannot_apply(ExecConfig(grad_accum_steps=2, activation_checkpointing=True, lr_scale=2.0, batch_size=64),
                           batch_size=16)
    assert len(reasons) == 4 and all("cannot be applied to a script" in r for r in reasons)
    assert any("batches of 16" in r for r in reasons)
    assert cannot_apply(ExecConfig(activation_checkpointing=True), handled={"activation_checkpointing"}) == []


def test_where_prefers_the_script_line():
    script = str(DATA / "raises.py")
    try:
        exec(compile("\n" * 12 + "raise ValueError('x')\n", script, "exec"), {})
    except ValueError as e:
        assert where(e, script) == f"{script}:13 (in <module>)"


# ------------------------------------------------------------------------------ the baseline child
def test_baseline_child_reports_losses_sites_and_facts_then_measures_and_stops(tmp_path):
    with _worker(tmp_path, "cnn.py", ["--epochs", "50"], verify=4, warmup=2) as w:
        w.start()
        ready = w.wait_ready()
        assert ready["steps"] == 6 and len(ready["losses"]) == 4
        assert all(2.0 < x < 2.6 for x in ready["losses"])  # cross-entropy over 10 classes, near log(10)
        assert len(ready["warmup_times_ms"]) == 2 and ready["applied"] == []
        sites = ready["sites"]
        assert sites["script"] == str(DATA / "cnn.py")
        assert _line("cnn.py", sites["forward"]).startswith("loss = nn.functional.cross_entropy(model(x)")
        assert sites["forward"]["model_var"] == "model" and sites["forward"]["function"] == "train"
        assert _line("cnn.py", sites["backward"]) == "loss.backward()"
        assert _line("cnn.py", sites["step"]) == "opt.step()" and sites["step"]["optimizer_var"] == "opt"
        assert _line("cnn.py", sites["optimizer"]).startswith("opt = torch.optim.AdamW(")
        assert sites["optimizer"]["var"] == "opt"
        assert [_line("cnn.py", s) for s in sites["dataloaders"]] == [
            "loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)"]
        f = ready["facts"]
        assert ready["batch_size"] == 16 and f["workload.batch_size"] == 16
        assert f["workload.optimizer"] == "AdamW" and f["workload.mode"] == "train"
        assert f["model.conv2d_count"] == 2 and f["workload.input_is_4d"] is True
        assert f["workload.has_dataloader"] is True and f["workload.dataloader_workers"] == 0
        assert f["workload.static_shapes"] is True and f["_dataloader"]["is_dataloader"] is True
        times, peak = w.measure(4)
        assert len(times) == 4 and all(t > 0 for t in times) and peak > 0
        files = w.trace(tmp_path / "tb", "cnn", 1, 1)
        assert len(files) == 1 and Path(files[0]).name.startswith("cnn.") and Path(files[0]).exists()
        w.stop()
        assert w.proc.returncode == 0


def test_the_forward_site_is_the_training_call_not_an_evaluation(tmp_path):
    with _worker(tmp_path, "eval_first.py", []) as w:
        w.start()
        ready = w.wait_ready()
    fwd = ready["sites"]["forward"]
    assert _line("eval_first.py", fwd) == "pred = net(x)" and fwd["model_var"] == "net" and fwd["function"] == "main"
    assert ready["batch_size"] == 4  # the training batch, not the evaluation's 64


def test_script_runs_like_python_script_args(base_probe):
    ready, seen = base_probe
    assert seen["argv"][0] == "--out" and Path(seen["argv"][1]).name == "seen.json"
    assert seen["cwd"] == str(Path(seen["argv"][1]).parent) and seen["path0"] == str(DATA)
    assert seen["fused"] is None and seen["workers"] == 0 and seen["compiled"] is False
    assert seen["autocast"] is False and seen["inner_dtype"] == "torch.float32"
    import random

    random.seed(0)
    assert seen["random"] == random.random()  # the seed was forced before the script ran


def test_a_variant_is_applied_at_construction_and_first_use(tmp_path, base_probe):
    cfg = ExecConfig(amp_dtype="bfloat16", channels_last=True, optimizer_impl="foreach", matmul_precision="high",
                     num_threads=1, dataloader={"num_workers": 1, "persistent_workers": True, "prefetch_factor": 2})
    ready, seen = _probe(tmp_path, cfg)
    assert set(ready["applied"]) == {"amp_dtype", "channels_last", "optimizer_impl", "matmul_precision",
                                     "num_threads", "dataloader"}
    assert seen["autocast"] is True and seen["inner_dtype"] == "torch.bfloat16"
    assert seen["output_dtype"] == "torch.float32"  # floating outputs cast back, as accelerate does
    assert seen["input_channels_last"] is True and seen["weight_channels_last"] is True
    assert seen["foreach"] is True and not seen["fused"]
    assert seen["matmul"] == "high" and seen["threads"] == 1
    assert seen["workers"] == 1 and seen["persistent"] is True
    base, _ = base_probe
    # the same batches and weights: bf16 changes the losses, a little
    assert base["losses"] != ready["losses"]
    assert all(abs(a - b) / b < 0.05 for a, b in zip(base["losses"], ready["losses"]))


def test_fp16_gets_a_grad_scaler_and_the_loss_is_recorded_unscaled(tmp_path, base_probe):
    base, seen0 = base_probe
    # with an LR scheduler, which wraps optimizer.step as a bound method
    ready, seen = _probe(tmp_path, ExecConfig(amp_dtype="float16", grad_scaler=True), extra=("--scheduler",))
    assert "grad_scaler" in ready["applied"]
    assert seen["grad_norm"] / seen0["grad_norm"] > 1000  # backward ran on the scaled loss
    assert seen["clip_norm"] == pytest.approx(seen0["clip_norm"], rel=0.05)  # clipping saw unscaled gradients
    assert all(abs(a - b) / b < 0.05 for a, b in zip(base["losses"], ready["losses"]))


def test_a_loss_scaled_by_the_scripts_own_grad_scaler_is_divided_by_its_scale(tmp_path, base_probe):
    base, _ = base_probe
    ready, seen = _probe(tmp_path, extra=("--own-scaler",))
    assert seen["grad_norm"] > 1000 * base_probe[1]["grad_norm"]
    assert seen["clip_norm"] == pytest.approx(base_probe[1]["clip_norm"], rel=1e-4)
    assert ready["losses"] == pytest.approx(base["losses"], rel=1e-5)


@pytest.mark.slow
def test_compile_applies_module_compile_in_place(tmp_path, base_probe):
    base, _ = base_probe
    ready, seen = _probe(tmp_path, ExecConfig(compile_mode="default", compile_backend="aot_eager"))
    assert seen["compiled"] is True and "compile_mode" in ready["applied"]
    assert ready["losses"] == pytest.approx(base["losses"], rel=1e-4)


@pytest.mark.slow
def test_compile_with_inductor(tmp_path, base_probe):
    base, _ = base_probe
    ready, seen = _probe(tmp_path, ExecConfig(compile_mode="default"))
    assert seen["compiled"] is True
    assert ready["losses"] == pytest.approx(base["losses"], rel=1e-3)


# ------------------------------------------------------------------------------ failures
def test_unsupported_field_is_an_error_before_the_script_runs(tmp_path):
    out = tmp_path / "seen.json"
    with _worker(tmp_path, "probe.py", ["--out", str(out)], ExecConfig(grad_accum_steps=4)) as w:
        w.start()
        with pytest.raises(WorkerFailed) as ei:
            w.wait_ready()
    assert ei.value.kind == "transform" and "cannot be applied to a script" in ei.value.message
    assert not out.exists()


def test_a_setting_the_script_gives_no_place_to_is_an_error(tmp_path):
    with _worker(tmp_path, "loop.py", [], ExecConfig(dataloader={"num_workers": 2})) as w:  # loop.py has no loader
        w.start()
        with pytest.raises(WorkerFailed) as ei:
            w.wait_ready()
    assert ei.value.kind == "transform" and "the script builds no torch DataLoader" in ei.value.message


def test_a_script_error_names_its_line(tmp_path):
    with _worker(tmp_path, "raises.py", []) as w:
        w.start()
        with pytest.raises(WorkerFailed) as ei:
            w.wait_ready()
    e = ei.value
    assert e.kind == "script" and e.exc_type == "ValueError" and "bad label in batch 3" in e.message
    assert e.where == f"{DATA / 'raises.py'}:13 (in <module>)"
    assert "ValueError" in e.traceback


def test_argparse_error_exits_with_its_usage_in_the_log(tmp_path):
    with _worker(tmp_path, "cnn.py", ["--no-such-flag"]) as w:
        w.start()
        with pytest.raises(WorkerFailed) as ei:
            w.wait_ready()
    assert "status 2" in ei.value.message and "unrecognized arguments" in ei.value.log


def test_a_script_that_ends_early_says_after_how_many_steps(tmp_path):
    with _worker(tmp_path, "short.py", [], verify=4, warmup=2) as w:
        w.start()
        with pytest.raises(ScriptEnded) as ei:
            w.wait_ready()
    assert ei.value.steps == 3 and len(ei.value.losses) == 3


def test_a_hanging_script_times_out_and_is_killed(tmp_path):
    w = _worker(tmp_path, "hangs.py", [], ready_timeout_s=2.0)
    w.start()
    proc = w.proc
    with pytest.raises(WorkerFailed) as ei:
        w.wait_ready()
    assert ei.value.kind == "timeout"
    assert proc.poll() is not None  # the child's group was ended



# ------------------------------------------------------------------------------ --nproc
def test_a_jobs_reply_is_its_slowest_ranks():
    from autoopt.scripting.worker import merge_ranks

    one = {"event": "measured", "times_ms": [1.0, 5.0, 2.0], "peak_memory_mb": 10.0}
    assert merge_ranks([one]) is one
    two = merge_ranks([one, {"event": "measured", "times_ms": [3.0, 1.0, 2.5], "peak_memory_mb": 12.0}])
    assert two["times_ms"] == [3.0, 5.0, 2.5] and two["peak_memory_mb"] == 12.0
    ready = merge_ranks([{"event": "ready", "losses": [1.0], "warmup_times_ms": [2.0], "facts": {"a": 0}},
                         {"event": "ready", "losses": [2.0], "warmup_times_ms": [4.0], "facts": {"a": 1}}])
    assert ready["losses"] == [1.0] and ready["rank_losses"] == [[1.0], [2.0]] and ready["facts"] == {"a": 0}
    assert ready["warmup_times_ms"] == [4.0]
    assert merge_ranks([{"files": ["r0"]}, {"files": ["r1"]}])["files"] == ["r0", "r1"]


@pytest.mark.slow
def test_a_torchrun_style_script_runs_one_driver_per_rank(tmp_path):
    with _worker(tmp_path, "ddp.py", [], ExecConfig(optimizer_impl="foreach"), nproc=2) as w:
        w.start()
        ready = w.wait_ready()
        assert len(w.conns) == 2 and ready["applied"] == ["optimizer_impl"]
        assert len(ready["rank_losses"]) == 2 and ready["rank_losses"][0] != ready["rank_losses"][1]  # own shards
        assert ready["losses"] == ready["rank_losses"][0]
        times, _ = w.measure(3)
        assert len(times) == 3
        files = w.trace(tmp_path / "tb", "ddp", 1, 1)
        assert sorted(Path(f).name.split(".")[0] for f in files) == ["rank0", "rank1"]
        w.stop()
        assert w.proc.returncode == 0
