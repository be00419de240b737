"""report.md, report.html and the terminal rows, from tests/data/report_sample.json (a
hand-written report of a CPU training run in the exact report.json layout) and from
variants of it: a failed run, a GPU run with kernels, hostile names, an empty report."""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from autoopt.output import report as R

SAMPLE = Path(__file__).resolve().parent / "data" / "report_sample.json"
EVIL = '<img src=x onerror=alert(1)><script>alert(2)</script>"\'&amp;|`*[x](javascript:alert(3))'


@pytest.fixture
def rep() -> dict:
    return json.loads(SAMPLE.read_text())


class _Doc(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html_text: str) -> _Doc:
    d = _Doc()
    d.feed(html_text)
    d.close()
    return d


def _poison(x, payload=EVIL):
    """Every string in a report, and every evidence key, with the payload appended."""
    if isinstance(x, str):
        return x + payload
    if isinstance(x, dict):
        return {(k + payload if k.startswith(("device.", "model.", "workload.", "metrics.")) else k):
                _poison(v, payload) for k, v in x.items()}
    if isinstance(x, list):
        return [_poison(v, payload) for v in x]
    return x


# --------------------------------------------------------------------------------------
# speedup spread


def test_speedup_interval_pairs_opposite_quartiles(rep):
    base = rep["baseline"]["step_time_ms"]
    for v in rep["variants"]:
        if v["speedup"] is None or v["name"] == "baseline":  # the reference has no interval of its own
            assert R.speedup_interval(rep, v) is None
            continue
        lo, hi = R.speedup_interval(rep, v)
        st = v["step_time_ms"]
        if v["name"] == "final":
            assert (lo, hi) == (rep["final"]["speedup_low"], rep["final"]["speedup_high"])
        else:
            assert lo == pytest.approx(v["speedup"] * (base["p25"] / base["median"]) / (st["p75"] / st["median"]))
            assert hi == pytest.approx(v["speedup"] * (base["p75"] / base["median"]) / (st["p25"] / st["median"]))
        assert lo <= v["speedup"] <= hi


def test_final_speedup_spread_is_derived_when_the_report_lacks_it(rep):
    del rep["final"]["speedup_low"], rep["final"]["speedup_high"]
    s, lo, hi = R.final_speedup(rep)
    fin = rep["final"]["step_time_ms"]
    base = rep["baseline"]["step_time_ms"]
    assert s == rep["final"]["speedup"]
    assert lo == pytest.approx(s * (base["p25"] / base["median"]) / (fin["p75"] / fin["median"]))
    assert lo < s < hi


# --------------------------------------------------------------------------------------
# terminal rows


def test_final_table_rows_one_per_variant_with_measured_values(rep):
    rows = R.final_table_rows(rep)
    assert rows[0] == R.FINAL_TABLE_HEADER
    assert [r[0] for r in rows[1:]] == [v["name"] for v in rep["variants"]]
    assert all(len(r) == len(rows[0]) and all(isinstance(c, str) for c in r) for r in rows)
    by = {r[0]: r for r in rows[1:]}
    for v in rep["variants"]:
        r = by[v["name"]]
        assert r[1] == v["status"]
        if v["step_time_ms"]:
            assert float(r[2]) == pytest.approx(v["step_time_ms"]["median"], abs=0.01)
            assert float(r[7].lstrip("≈").split("×")[0]) == pytest.approx(v["speedup"], abs=0.006)
        else:
            assert r[2] == r[7] == "—"
    lo, hi = rep["final"]["speedup_low"], rep["final"]["speedup_high"]
    assert f"({lo:.2f}–{hi:.2f})" in by["final"][7]
    # the final row is measured beside the baseline re-measured with it
    assert float(by["final"][4]) == pytest.approx(rep["final"]["baseline_remeasured"]["step_time_ms"]["median"],
                                                  abs=0.01)
    assert by["AO102"][9].startswith("3.1e-01")


