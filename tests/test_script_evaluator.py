"""ScriptEvaluator (autoopt.scripting.evaluator): the search's evaluator over child processes
that each run a configuration of an unmodified training script, and script_workload
(autoopt.scripting.workload). Scripts in tests/data/script_core/."""
from __future__ import annotations

from pathlib import Path

import pytest

from autoopt.env import detect_capabilities
from autoopt.errors import UserError
from autoopt.scripting.evaluator import ScriptEvaluator
from autoopt.scripting.target import script_target
from autoopt.scripting.workload import script_workload
from autoopt.search.evaluator import Evaluator
from autoopt.settings import MeasureSettings, ProfileSettings, SearchSettings
from autoopt.types import ExecConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "script_core"
FAST = MeasureSettings(warmup_steps=1, warmup_min_s=0.0, min_steps=4, max_steps=8, min_time_s=0.0, max_time_s=5.0)


def _evaluator(tmp_path, script: str, args: list[str], *, tb: bool = False, **kw) -> ScriptEvaluator:
    return ScriptEvaluator(script_target(str(DATA / script), args, cwd=str(tmp_path)), detect_capabilities("cpu"),
                           measure_settings=FAST, profile_settings=ProfileSettings(wait=0, warmup=1, active=1),
                           search_settings=SearchSettings(rounds=2, max_rounds=2),
                           tb_dir=tmp_path / "tb" if tb else None, log_dir=tmp_path / "logs", verify_steps=3,
                           warmup_steps=1, **kw)


def _alive(ev: ScriptEvaluator) -> list:
    return [w.proc for w in ev._alive.values() if w.alive()]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The tiny CNN script's evaluator after its baseline (children kept for the tests)."""
    tmp = tmp_path_factory.mktemp("cnn")
    ev = _evaluator(tmp, "cnn.py", ["--epochs", "200"], tb=True)
    point = ev.baseline(ExecConfig(device="cpu"))
    yield ev, point, tmp
    ev.close()


def test_it_has_every_method_of_the_evaluator_protocol():
    wanted = [n for n, v in vars(Evaluator).items() if callable(v) and not n.startswith("_")]
    assert len(wanted) >= 8
    assert [n for n in wanted if not callable(getattr(ScriptEvaluator, n, None))] == []


def test_baseline_runs_the_script_twice_from_one_seed_traces_and_measures_it(cnn):
    ev, point, tmp = cnn
    assert ev.reproducible is True and ev.seed_spread is None
    assert len(ev.reference_losses) == 3 and point.config.batch_size == 16 and ev.batch_size == 16
    m = point.measurement
    assert m.batch_size == 16 and m.step_time_ms.n >= 4 and m.throughput_per_s > 0
    assert point.logdir and list(Path(point.logdir).glob("cnn.*.pt.trace.json.gz"))
    assert (tmp / "logs" / "baseline.log").exists() and (tmp / "logs" / "baseline-same-seed.log").exists()
    assert ev.sites["optimizer"]["var"] == "opt" and ev.framework is None
    assert ev.facts["workload.optimizer"] == "AdamW"
    assert ev.convergence(point.config, point.config, 10) is None and ev.baseline_accuracy() is None
    assert ev.agree(True) is True and ev.memory_budget_mb(0.5) > 0


def test_the_workload_comes_from_the_facts_without_building_anything(cnn):
    from autoopt.transforms.channels_last import ChannelsLast
    from autoopt.transforms.compile import Compile
    from autoopt.transforms.dataloader import Dataloader
    from autoopt.transforms.fused_optimizer import FusedOptimizer
    from autoopt.workload.inspect import workload_facts

    ev, _, _ = cnn
    wl = ev.workload
    assert wl.mode == "train" and wl.batch_size == 16 and wl.device == "cpu"
    with pytest.raises(RuntimeError, match="does not build the model of the script"):
        wl.spec.build_model()
    facts = workload_facts(wl)  # would call build_model if a fact were missing
    assert facts["model.conv2d_count"] == 2 and facts["workload.optimizer_impl"] == "for-loop"
    import torch

    assert facts["_optimizer_class"] is torch.optim.AdamW
    caps = ev.caps
    assert FusedOptimizer().check(wl, caps, {}) is None
    assert ChannelsLast().check(wl, caps, {}) is None  # 2 Conv2d, 4-D inputs, not channels_last yet
    assert Dataloader().check(wl, caps, {}) is None
    assert Compile().check(wl, caps, {}) is None


