"""The command line as a user meets it: exit codes, one-paragraph errors, pure JSON on stdout."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"
TRACES = ROOT / "tests" / "data" / "traces" / "real"

MALFORMED = sorted(
    p for p in MODELS.iterdir() if p.name.startswith("bad_")
) + [MODELS / "does_not_exist.py"]


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.name)
def test_malformed_model_files_exit_2_with_one_paragraph(path, capsys):
    t0 = time.perf_counter()
    rc = main(["profile", str(path), "--quick" if False else "--steps", "1", "--quiet"])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert path.name in err or path.stem in err
    text = " ".join(err.split())
    assert text.startswith("error:")
    assert elapsed < 60


def test_debug_adds_the_traceback(capsys):
    rc = main(["--debug", "profile", str(MODELS / "bad_import.py"), "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" in err and "error:" in err


def test_usage_error_exits_2(capsys):
    assert main(["optimize", "--search", "sideways"]) == 2
    assert main([]) == 2


def test_rules_and_explain(capsys):
    assert main(["rules", "--json"]) == 0
    rules = json.loads(capsys.readouterr().out)["rules"]
    assert len(rules) >= 20
    assert {r["code"][:3] for r in rules} >= {f"AO{i}" for i in range(1, 10)}
    for r in rules:
        assert set(r) >= {"code", "name", "title", "transform", "safety"}
    assert main(["explain", rules[0]["code"]]) == 0
    doc = capsys.readouterr().out
    for section in ("What it does", "Why is this bad?", "Example", "Use instead", "Fix safety"):
        assert section in doc
    assert main(["explain", "AO999"]) == 2


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "torch_version" in json.dumps(info) or "torch" in info


def test_analyze_json_is_pure_json_and_matches_tb_profiler(capsys):
    trace = TRACES / "kineto" / "resnet50_v100_num_workers_0.pt.trace.json.gz"
    assert main(["analyze", str(trace), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    t = doc["traces"][0]
    assert abs(t["gpu_utilization"] * 100 - 55.51) < 0.5
    codes = {f["code"] for f in doc["findings"]}
    assert any(c.startswith("AO5") for c in codes), codes


def test_analyze_garbage_exits_2(tmp_path, capsys):
    bad = tmp_path / "trace.json.gz"
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    assert main(["analyze", str(bad)]) == 2
    _, err = capsys.readouterr()
    assert "trace.json.gz" in err and "Traceback" not in err


def test_analyze_does_not_import_torch():
    code = (
        "import sys, autoopt.cli as c; rc = c.main(['analyze', sys.argv[1], '--json']);"
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    trace = TRACES / "hta" / "cpu_only.pt.trace.json.gz"
    r = subprocess.run([sys.executable, "-c", code, str(trace)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