def test_final_table_rows_adds_the_baseline_when_no_variant_is_named_so(rep):
    rep["variants"] = [v for v in rep["variants"] if v["name"] != "baseline"]
    rows = R.final_table_rows(rep)
    assert rows[1][0] == "baseline" and rows[1][7] == "1.00×"
    assert float(rows[1][2]) == pytest.approx(rep["baseline"]["step_time_ms"]["median"], abs=0.01)


# --------------------------------------------------------------------------------------
# Markdown


def _md_tables(md: str) -> list[list[list[str]]]:
    """Markdown tables as rows of cells (split on unescaped pipes)."""
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def test_markdown_has_every_section_and_measurement(rep, tmp_path):
    path = R.write_markdown(rep, tmp_path / "report.md")
    md = path.read_text()
    for h in ("# autoopt report: simplenet", "## Result", "## Baseline", "## Variants", "## Final configuration",
              "## Batch-size search", "## Step-time breakdown", "## Findings", "## Patch"):
        assert h in md
    assert R.speedup_text(rep) in md
    variants_table = next(t for t in _md_tables(md) if t[0][0] == "Variant")
    assert len(variants_table) == 2 + len(rep["variants"])
    for row, v in zip(variants_table[2:], rep["variants"]):
        assert len(row) == len(variants_table[0])
        assert row[0] == f"`{v['name']}`"
        assert row[3] == f"**{v['status']}**"
        if v["step_time_ms"]:
            assert row[4] == R.fmt_ms(v["step_time_ms"]["median"])
            assert row[5] == R.spread_text(v["step_time_ms"])
    for f in rep["findings"]:
        assert f"### {f['code']} {f['name']}" in md
    # the patch, verbatim, in a diff fence
    fence = re.search(r"```diff\n(.*?)\n```", md, re.S)
    assert fence and fence.group(1) == rep["patch"].rstrip("\n")


def test_markdown_keeps_hostile_text_inert(rep, tmp_path):
    from markdown_it import MarkdownIt

    rep = _poison(rep, "|<b>x</b>`|*y*")
    rep["patch"] = "```\n+ evil <b>\n````\n"
    md = R.render_markdown(rep)
    # rendered as GitHub does (raw HTML allowed, tables on): no tag from the data survives,
    # the payload shows as text, and every table row keeps its columns despite the pipes
    html_out = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    doc = _parse(html_out)
    assert not [t for t, _ in doc.tags if t in ("b", "em")]
    assert "|<b>x</b>`|*y*" in "".join(doc.text)
    variants_html = html_out.split("<h2>Variants</h2>")[1].split("</table>")[0]
    rows = variants_html.split("<tr>")[1:]
    assert len(rows) == 1 + len(rep["variants"])
    assert len({r.count("<td") + r.count("<th") for r in rows}) == 1
    # a fence longer than any backtick run in the patch keeps the patch verbatim
    assert "`````diff\n```\n+ evil <b>\n````\n`````" in md


def test_md_code_and_md_text():
    assert R.md_code("a`b") == "``a`b``"
    assert R.md_code("x|y") == "`x\\|y`"
    assert R.md_text("a <= b -> c") == "a <= b -> c"
    assert R.md_text("<script>") == "\\<script>"
    assert R.md_text("> quote") == "\\> quote"
    assert R.md_text("line1\nline2") == "line1 line2"


# --------------------------------------------------------------------------------------
# HTML