def test_script_workload_of_a_script_without_a_model_or_loader(tmp_path):
    wl = script_workload(script_target(str(DATA / "loop.py"), []), detect_capabilities("cpu"),
                         {"workload.mode": "train", "workload.optimizer": "MyOpt", "_optimizer_module": "mine"})
    from autoopt.workload.inspect import workload_facts

    facts = workload_facts(wl)
    assert wl.mode == "train" and wl.spec.build_dataloader is None and "_optimizer_class" not in facts
    assert facts["model.repeated_block_count"] == 0 and wl.batch_size == 1


def test_a_variant_is_verified_and_measured_beside_the_baseline_in_rounds(cnn):
    ev, point, _ = cnn
    out = ev.trial("foreach", point.config.with_(optimizer_impl="foreach"), tolerance=1e-4, anchor=point, trace=True)
    assert out.failure is None, out.failure and out.failure.summary
    assert out.verification.ok and out.verification.losses_baseline == ev.reference_losses
    assert len(out.verification.losses_variant) == 3
    assert len(out.pair.round_ratios) == 2 and out.pair.anchor is not None
    assert out.measurement.step_time_ms.n >= 4 and out.logdir and Path(out.logdir).name == "foreach"
    assert ev.applied["foreach"] == ["optimizer_impl"]
    assert len(_alive(ev)) <= 3


def test_a_variant_outside_the_tolerance_is_rejected_unmeasured(cnn):
    ev, point, _ = cnn
    ref = ev.reference_losses
    ev.reference_losses = [x * 1.01 for x in ref]  # as if the variant's numerics had moved by 1 %
    try:
        out = ev.trial("moved", point.config.with_(matmul_precision="high"), tolerance=1e-3, anchor=point)
    finally:
        ev.reference_losses = ref
    assert out.failure is None and not out.verification.ok and not out.verified
    assert "diverged from the baseline at step 1" in out.verification.reason
    assert out.pair is None and out.measurement is None
    assert out.verification.losses_variant == pytest.approx(ref, rel=1e-6)


def test_what_a_script_cannot_take_is_a_failure_value_without_a_child(cnn):
    ev, point, _ = cnn
    n = len(ev._names)
    out = ev.trial("b64", point.config.with_(batch_size=64), tolerance=1e-4, anchor=point)
    assert out.failure.kind == "cannot be applied to a script" and "batches of 16" in out.failure.message
    assert len(ev._names) == n  # no child was started


def test_a_failing_variant_is_a_value_with_the_script_line_and_log(cnn):
    ev, point, _ = cnn
    bad = point.config.with_(compile_mode="default", compile_backend="no_such_backend")
    out = ev.trial("badc", bad, tolerance=1e-4, anchor=point)
    assert out.failure is not None and not out.verified
    assert "no_such_backend" in out.failure.message
    assert "cnn.py" in out.failure.message  # where in the script it failed


def test_the_baseline_beside_itself_is_two_children(cnn):
    ev, point, _ = cnn
    pair = ev.measure_pair(point.config, point.config, extend=False)
    assert len(pair.round_ratios) == 2 and pair.ratio > 0 and pair.anchor is not None  # (a loaded 2-core box: no bound)
    keys = list(ev._alive)
    assert any(k.endswith("#copy") for k in keys) and any(k + "#copy" in keys for k in keys)


def test_final_measures_both_side_by_side_and_run_patched_returns_the_losses(cnn, tmp_path):
    ev, point, _ = cnn
    f = ev.final(point.config, point)
    assert f.baseline.step_time_ms.n >= 2 and f.final.step_time_ms.n >= 2 and f.logdir
    copy = tmp_path / "patched_cnn.py"
    copy.write_text((DATA / "cnn.py").read_text())
    assert ev.run_patched(copy, point.config) == pytest.approx(ev.reference_losses, rel=1e-6)


def test_a_patched_copy_elsewhere_imports_the_scripts_own_modules(tmp_path):
    ev = _evaluator(tmp_path, "uses_helper.py", [])
    copy = tmp_path / "elsewhere" / "uses_helper.patched.py"
    copy.parent.mkdir()
    copy.write_text((DATA / "uses_helper.py").read_text())
    losses = ev.run_patched(copy, ExecConfig())
    assert len(losses) == 3 and all(x > 0 for x in losses)
    assert not _alive(ev)


def test_a_jobs_step_counts_every_ranks_batch(tmp_path):
    ev = _evaluator(tmp_path, "ddp.py", [], nproc=2)
    ev.batch_size = 8
    m = ev._measurement([10.0, 10.0, 12.0], 5.0, 1)
    assert m.batch_size == 8 and m.samples_per_step == 16 and m.throughput_per_s == pytest.approx(1600.0)


