"""autoopt's TensorBoard summaries (read back with TensorBoard's own event reader) and the
`autoopt view` helpers. The live TensorBoard server and the browser are in test_browser.py."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autoopt.errors import UserError
from autoopt.output import report as R
from autoopt.output import tensorboard as tbsummary
from autoopt.output import view

SAMPLE = Path(__file__).resolve().parent / "data" / "report_sample.json"


@pytest.fixture
def rep() -> dict:
    return json.loads(SAMPLE.read_text())


def _load(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> str:
    return acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()


@pytest.fixture
def written(rep, tmp_path):
    tb = tmp_path / "tb"
    for v in rep["variants"]:
        v["logdir"] = str(tb / tbsummary.run_name(v["name"]))
    dirs = tbsummary.write_summaries(rep, tb)
    return rep, tb, dirs


def test_one_run_per_variant_with_its_scalars(written):
    rep, tb, dirs = written
    assert set(dirs) == {v["name"] for v in rep["variants"]}
    for v in rep["variants"]:
        d = dirs[v["name"]]
        assert d == tb / v["name"]
        acc = _load(d)
        scalars = set(acc.Tags()["scalars"])
        if v["step_time_ms"] is None:
            assert not scalars & {"autoopt/step_time_ms", "autoopt/speedup"}
            continue
        expect = {
            "autoopt/step_time_ms": v["step_time_ms"]["median"],
            "autoopt/step_time_ms_p25": v["step_time_ms"]["p25"],
            "autoopt/step_time_ms_p75": v["step_time_ms"]["p75"],
            "autoopt/throughput_per_s": v["throughput_per_s"],
            "autoopt/peak_memory_mb": v["peak_memory_mb"],
            "autoopt/speedup": v["speedup"],
        }
        for tag, value in expect.items():
            events = acc.Scalars(tag)
            assert len(events) == 1 and events[0].step == 0
            assert events[0].value == pytest.approx(value, rel=1e-6)
        if v["max_rel_error"] is not None:
            assert acc.Scalars("autoopt/max_rel_error")[0].value == pytest.approx(v["max_rel_error"], rel=1e-6)
        else:
            assert "autoopt/max_rel_error" not in scalars


def test_summary_run_has_findings_table_breakdown_and_batch_curve(written):
    rep, _, dirs = written
    acc = _load(dirs["baseline"])
    tensors = set(acc.Tags()["tensors"])
    assert {"autoopt/summary", "autoopt/report", "autoopt/findings", "autoopt/variant"} <= tensors
    findings = _text(acc, "autoopt/findings")
    for f in rep["findings"]:
        assert f"{f['code']} {f['name']}" in findings and f["title"] in findings
    table = _text(acc, "autoopt/report")
    assert table.count("\n") == len(rep["variants"]) + 1  # header, rule, one line per variant
    summary = _text(acc, "autoopt/summary")
    assert R.speedup_text(rep) in summary
    assert R.fmt_tput(rep["final"]["baseline_remeasured"]["throughput_per_s"]) in summary
    assert rep["notes"][0].split(":")[0] in summary
    # text is a scalar string, so the text dashboard renders it as Markdown
    assert not acc.Tensors("autoopt/findings")[0].tensor_proto.tensor_shape.dim
    images = set(acc.Tags()["images"])
    assert {"autoopt/step_time_breakdown", "autoopt/step_time_breakdown_run"} <= images
    img = acc.Images("autoopt/step_time_breakdown")[0]
    assert img.width >= 400 and img.height >= 150 and img.encoded_image_string[:4] == b"\x89PNG"
    curve = acc.Scalars("autoopt/batch_search/throughput_per_s")
    ok = [b for b in rep["batch_search"] if b["throughput_per_s"] is not None]
    assert [(e.step, round(e.value, 1)) for e in curve] == [(b["batch_size"], round(b["throughput_per_s"], 1))
                                                           for b in ok]
    # other runs carry only their own text
    assert set(_load(dirs["AO101"]).Tags()["tensors"]) == {"autoopt/variant"}
    assert "autoopt/step_time_breakdown_run" in _load(dirs["final"]).Tags()["images"]


def test_hparams_session_per_variant_and_one_experiment(written):
    from tensorboard.plugins.hparams import metadata

    rep, _, dirs = written
    experiments = []
    for v in rep["variants"]:
        acc = _load(dirs[v["name"]])
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        ssi = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: (val.string_value or val.number_value) for k, val in ssi.hparams.items()}
        assert hp["variant"] == v["name"] and hp["status"] == v["status"]
        amp = next((t for t in v["transforms"] if t["name"] == "amp"), None)
        assert hp["transform.amp"] == ("off" if amp is None else ", ".join(f"{k}={x}" for k, x in amp["params"].items()))
        assert hp["transform.channels_last"] == ("on" if any(t["name"] == "channels_last" for t in v["transforms"])
                                                 else "off")
        if metadata.EXPERIMENT_TAG in content:
            experiments.append(v["name"])
            exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
            infos = {h.name: h for h in exp.hparam_infos}
            statuses = {x.string_value for x in infos["status"].domain_discrete.values}
            assert statuses == {"kept", "rejected", "failed", "skipped"}
            assert {m.name.tag for m in exp.metric_infos} == set(tbsummary.HPARAM_METRICS)
    assert experiments == ["baseline"]


def test_writing_again_replaces_summaries_and_leaves_traces_alone(rep, tmp_path):
    tb = tmp_path / "tb"
    trace = tb / "baseline" / "host.123.pt.trace.json.gz"
    trace.parent.mkdir(parents=True)
    trace.write_bytes(b"\x1f\x8b not really a trace, but it must stay byte for byte")
    other = tb / "baseline" / "events.out.tfevents.1.host.someone-else"
    other.write_bytes(b"")
    digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    tbsummary.write_summaries(rep, tb)
    tbsummary.write_summaries(rep, tb)
    assert hashlib.sha256(trace.read_bytes()).hexdigest() == digest and other.exists()
    for v in rep["variants"]:
        assert len(list((tb / v["name"]).glob("events.out.tfevents.*.autoopt"))) == 1
    assert len(_load(tb / "baseline").Scalars("autoopt/step_time_ms")) == 1


def test_run_names_stay_inside_the_log_dir(rep, tmp_path):
    rep["variants"] = [dict(rep["variants"][1], name="../../escape", logdir="/etc"),
                       dict(rep["variants"][3], name="a/b c", logdir=None),
                       dict(rep["variants"][3], name="..", logdir=None)]
    tb = tmp_path / "tb"
    dirs = tbsummary.write_summaries(rep, tb)
    for d in dirs.values():
        assert d.resolve().parent == tb.resolve()
    assert sorted(p.name for p in tb.iterdir()) == sorted(d.name for d in dirs.values())
    assert not (tmp_path / "escape").exists()


def test_a_report_without_variants_still_gets_a_summary(tmp_path):
    rep = {"model": "broken", "variants": None, "findings": [], "final": None}
    dirs = tbsummary.write_summaries(rep, tmp_path / "tb")
    assert list(dirs) == ["autoopt"]
    acc = _load(dirs["autoopt"])
    assert "no final measurement" in _text(acc, "autoopt/summary")
    assert _text(acc, "autoopt/findings") == "No rule fired."


# --------------------------------------------------------------------------------------
# autoopt view


def test_resolve_logdir(tmp_path):
    report = tmp_path / "simplenet-20250101-000000"
    (report / "tb" / "baseline").mkdir(parents=True)
    (report / "tb" / "baseline" / "host.1.pt.trace.json.gz").write_bytes(b"")
    assert view.resolve_logdir(report) == (report / "tb").resolve()
    assert view.resolve_logdir(report / "tb") == (report / "tb").resolve()
    plain = tmp_path / "runs"
    (plain / "exp1").mkdir(parents=True)
    (plain / "exp1" / "events.out.tfevents.1.host").write_bytes(b"")
    assert view.resolve_logdir(plain) == plain.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no TensorBoard runs"):
        view.resolve_logdir(empty)
    with pytest.raises(UserError, match="no such directory"):
        view.resolve_logdir(tmp_path / "missing")
    f = report / "report.json"
    f.write_text("{}")
    with pytest.raises(UserError, match="is a file"):
        view.resolve_logdir(f)


@pytest.fixture
def logdir(tmp_path):
    d = tmp_path / "tb" / "baseline"
    d.mkdir(parents=True)
    (d / "host.1.pt.trace.json.gz").write_bytes(b"")
    return tmp_path / "tb"


def test_missing_tensorboard_says_what_to_install(logdir, monkeypatch):
    monkeypatch.setattr(view, "tensorboard_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install .*tensorboard"):
        view.start_tensorboard(logdir)


def test_view_binds_to_loopback_only(logdir):
    with pytest.raises(UserError, match="loopback"):
        view.start_tensorboard(logdir, host="0.0.0.0")


def test_view_refuses_a_taken_port(logdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(UserError, match="already in use"):
            view.start_tensorboard(logdir, port=s.getsockname()[1])


def test_tensorboard_that_dies_at_start_is_a_user_error(logdir, monkeypatch, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: tensorboard is broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(view.sys, "executable", str(fake))
    with pytest.raises(UserError, match=r"exited at start \(exit code 3\).*tensorboard is broken"):
        view.start_tensorboard(logdir, timeout_s=20)


def test_stop_ends_the_process_by_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    assert view.stop(proc, timeout_s=10) is not None
    assert proc.poll() is not None


@pytest.mark.slow
def test_start_and_stop_a_real_tensorboard(logdir):
    proc, url = view.start_tensorboard(logdir)
    try:
        assert url.startswith("http://127.0.0.1:")
        import urllib.request

        with urllib.request.urlopen(url + "data/logdir", timeout=10) as r:
            assert json.loads(r.read())["logdir"] == str(logdir.resolve())
    finally:
        view.stop(proc)
    assert proc.poll() is not None
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def test_gradient_health_goes_to_the_summary_run(rep, tmp_path):
    rep["health"] = {
        "steps": 3, "loss": [2.0, 1.5, None], "grad_norm": [1.0, 4.0, 16.0],
        "layers": [{"name": "embed", "grad_norm": 1e-9, "grad_norm_last": 1e-9, "grad_norm_max": 1e-9,
                    "update_ratio": 1e-7, "nonfinite": 0},
                   {"name": "head|out", "grad_norm": 3.0, "grad_norm_last": 5.0, "grad_norm_max": 5.0,
                    "update_ratio": None, "nonfinite": 2}],
        "nonfinite_grads": 2, "first_nonfinite": {"step": 3, "layer": "head|out"}, "update_ratio": 1e-3,
        "lr": 0.1, "fp16": False, "grad_scaler": {"scale": [65536.0, 32768.0, 32768.0], "skipped_steps": 1},
        "thresholds": {"vanishing_fraction": 1e-6, "exploding_norm": 1e3}}
    dirs = tbsummary.write_summaries(rep, tmp_path / "tb")
    acc = _load(dirs["baseline"])
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
           if tag.startswith("autoopt/health/")}
    assert got["autoopt/health/loss"] == [(1, 2.0), (2, 1.5)]  # an inf/NaN loss (null) is left out
    assert got["autoopt/health/grad_norm"] == [(1, 1.0), (2, 4.0), (3, 16.0)]
    assert got["autoopt/health/grad_scale"] == [(1, 65536.0), (2, 32768.0), (3, 32768.0)]
    assert [s for s, _ in got["autoopt/health/layer_grad_norm"]] == [0, 1]  # the depth, input side first
    assert got["autoopt/health/layer_grad_norm"][0][1] == pytest.approx(1e-9)
    table = _text(acc, "autoopt/health")
    assert "| 0 | embed |" in table and "head\\|out" in table and "| 2 |" in table
    # a report without health writes none of it
    del rep["health"]
    acc = _load(tbsummary.write_summaries(rep, tmp_path / "tb2")["baseline"])
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("autoopt/health/")]
