"""Names from traces, models and file names never act on the terminal, never break a Markdown
table and never become markup: autoopt.safe on its own (each hostile class of
character), then end to end: `autoopt analyze` of a trace whose kernel, operator, device and
file names carry escape sequences, its error path, the optimize summary table, the prompt and
the progress line, report.md and report.html."""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from autoopt.output import report as R
from autoopt import safe as S

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "report_sample.json"

CLEAR = "\x1b[2J"  # CSI: clear the screen
TITLE = "\x1b]0;owned\x07"  # OSC 0: the window title
CLIP = "\x1b]52;c;cm0gLXJmIH4=\x07"  # OSC 52: write the clipboard
HOSTILE = CLEAR + TITLE + CLIP + "\rFAKE\x08\x08\u202eevil|x\nforged [bold]b[/bold] [/x] <b>t</b>`#"
# in text for people nothing of these may remain raw: C0 (newline and tab aside), DEL, C1,
# bidi controls and marks, line/paragraph separators, lone surrogates
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
RAW_IN_LINE = re.compile(RAW.pattern[:-1] + "\n\t]")


def _raw(text: str) -> list[str]:
    return sorted(set(RAW.findall(text)))


# --------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("bad,shown", [
    ("\x1b", "\\x1b"), ("\x07", "\\x07"), ("\x00", "\\x00"), ("\r", "\\r"), ("\x08", "\\x08"),
    ("\n", "\\n"), ("\t", "\\t"), ("\x0b", "\\x0b"), ("\x7f", "\\x7f"), ("\x9b", "\\x9b"), ("\x85", "\\x85"),
    ("\u202e", "\\u202e"), ("\u202a", "\\u202a"), ("\u2066", "\\u2066"), ("\u2069", "\\u2069"),
    ("\u200f", "\\u200f"), ("\u061c", "\\u061c"), ("\u2028", "\\u2028"), ("\ud800", "\\ud800"),
])
def test_for_terminal_shows_each_control_as_a_visible_escape(bad, shown):
    out = S.for_terminal(f"a{bad}b")
    assert out == f"a{shown}b"
    assert not RAW_IN_LINE.search(out)
    out.encode("utf-8")  # a lone surrogate would fail the write


def test_for_terminal_sequences_and_plain_text():
    out = S.for_terminal(HOSTILE)
    assert not RAW_IN_LINE.search(out)
    for seq in ("\\x1b[2J", "\\x1b]0;owned\\x07", "\\x1b]52;c;cm0gLXJmIH4=\\x07", "\\rFAKE\\x08\\x08", "\\u202e"):
        assert seq in out
    plain = "aten::conv2d · sm_90 × Ä 日本 C:\\path\\k.json void at::native::f<float>(x[3])"
    assert S.for_terminal(plain) == plain
    assert S.for_terminal(out) == out  # idempotent: a second pass changes nothing
    assert S.for_terminal(3) == "3"


def test_terminal_text_keeps_the_layout_of_a_block():
    out = S.terminal_text("line1\n\tline2\r\nline3" + CLEAR + "\r\x9b")
    assert out == "line1\n\tline2\nline3\\x1b[2J\\r\\x9b"
    assert _raw(out) == []


def test_for_rich_is_shown_verbatim_by_rich_with_markup_on():
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=400, color_system=None).print(f"[bold]x[/bold] {S.for_rich(HOSTILE)}")
    text = buf.getvalue()
    assert _raw(text) == []
    assert "forged [bold]b[/bold] [/x]" in text  # the name's tags are shown, not applied (nor a MarkupError)


def test_for_markdown_is_one_inert_line():
    out = S.for_markdown("# title|a`b`\n<script>x</script>" + CLEAR + "\u202e")
    assert "\n" not in out and not RAW_IN_LINE.search(out)
    assert out.startswith("\\#") and "\\|" in out and "\\`b\\`" in out and "\\<script>" in out
    assert "\\\\x1b\\[2J" in out and "\\\\u202e" in out  # rendered: \x1b[2J, \u202e
    code = S.markdown_code("a|b`c" + CLEAR + "\nd")
    assert not RAW_IN_LINE.search(code) and code == "``a\\|b`c\\x1b[2J d``"


def test_printable_drops_controls_and_bidi_for_xml():
    assert S.printable("a\x1b\u202eb\nc\r\nd\re") == "a\ufffd\ufffdb\nc\nd\ufffde"


# --------------------------------------------------------------------------------------
# autoopt analyze, end to end


def _hostile_trace(tmp_path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "tests" / "data" / "traces" /
                                                  "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.pt2_trace()
    doc["deviceProperties"][0]["name"] = "V100" + HOSTILE
    for e in doc["traceEvents"]:
        if e.get("name") in ("volta_sgemm_128x64_nn", "aten::mm", "aten::item"):
            e["name"] = e["name"] + HOSTILE
    name = "run" + CLEAR + TITLE + "\u202e|x\nnext\r.json"
    try:
        path = tmp_path / name
        path.write_text(json.dumps(doc))
    except OSError:  # a file system that refuses such names: the names inside the trace still count
        path = tmp_path / "run.json"
        path.write_text(json.dumps(doc))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, encoding="utf-8",
                          errors="surrogateescape", timeout=120, env=env, cwd=str(ROOT))