def test_verification_widens_to_three_times_the_seed_spread(tmp_path):
    ev = _evaluator(tmp_path, "loop.py", [])
    ev.reference_losses = [1.0, 1.0, 1.0]
    assert not ev.verify([1.01, 1.0, 1.0], 1e-4).ok
    ev.seed_spread = 0.005
    v = ev.verify([1.01, 1.0, 1.0], 1e-4)
    assert v.ok and v.tolerance == pytest.approx(0.015)
    assert not ev.verify([1.02, 1.0, 1.0], 1e-4).ok
    assert not ev.verify([1.0], 1e-4).ok  # a loss missing is not a pass


@pytest.mark.slow
def test_every_process_gets_one_str_hash_seed(tmp_path, monkeypatch):
    """A script whose class numbering follows set iteration order repeats its losses: every
    configuration's process starts with the same PYTHONHASHSEED (a user's own is kept)."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    ev = _evaluator(tmp_path, "set_order.py", [])
    try:
        ev.baseline(ExecConfig())
        assert ev.reproducible is True and ev.seed_spread is None
    finally:
        ev.close()


@pytest.mark.slow
def test_an_unreproducible_script_is_detected_and_said(tmp_path):
    ev = _evaluator(tmp_path, "clock_seeded.py", [])
    try:
        ev.baseline(ExecConfig())
        assert ev.reproducible is False and ev.seed_spread > 1e-6
        assert any("not reproducible" in n and "3x" in n for n in ev.notes)
        assert ev.tolerance(1e-4) == pytest.approx(max(1e-4, 3 * ev.seed_spread))
    finally:
        ev.close()
    assert not _alive(ev)


def test_a_script_failing_on_its_own_is_a_user_error_naming_the_line(tmp_path):
    ev = _evaluator(tmp_path, "raises.py", [])
    with pytest.raises(UserError) as ei:
        ev.baseline(ExecConfig())
    msg = str(ei.value)
    assert "raises.py:13" in msg and "bad label in batch 3" in msg and "failed on its own" in msg
    assert "autoopt/scripting" not in msg  # not a trace of autoopt's hooks
    assert not _alive(ev)


def test_a_script_too_short_says_how_many_steps_it_ran(tmp_path):
    ev = _evaluator(tmp_path, "short.py", [])
    ev.verify_steps = 4
    with pytest.raises(UserError, match=r"ended on its own after 3 optimizer step\(s\).*pass arguments"):
        ev.baseline(ExecConfig())


def test_a_script_without_an_optimizer_step_says_so(tmp_path):
    ev = _evaluator(tmp_path, "no_optimizer.py", [])
    with pytest.raises(UserError, match="without stepping a torch.optim optimizer"):
        ev.baseline(ExecConfig())


def test_close_stops_every_child(tmp_path):
    ev = _evaluator(tmp_path, "loop.py", [])
    ev._worker(ExecConfig(), "a")
    ev._worker(ExecConfig(num_threads=1), "b")
    procs = _alive(ev)
    assert len(procs) == 2
    ev.close()
    assert all(p.poll() is not None for p in procs)


def test_user_files_are_told_by_directory_not_by_a_name_in_the_path(tmp_path):
    """A project in a folder named autoopt (a clone of this repository is) or torch is the
    user's code; autoopt's, torch's and the standard library's own files are not."""
    import os

    import torch

    import autoopt
    from autoopt.userfiles import is_user_file

    mine = tmp_path / "autoopt" / "torch" / "train.py"
    mine.parent.mkdir(parents=True)
    mine.write_text("")
    assert is_user_file(str(mine))
    assert not is_user_file(autoopt.__file__) and not is_user_file(torch.nn.modules.module.__file__)
    assert not is_user_file(os.__file__) and not is_user_file("<frozen runpy>") and not is_user_file("")


@pytest.mark.slow
def test_a_script_in_a_folder_named_autoopt_has_its_sites(tmp_path):
    """The sites the patch needs are found for a script whose path holds "/autoopt/" (they were
    None in a clone of this repository at .../autoopt/, where every frame looked like autoopt's)."""
    import shutil

    folder = tmp_path / "autoopt"
    folder.mkdir()
    shutil.copyfile(DATA / "cnn.py", folder / "cnn.py")
    ev = ScriptEvaluator(script_target(str(folder / "cnn.py"), ["--epochs", "200"], cwd=str(tmp_path)),
                         detect_capabilities("cpu"), measure_settings=FAST,
                         profile_settings=ProfileSettings(wait=0, warmup=1, active=1),
                         search_settings=SearchSettings(rounds=2, max_rounds=2), tb_dir=None,
                         log_dir=tmp_path / "logs", verify_steps=3, warmup_steps=1)
    try:
        ev.baseline(ExecConfig(device="cpu"))
        assert ev.sites["forward"] and ev.sites["backward"] and ev.sites["step"], ev.sites
        assert ev.sites["optimizer"]["var"] == "opt"
    finally:
        ev.close()