def test_html_is_self_contained(rep, tmp_path):
    page = R.write_html(rep, tmp_path / "report.html").read_text()
    doc = _parse(page)
    tags = [t for t, _ in doc.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags and "img" not in tags
    for _, attrs in doc.tags:
        for k, v in attrs.items():
            assert not (k in ("src", "href", "action", "data", "srcset") and v and re.match(r"\s*(https?:|//)", v))
    assert "@import" not in page and "url(" not in page
    csp = next(a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp


def test_html_has_summary_tables_plots_findings_and_patch(rep):
    page = R.render_html(rep)
    doc = _parse(page)
    text = " ".join(doc.text)
    assert rep["device"]["name"] in text and rep["model"] in text
    s, lo, hi = rep["final"]["speedup"], rep["final"]["speedup_low"], rep["final"]["speedup_high"]
    assert R.fmt_x(s) in text and f"spread {R.fmt_x(lo)}–{R.fmt_x(hi)}" in text
    plots = [a["data-plot"] for t, a in doc.tags if t == "svg"]
    assert plots == ["breakdown", "speedup", "batch_search", "top_baseline", "top_final"]
    rows = re.findall(r"<tr><td><code>([^<]*)</code></td>", page.split('<table class="variants">')[1].split("</table>")[0])
    assert rows == [v["name"] for v in rep["variants"]]
    for f in rep["findings"]:
        assert f'id="finding-{f["code"]}"' in page and f["title"] in text
    # each rule's Markdown rendered: headings (demoted below the finding's h3) and code blocks
    assert page.count("<h4>What it does</h4>") == len(rep["findings"])
    assert '<code class="language-python">' in page
    # the patch, line by line, coloured by kind
    spans = re.findall(r'<span class="(add|del|hunk|file|ctx)">', page.split('<pre class="diff">')[1])
    kinds = []
    for line in rep["patch"].splitlines():
        kinds.append("file" if line.startswith(("+++", "---")) else "hunk" if line.startswith("@@")
                     else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
    assert spans == kinds


def test_html_speedup_plot_has_one_bar_and_error_bar_per_measured_variant(rep):
    page = R.render_html(rep)
    svg = re.search(r'<svg[^>]*data-plot="speedup".*?</svg>', page, re.S).group(0)
    measured = [v for v in rep["variants"] if v["speedup"] is not None]
    assert svg.count('class="bar"') == len(measured)
    assert svg.count('class="errbar"') == len([v for v in measured if v["name"] != "baseline"])
    for v in measured:
        assert f"{R.esc(v['name'])} ({v['status']}): {v['speedup']:.2f}×" in svg
    assert 'class="ref"' in svg  # the 1.0x line


def test_html_batch_search_plot_marks_points_and_misses(rep):
    svg = re.search(r'<svg[^>]*data-plot="batch_search".*?</svg>', R.render_html(rep), re.S).group(0)
    ok = [b for b in rep["batch_search"] if b["throughput_per_s"] is not None]
    # one group per point (class "pt", or "pt hl"), each holding matplotlib's marker <use>
    assert len(re.findall(r'<g class="pt(?: hl)?">', svg)) == len(ok)
    assert svg.count('class="miss"') == len(rep["batch_search"]) - len(ok)
    assert svg.count('class="pt hl"') == 1  # the batch size AO401 proposes
    ys = [float(y) for y in re.findall(r'<g class="pt[^"]*">.*?<use [^>]*\by="([^"]+)"', svg, re.S)]
    assert len(ys) == len(ok)
    tputs = [b["throughput_per_s"] for b in ok]
    # higher throughput is drawn higher (smaller y)
    assert sorted(range(len(ys)), key=lambda i: ys[i]) == sorted(range(len(tputs)), key=lambda i: -tputs[i])


def test_html_escapes_every_untrusted_string(rep):
    bad = _poison(rep)
    bad["findings"][0]["doc"] += "\n\n<div onclick=x>raw</div>\n\n[link](javascript:alert(1))\n"
    page = R.render_html(bad)
    doc = _parse(page)
    tags = [t for t, _ in doc.tags]
    assert "img" not in tags and "script" not in tags and "div" in tags
    for t, attrs in doc.tags:
        assert not any(k.startswith("on") for k in attrs), (t, attrs)
        assert not any(isinstance(v, str) and "javascript:" in v for v in attrs.values()), (t, attrs)
    text = "".join(doc.text)
    assert rep["model"] + EVIL in text  # shown literally
    assert "<script>alert(2)</script>" in text


def test_html_of_a_gpu_run_plots_kernels(rep):
    rep["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                     "total_memory_mb": 81559.0}
    kernels = [{"name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1",
                "calls": 48, "total_ms": 12.5},
               {"name": "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl<>(at::TensorIteratorBase&)>",
                "calls": 96, "total_ms": 3.25}]
    rep["analysis"]["baseline"]["top_kernels"] = kernels
    page = R.render_html(rep)
    svg = re.search(r'<svg[^>]*data-plot="top_baseline".*?</svg>', page, re.S).group(0)
    assert "Top kernels, baseline" in svg and "Top operators" not in svg
    assert svg.count('class="bar"') == 2
    assert R.esc(kernels[1]["name"]) in svg  # full name in the tooltip, escaped
    assert "H100" in page and "sm 9.0" in page
    # the final run had no kernels: its plot shows operators
    assert "Top operators, final" in page


def test_html_and_markdown_of_a_failed_run(rep, tmp_path):
    rep["final"] = None
    rep["analysis"] = None
    rep["batch_search"] = None
    rep["patch"] = None
    rep["search"] = None
    for v in rep["variants"][1:]:
        v.update(status="failed", step_time_ms=None, speedup=None, throughput_per_s=None,
                 reason="RuntimeError: CUDA error: an illegal memory access was encountered")
    page = R.render_html(rep)
    text = " ".join(_parse(page).text)
    assert "not measured" in text and "No patch" in text
    assert [a["data-plot"] for t, a in _parse(page).tags if t == "svg"] == ["speedup"]
    md = R.render_markdown(rep)
    assert "No final configuration was measured" in md and "No patch" in md
    assert "illegal memory access" in md


@pytest.mark.parametrize("report", [{}, {"model": "m", "variants": None, "findings": None, "device": None},
                                    {"variants": [{}], "findings": [{}], "baseline": {"step_time_ms": {}}}])
def test_minimal_reports_render(report, tmp_path):
    R.write_markdown(report, tmp_path / "r.md")
    R.write_html(report, tmp_path / "r.html")
    assert "Nothing to plot" in (tmp_path / "r.html").read_text()
    assert R.final_table_rows(report)[0] == R.FINAL_TABLE_HEADER


def test_non_finite_numbers_render_as_dashes(rep):
    rep["variants"][1]["max_rel_error"] = float("nan")
    rep["variants"][1]["speedup"] = float("inf")
    rows = {r[0]: r for r in R.final_table_rows(rep)}
    assert rows["AO101"][7] == "—" and rows["AO101"][9] == "—"
    row = R.render_html(rep).split("<tr><td><code>AO101</code></td>")[1].split("</tr>")[0]
    assert "nan" not in row and "inf" not in row


def test_a_plot_matplotlib_cannot_draw_is_a_note_not_a_failure(rep, monkeypatch):
    from autoopt.output import plots

    real = plots.svg_markup

    def fail_speedup(plot, kind, label):
        if kind == "speedup":
            raise ValueError("Axis limits cannot be NaN or Inf")
        return real(plot, kind, label)

    monkeypatch.setattr(plots, "svg_markup", fail_speedup)
    page = R.render_html(rep)
    assert [a["data-plot"] for t, a in _parse(page).tags if t == "svg"] == [
        "breakdown", "batch_search", "top_baseline", "top_final"]
    assert "The speedup plot could not be drawn: ValueError: Axis limits cannot be NaN or Inf" in page
    assert 'id="patch"' in page


def test_doc_markdown_renders_safely():
    out = R.render_doc_markdown("## Why\n\nUse `x`.\n\n<b>raw</b>\n\n[ok](https://pytorch.org) [bad](javascript:x)\n")
    assert "<h4>Why</h4>" in out and "<code>x</code>" in out
    assert "&lt;b&gt;raw&lt;/b&gt;" in out
    assert 'href="https://pytorch.org"' in out and "javascript:" not in out.split("[bad]")[0].split("href")[-1]
    assert 'href="javascript' not in out


def test_report_dicts_are_not_modified(rep):
    before = copy.deepcopy(rep)
    R.render_html(rep)
    R.render_markdown(rep)
    R.final_table_rows(rep)
    assert rep == before


def test_top_entries_reads_both_operator_layouts(rep):
    a = rep["analysis"]["baseline"]
    kind, top = R.top_entries(a)
    assert kind == "operators"
    by_self = sorted(a["top_operators"], key=lambda o: -o["host_self_ms"])
    assert [(n, ms) for n, ms, _ in top] == [(o["name"], o["host_self_ms"]) for o in by_self]
    legacy = {"top_operators": [{"name": o["name"], "calls": o["calls"], "self_ms": o["host_self_ms"],
                                 "total_ms": o["host_total_ms"]} for o in a["top_operators"]]}
    assert R.top_entries(legacy) == (kind, top)
    gpu = {"device": {"type": "cuda"}, "top_kernels": [],
           "top_operators": [{"name": "aten::mm", "calls": 2, "host_self_ms": 0.5, "device_self_ms": 7.0},
                             {"name": "aten::copy_", "calls": 9, "host_self_ms": 3.0, "device_self_ms": 0.0}]}
    assert R.top_entries(gpu)[1] == [("aten::mm", 7.0, 2), ("aten::copy_", 3.0, 9)]


def _distributed(rep: dict) -> dict:
    """The sample as the distributed path writes it (autoopt.distributed.launch): two ranks."""
    rep.update(distributed=True, nproc=2, world_size=2, backend="gloo", batch_size=16, global_batch_size=32,
               ddp_snippet='torch.distributed.init_process_group("nccl")\n```\nmodel = DistributedDataParallel(model)\n')
    rep["per_rank"] = [
        {"rank": 0, "host": "node-a", "measured_step_time_ms": 2.857, "busy_ms_per_step": 0.7526,
         "collective_wait_ms_per_step": 0.4218},
        {"rank": 1, "host": "node-b", "measured_step_time_ms": 2.6922, "busy_ms_per_step": 0.5409,
         "collective_wait_ms_per_step": None},
    ]
    return rep


def test_distributed_section_in_markdown_and_html(rep):
    assert "Distributed (DDP)" not in R.render_markdown(rep) + R.render_html(rep)
    rep = _distributed(rep)
    md = R.render_markdown(rep)
    assert "## Distributed (DDP)" in md
    assert "2 processes per node, backend gloo, world size 2, per-rank batch 16 (global 32)" in md
    ranks = next(t for t in _md_tables(md) if t[0][0] == "Rank")
    assert ranks[2:] == [["0", "node-a", "2.86", "0.753", "0.422"], ["1", "node-b", "2.69", "0.541", "—"]]
    # the snippet verbatim, in a fence longer than its own backticks
    assert "````python\n" + rep["ddp_snippet"].rstrip("\n") + "\n````" in md
    page = R.render_html(rep)
    section = page.split('<section id="distributed">')[1].split("</section>")[0]
    text = " ".join(_parse(section).text)
    assert "Distributed (DDP)" in text and "world size 2" in text and "global 32" in text
    rows = re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1], re.S)
    assert [re.findall(r"<td[^>]*>(?:<code>)?([^<]*)", r) for r in rows] == [
        ["0", "node-a", "2.86", "0.753", "0.422"], ["1", "node-b", "2.69", "0.541", "—"]]
    assert rep["ddp_snippet"].rstrip("\n") in "".join(_parse(section).text)  # verbatim, escaped
    assert R.esc(rep["ddp_snippet"].rstrip("\n")) in section


def test_distributed_section_keeps_hostile_hosts_inert(rep):
    rep = _distributed(_poison(rep))
    rep["per_rank"][0]["host"] += EVIL
    rep["ddp_snippet"] += EVIL
    md = R.render_markdown(rep)
    html_out = _github_html(md)
    assert not [t for t, _ in _parse(html_out).tags if t in ("img", "script")]
    page = R.render_html(rep)
    doc = _parse(page)
    assert "img" not in [t for t, _ in doc.tags] and "script" not in [t for t, _ in doc.tags]
    assert "node-a" + EVIL in "".join(doc.text)
    rep["per_rank"] = [None, "x", {"rank": {"a": 1}}]
    rep["nproc"] = None
    assert "## Distributed (DDP)" in R.render_markdown(rep) and 'id="distributed"' in R.render_html(rep)


def _github_html(md: str) -> str:
    """Markdown rendered as GitHub does: raw HTML allowed, tables on."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(md)


def test_summary_compares_with_the_side_by_side_baseline(rep):
    before, after = R.before_after(rep)
    assert before is rep["final"]["baseline_remeasured"] and after is rep["final"]
    assert after["throughput_per_s"] / before["throughput_per_s"] == pytest.approx(rep["final"]["speedup"], rel=1e-3)
    md = R.render_markdown(rep)
    assert f"{R.fmt_tput(before['throughput_per_s'])} → {R.fmt_tput(after['throughput_per_s'])} samples/s" in md
    assert "re-measured side by side" in md
    text = " ".join(_parse(R.render_html(rep)).text)
    assert f"{R.fmt_tput(before['throughput_per_s'])} → {R.fmt_tput(after['throughput_per_s'])}" in text
    del rep["final"]["baseline_remeasured"]
    assert R.before_after(rep)[0]["throughput_per_s"] == rep["baseline"]["throughput_per_s"]


def test_notes_interrupted_and_chosen_batch_are_shown(rep):
    rep["interrupted"] = True
    md = R.render_markdown(rep)
    page = R.render_html(rep)
    for note in rep["notes"]:
        assert R.md_text(note) in md and R.esc(note) in page
    assert "**Interrupted:**" in md and 'class="banner"' in page
    chosen = next(b["batch_size"] for b in rep["batch_search"] if b["status"] == "chosen")
    svg = re.search(r'<svg[^>]*data-plot="batch_search".*?</svg>', page, re.S).group(0)
    hl = re.search(r'<g class="pt hl"[^>]*><title>([^<]*)</title>', svg).group(1)
    assert hl.startswith(f"batch {chosen}:")


# --------------------------------------------------------------------------------------
# robustness: a report that is malformed in any part still renders (a crashed run, an
# older or newer layout, another writer) and never raises


def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


@pytest.mark.slow
def test_malformed_parts_never_raise():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = json.loads(SAMPLE.read_text())
    paths = [("model",), ("device",), ("baseline",), ("baseline", "step_time_ms"), ("findings",), ("variants",),
             ("variants", 0), ("variants", 1, "step_time_ms"), ("variants", 1, "codes"), ("variants", 1, "transforms"),
             ("final",), ("final", "codes"), ("final", "step_time_ms"), ("search",), ("batch_search",),
             ("batch_search", 0), ("analysis",), ("analysis", "baseline"), ("analysis", "baseline", "breakdown_ms"),
             ("analysis", "baseline", "top_operators"), ("findings", 0, "evidence"), ("findings", 0, "doc"),
             ("findings", 0, "params"), ("patch",), ("notes",), ("artifacts",), ("final", "baseline_remeasured")]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(paths), _json_values()), min_size=1, max_size=4))
    def check(changes):
        rep = copy.deepcopy(base)
        for path, value in changes:
            node = rep
            for key in path[:-1]:
                node = node[key] if isinstance(node, dict) and key in node or (
                    isinstance(node, list) and isinstance(key, int) and key < len(node)) else None
                if node is None:
                    break
            last = path[-1]
            if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int) and last < len(node)):
                node[last] = value
        R.render_markdown(rep)
        R.render_html(rep)
        rows = R.final_table_rows(rep)
        assert all(isinstance(c, str) for r in rows for c in r)

    check()


def test_one_story_each_row_shows_the_measurement_that_decided_it():
    """A variant row's 'beside' time, 'decided by' ratio and interval come from its side-by-side
    decision; the final row from the baseline re-measured with it; the batch plot draws each
    size through its side-by-side ratio with its interval (not the sizes' own measurements,
    taken minutes apart)."""
    st = {"median": 10.0, "p25": 9.9, "p75": 10.1, "mean": 10.0, "stdev": 0.1, "min": 9.8, "max": 10.3, "n": 20}
    dec = {"better": True, "ratio": 1.25, "noise": 0.04, "low": 1.2019, "high": 1.3, "anchor": "the baseline",
           "rounds": 6, "settled": True, "cut_short": False, "anchor_step_time_ms": 12.5}
    rep = {
        "model": "m", "baseline": {"step_time_ms": dict(st, median=40.0)},  # measured alone, early: slower
        "variants": [
            {"name": "baseline", "status": "kept", "speedup": 1.0, "step_time_ms": dict(st, median=40.0)},
            {"name": "AO202", "status": "kept", "speedup": 1.25, "step_time_ms": st, "decision": dec},
            {"name": "final", "status": "kept", "speedup": 1.24, "step_time_ms": st},
        ],
        "final": {"speedup": 1.24, "speedup_low": 1.2, "speedup_high": 1.28,
                  "baseline_remeasured": {"step_time_ms": dict(st, median=12.4)}},
        "batch_search": [
            {"batch_size": 32, "throughput_per_s": 1200.0, "status": "ok", "relative_throughput": 1.0},
            {"batch_size": 64, "throughput_per_s": 5200.0, "status": "chosen", "ratio_to_best": 1.1,
             "relative_throughput": 1.1, "relative_low": 1.05, "relative_high": 1.15, "previous_batch_size": 32,
             "ratio_to_previous": 1.1, "ratio_low": 1.05, "ratio_high": 1.15, "side_by_side": True},
            {"batch_size": 128, "throughput_per_s": 1300.0, "status": "no_gain", "ratio_to_best": 1.01,
             "relative_throughput": 1.111, "relative_low": 1.0, "relative_high": 1.23, "previous_batch_size": 64,
             "ratio_to_previous": 1.01, "ratio_low": 0.98, "ratio_high": 1.04, "side_by_side": True},
        ],
    }
    rows = {r[0]: r for r in R.final_table_rows(rep)}
    assert rows["AO202"][4] == "12.50" and rows["AO202"][6] == "1.25× base"
    assert rows["AO202"][7] == "≈1.25×" and rows["final"][4] == "12.40" and rows["baseline"][4] == "—"
    assert R.speedup_interval(rep, rep["variants"][1]) == pytest.approx((1.2019, 1.3))
    md = R.render_markdown(rep)
    table = next(t for t in _md_tables(md) if t[0][0] == "Variant")
    head = table[0]
    row = dict(zip(head, table[3]))
    assert row["Beside (ms)"] == "12.50" and row["Decided by"] == "1.25× the baseline (1.20×–1.30×, 6 rounds)"
    assert row["× baseline (95 % interval)"] == "≈1.25× (1.20×–1.30×)"
    assert dict(zip(head, table[4]))["Decided by"] == "re-measured beside the baseline"
    html = R.render_html(rep)
    batch = html.split('data-plot="batch_search"')[1].split("</svg>")[0]
    # each size by the pairwise ratio that decided it, never the compounded product (1.111)
    assert "against the size before it" in batch and batch.count('class="errbar"') == 2
    assert "1.01× the samples/s of the size before it" in batch and "1.11" not in batch
    bt = next(t for t in _md_tables(md) if t[0][0] == "Batch size")
    ratios = {r[0]: dict(zip(bt[0], r))["× size before (deciding ratio)"] for r in bt[2:]}
    assert ratios["128"] == "1.01× batch 64 (0.98×–1.04×, side by side)" and ratios["32"] == "—"
    assert "1.11" not in "".join(ratios.values())
    assert "1.01× batch 64 (0.98×–1.04×, side by side)" in html.split('id="batch-search"')[1]
    assert "5,200" not in batch  # the sizes' own throughputs, measured apart, are not what is drawn