@pytest.mark.parametrize("entry", [["-m", "autoopt", "analyze"], ["-m", "autoopt.analyze"]],
                         ids=["autoopt", "autoopt.analyze"])
def test_analyze_prints_hostile_names_as_escapes(tmp_path, entry):
    trace = _hostile_trace(tmp_path)
    r = _run(*entry, str(trace))
    assert r.returncode == 0, r.stderr
    assert _raw(r.stdout) == [] and _raw(r.stderr) == []
    lines = r.stdout.splitlines()
    assert "rank 0" in lines[0] and "\\x1b[2J" in lines[0] and "(sm 7.0)" in lines[0]  # one header line
    # no name starts a line of its own: each escaped newline stays inside its name's line
    assert not [ln for ln in lines if ln.startswith(("FAKE", "forged", "next"))]
    for name in ("volta_sgemm_128x64_nn", "aten::mm", "aten::item"):
        shown = [ln for ln in lines if name + "\\x1b[2J" in ln]
        assert shown, name
    assert "sync: aten::item\\x1b[2J" in r.stdout and "x1" in r.stdout.split("sync: ")[1].splitlines()[0]


def test_analyze_json_stays_json(tmp_path):
    r = _run("-m", "autoopt", "analyze", str(_hostile_trace(tmp_path)), "--json")
    assert r.returncode == 0, r.stderr
    assert _raw(r.stdout) == []  # json's own \u escapes
    result = json.loads(r.stdout)
    assert result["traces"][0]["device"]["name"] == "V100" + HOSTILE  # the data itself is unchanged


def test_an_error_naming_a_hostile_file_is_one_inert_paragraph(tmp_path, capsys):
    from autoopt.cli import main

    missing = str(tmp_path / ("gone" + CLEAR + CLIP + "[bold]x[/bold].json"))
    assert main(["analyze", missing]) == 2
    err = capsys.readouterr().err
    assert _raw(err) == [] and err.count("\n") == 1
    assert err.startswith("error: ") and "gone\\x1b[2J\\x1b]52;c;" in err and "[bold]x[/bold].json" in err


# --------------------------------------------------------------------------------------
# optimize's terminal output: the table, the prompt, the progress line


@pytest.fixture
def hostile_report() -> dict:
    rep = json.loads(SAMPLE.read_text())
    rep["model"] += HOSTILE
    rep["device"]["name"] += HOSTILE
    for v in rep["variants"]:
        v["name"] += HOSTILE
        v["reason"] = (v.get("reason") or "") + HOSTILE
    for f in rep["findings"]:
        f["title"] += HOSTILE
        f["message"] += HOSTILE
    rep["artifacts"] = {k: v + HOSTILE for k, v in rep["artifacts"].items()}
    return rep


def test_final_table_rows_are_terminal_safe(hostile_report):
    rows = R.final_table_rows(hostile_report)
    assert all(not RAW_IN_LINE.search(c) for r in rows for c in r)
    assert [r[0] for r in rows[1:] if r[0].startswith("AO101\\x1b[2J")]


def test_optimize_summary_prints_no_raw_control(hostile_report, capsys):
    from autoopt import cli

    cli._print_optimize_summary(hostile_report)
    out = capsys.readouterr().out
    assert _raw(out) == []
    assert "baseline\\x1b[2J" in out and "[bold]b[/bold]" in out


def test_the_prompt_shows_names_inert_and_its_choices(monkeypatch):
    from rich.console import Console

    from autoopt import cli

    buf = io.StringIO()
    console = Console(file=buf, width=400, color_system=None)
    f = SimpleNamespace(code="AO101", title="t" + HOSTILE, message="m" + HOSTILE, expected_speedup=1.5,
                        safety="safe")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert cli._ask(console, f, SimpleNamespace(summary="s" + HOSTILE)) is True
    text = buf.getvalue()
    assert _raw(text) == []
    assert "forged [bold]b[/bold] [/x]" in text and "[y/n]" in text


def test_the_progress_status_line_takes_names_as_text():
    from rich.console import Console

    from autoopt import cli

    view = cli.ProgressView(enabled=True)
    view.console = Console(file=io.StringIO(), force_terminal=True, width=200)
    try:
        view("trial", "measuring " + HOSTILE)  # a "[/x]" read as markup would raise here
        view("trial", "again " + HOSTILE)
    finally:
        view.stop()
    assert CLEAR not in view.console.file.getvalue() and CLIP not in view.console.file.getvalue()


# --------------------------------------------------------------------------------------
# report.md and report.html


def _md_tables(md: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_report_markdown_has_no_raw_control_and_whole_tables(hostile_report):
    rep = copy.deepcopy(hostile_report)
    rep["patch"] += "+x = 1" + CLEAR + "\r\n"
    md = R.render_markdown(rep)
    assert _raw(md) == []
    tables = _md_tables(md)
    assert tables and all(len({len(r) for r in t}) == 1 for t in tables)
    variants = next(t for t in tables if t[0][0] == "Variant")
    assert len(variants) == 2 + len(rep["variants"])
    assert "\\x1b[2J" in md


def test_report_html_escapes_names_and_drops_controls(hostile_report):
    from autoopt.output.html import environment

    assert environment().autoescape is True
    page = R.render_html(hostile_report)
    assert "<b>t</b>" not in page and "&lt;b&gt;t&lt;/b&gt;" in page
    assert _raw(page) == []
