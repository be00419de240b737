"""Human-facing reports of an optimize run: report.md, report.html and the terminal table.

Every function here reads the report dict, which is exactly report.json (DESIGN.md's
`autoopt optimize --json` keys plus extras). Any optional part may be null or missing (a
failed run, a CPU run without kernels, no batch search): each section renders what is
there and says plainly what is not.

report.html is one self-contained file: inline CSS and inline SVG plots generated here, no
script, and a Content-Security-Policy that forbids every network load, so it renders the
same from file:// on a machine without network. Everything that comes from the run
(model, kernel and operator names, reasons, the patch) is escaped.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from autoopt.output.data import (BREAKDOWN_COLORS, BREAKDOWN_KEYS, BREAKDOWN_LABELS, STATUS_COLORS, batch_label,
                                 before_after, breakdown, device_detail, final_speedup, findings,
                                 model_label, speedup_interval, speedup_text, top_entries, traced_steps, variants)
from autoopt.output.format import (as_dict as _d, as_list as _l, codes_text, error_text, esc, fmt_err, fmt_mb,
                                   fmt_ms, fmt_num, fmt_pct, fmt_tput, fmt_x, md_code, md_text, num,
                                   spread_text, stat, transforms_text)
from autoopt.output.markdown import render_markdown
from autoopt.output.terminal import FINAL_TABLE_HEADER, final_table_rows
from autoopt.types import SAFETY_LEVELS, VARIANT_STATUSES

__all__ = ["BREAKDOWN_COLORS", "BREAKDOWN_KEYS", "BREAKDOWN_LABELS", "FINAL_TABLE_HEADER", "STATUS_COLORS",
           "before_after", "codes_text", "error_text", "esc", "final_speedup", "final_table_rows", "fmt_err",
           "fmt_mb", "fmt_ms", "fmt_num", "fmt_pct", "fmt_tput", "fmt_x", "md_code", "md_text", "num",
           "render_doc_markdown", "render_html", "render_markdown", "speedup_interval", "speedup_text",
           "spread_text", "stat", "top_entries", "transforms_text", "write_html", "write_markdown"]


def write_markdown(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# SVG plots (inline; every label escaped)

def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _ticks(vmax: float, n: int = 5) -> list[float]:
    return [vmax * i / n for i in range(n + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2g}"


def _svg_open(w: int, h: int, label: str, kind: str) -> str:
    return (f'<svg class="plot" data-plot="{esc(kind)}" xmlns="http://www.w3.org/2000/svg" width="{w}" '
            f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{esc(label)}"><title>{esc(label)}</title>')


def svg_stacked_bars(bars: list[tuple[str, dict[str, float]]], title: str, kind: str = "breakdown") -> str:
    """Horizontal stacked bars (one per label) of ms per category, with a legend."""
    cats = [k for k in BREAKDOWN_KEYS if any(b.get(k, 0) > 0 for _, b in bars)]
    total_max = _nice_max(max((sum(b.get(k, 0) for k in cats) for _, b in bars), default=0) or 1)
    left = int(min(220, 24 + 6.8 * max((len(lbl) for lbl, _ in bars), default=4)))
    right, top, bar_h, gap = 60, 28, 30, 14
    w = 540
    plot_w = w - left - right
    legend_rows = math.ceil(len(cats) / 4) if cats else 0
    h = top + len(bars) * (bar_h + gap) + 30 + legend_rows * 20 + 10
    s = [_svg_open(w, h, title, kind)]
    s.append(f'<text x="8" y="16" class="ptitle">{esc(title)}</text>')
    axis_y = top + len(bars) * (bar_h + gap)
    for t in _ticks(total_max):
        x = left + plot_w * t / total_max
        s.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" class="grid"/>')
        s.append(f'<text x="{x:.1f}" y="{axis_y + 14}" class="tick" text-anchor="middle">{_tick_label(t)}</text>')
    s.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 28}" class="axis" text-anchor="middle">ms per step</text>')
    for i, (label, b) in enumerate(bars):
        y = top + i * (bar_h + gap)
        s.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4:.1f}" class="label" text-anchor="end">{esc(label)}</text>')
        x = float(left)
        total = sum(b.get(k, 0) for k in cats)
        for k in cats:
            v = b.get(k, 0)
            if v <= 0:
                continue
            bw = plot_w * v / total_max
            s.append(f'<rect class="bar" x="{x:.1f}" y="{y}" width="{max(bw, 0.5):.1f}" height="{bar_h}" '
                     f'fill="{BREAKDOWN_COLORS[k]}"><title>{esc(f"{label}: {BREAKDOWN_LABELS[k]} {v:.3f} ms")}'
                     f'</title></rect>')
            x += bw
        s.append(f'<text x="{x + 4:.1f}" y="{y + bar_h / 2 + 4:.1f}" class="value">{fmt_ms(total)} ms</text>')
    ly = axis_y + 40
    for j, k in enumerate(cats):
        lx = 16 + (j % 4) * 125
        yy = ly + (j // 4) * 20
        s.append(f'<rect x="{lx}" y="{yy - 10}" width="12" height="12" fill="{BREAKDOWN_COLORS[k]}"/>')
        s.append(f'<text x="{lx + 16}" y="{yy}" class="tick">{esc(BREAKDOWN_LABELS[k])}</text>')
    s.append("</svg>")
    return "".join(s)


def svg_hbars(rows: list[tuple[str, float, str, str]], title: str, unit: str, kind: str,
              ref: Optional[float] = None, errors: Optional[list[Optional[tuple[float, float]]]] = None,
              label_chars: int = 34, width: int = 540) -> str:
    """Horizontal bars: rows of (label, value, tooltip, colour); optional error bars
    (low, high) per row and a dashed reference line (e.g. 1.0× for speedups)."""
    left = min(280, 24 + 6.8 * min(label_chars, max((len(r[0]) for r in rows), default=4)))
    right, top, bar_h, gap = 70, 28, 18, 8
    w = width
    plot_w = w - left - right
    vmax = max([r[1] for r in rows] + [hi for e in (errors or []) if e for hi in (e[1],)] + [ref or 0] + [0])
    vmax = _nice_max(vmax or 1)
    axis_y = top + len(rows) * (bar_h + gap)
    h = axis_y + 36
    s = [_svg_open(w, h, title, kind), f'<text x="8" y="16" class="ptitle">{esc(title)}</text>']
    for t in _ticks(vmax):
        x = left + plot_w * t / vmax
        s.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" class="grid"/>')
        s.append(f'<text x="{x:.1f}" y="{axis_y + 14}" class="tick" text-anchor="middle">{_tick_label(t)}</text>')
    s.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 28}" class="axis" text-anchor="middle">{esc(unit)}</text>')
    for i, (label, v, tip, color) in enumerate(rows):
        y = top + i * (bar_h + gap)
        shown = label if len(label) <= label_chars else label[: label_chars - 1] + "…"
        s.append(f'<text x="{left - 6:.1f}" y="{y + bar_h / 2 + 4:.1f}" class="label" text-anchor="end">'
                 f'<title>{esc(label)}</title>{esc(shown)}</text>')
        bw = plot_w * max(v, 0) / vmax
        s.append(f'<rect class="bar" x="{left}" y="{y}" width="{max(bw, 0.5):.1f}" height="{bar_h}" fill="{color}">'
                 f'<title>{esc(tip)}</title></rect>')
        end = left + bw
        e = errors[i] if errors and i < len(errors) else None
        if e:
            x1, x2 = left + plot_w * e[0] / vmax, left + plot_w * e[1] / vmax
            cy = y + bar_h / 2
            s.append(f'<g class="errbar"><line x1="{x1:.1f}" y1="{cy:.1f}" x2="{x2:.1f}" y2="{cy:.1f}"/>'
                     f'<line x1="{x1:.1f}" y1="{y + 3}" x2="{x1:.1f}" y2="{y + bar_h - 3}"/>'
                     f'<line x1="{x2:.1f}" y1="{y + 3}" x2="{x2:.1f}" y2="{y + bar_h - 3}"/></g>')
            end = max(end, x2)
        s.append(f'<text x="{end + 4:.1f}" y="{y + bar_h / 2 + 4:.1f}" class="value">{esc(tip.split(": ")[-1])}</text>')
    if ref is not None:
        x = left + plot_w * ref / vmax
        s.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{axis_y}" class="ref"/>')
    s.append("</svg>")
    return "".join(s)


def svg_line(points: list[tuple[float, Optional[float], str]], title: str, xlabel: str, ylabel: str,
             kind: str, highlight: Optional[float] = None) -> str:
    """Points (x, y or None, status) joined by a line; x on a log2 axis when it spans more
    than a factor 4. Points without y (out of memory, over budget) are marked on the axis."""
    w, h = 540, 300
    left, right, top, bottom = 70, 30, 30, 50
    pw, ph = w - left - right, h - top - bottom
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if p[1] is not None]
    log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 4

    def fx(x: float) -> float:
        lo, hi = (math.log2(min(xs)), math.log2(max(xs))) if log else (min(xs), max(xs))
        xv = math.log2(x) if log else x
        return left + (pw * (xv - lo) / (hi - lo) if hi > lo else pw / 2)

    ymax = _nice_max(max(ys) if ys else 1)

    def fy(y: float) -> float:
        return top + ph - ph * y / ymax

    s = [_svg_open(w, h, title, kind), f'<text x="8" y="18" class="ptitle">{esc(title)}</text>']
    for t in _ticks(ymax):
        y = fy(t)
        s.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        s.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_tick_label(t)}</text>')
    for x in sorted(set(xs)):
        s.append(f'<text x="{fx(x):.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{esc(fmt_num(x, 0))}</text>')
    s.append(f'<text x="{left + pw / 2:.1f}" y="{h - 10}" class="axis" text-anchor="middle">{esc(xlabel)}</text>')
    s.append(f'<text x="14" y="{top + ph / 2:.1f}" class="axis" text-anchor="middle" '
             f'transform="rotate(-90 14 {top + ph / 2:.1f})">{esc(ylabel)}</text>')
    ok = sorted((p for p in points if p[1] is not None), key=lambda p: p[0])
    if len(ok) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for i, (x, y, _) in enumerate(ok))
        s.append(f'<path d="{d}" class="line"/>')
    for x, y, status in points:
        if y is None:
            cx, cy = fx(x), top + ph
            s.append(f'<g class="miss"><title>{esc(f"batch {fmt_num(x, 0)}: {status}")}</title>'
                     f'<line x1="{cx - 5:.1f}" y1="{cy - 5:.1f}" x2="{cx + 5:.1f}" y2="{cy + 5:.1f}"/>'
                     f'<line x1="{cx - 5:.1f}" y1="{cy + 5:.1f}" x2="{cx + 5:.1f}" y2="{cy - 5:.1f}"/></g>')
        else:
            cls = "pt hl" if highlight is not None and x == highlight else "pt"
            s.append(f'<circle class="{cls}" cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="{6 if "hl" in cls else 4}">'
                     f'<title>{esc(f"batch {fmt_num(x, 0)}: {fmt_tput(y)} samples/s ({status})")}</title></circle>')
    s.append("</svg>")
    return "".join(s)


# ---------------------------------------------------------------------------------------
# HTML


_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d8dde6;--bg:#fff;--panel:#f6f8fb;--ok:#2e7d32;--bad:#c62828}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
 background:var(--bg);margin:0 auto;max-width:1200px;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid var(--line);
 padding-bottom:4px}h3{font-size:16px;margin:18px 0 6px}
code,pre{font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.muted{color:var(--muted)}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:170px}
.card .k{color:var(--muted);font-size:12px}.card .v{font-size:20px;font-weight:600}
.card.big .v{font-size:30px;color:var(--ok)}.card.big.slow .v{color:var(--bad)}.card.big.none .v{color:var(--muted)}
table{border-collapse:collapse;margin:8px 0 16px;width:100%}table.evidence,table.top{width:auto}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--panel);font-weight:600}.scroll{overflow-x:auto}td.reason{min-width:220px}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;color:#fff}
.s-kept{background:#2e7d32}.s-rejected{background:#c62828}.s-failed{background:#6d6d6d}.s-skipped{background:#9e9e9e}
.s-other,.f-other{background:#5b6475}
.f-safe{background:#2e7d32}.f-unsafe{background:#ef6c00}.f-manual{background:#6a1b9a}
.finding{border:1px solid var(--line);border-radius:8px;padding:8px 14px;margin:12px 0}
.finding .doc{border-top:1px dashed var(--line);margin-top:8px}
.finding pre,.doc pre{background:var(--panel);padding:8px;overflow:auto;border-radius:6px}
.plots{display:flex;flex-wrap:wrap;gap:18px}
.plotbox{border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
svg.plot{display:block;max-width:100%;height:auto;font-family:inherit}
svg .ptitle{font-size:13px;font-weight:600;fill:#1d2330}
svg .tick{font-size:11px;fill:#5b6475}svg .axis{font-size:12px;fill:#1d2330}
svg .label{font-size:11.5px;fill:#1d2330}svg .value{font-size:11px;fill:#1d2330}
svg .grid{stroke:#e6e9ef;stroke-width:1}svg .ref{stroke:#c62828;stroke-dasharray:5 4;stroke-width:1.5}
svg .errbar line{stroke:#1d2330;stroke-width:1.5}svg .line{fill:none;stroke:#4c78a8;stroke-width:2}
svg .pt{fill:#4c78a8}svg .pt.hl{fill:#2e7d32;stroke:#1d2330;stroke-width:1.5}
svg .miss line{stroke:#c62828;stroke-width:2}
pre.diff{border:1px solid var(--line);border-radius:8px;overflow:auto;padding:0;background:#fbfcfe}
pre.diff span{display:block;padding:0 10px;white-space:pre}
pre.diff .add{background:#e6ffec;color:#116329}pre.diff .del{background:#ffebe9;color:#82071e}
pre.diff .hunk{background:#ddf4ff;color:#0550ae}pre.diff .file{font-weight:700;background:#f0f2f5}
.empty{color:var(--muted);font-style:italic}
.banner{background:#fff3e0;border:1px solid #ef6c00;border-radius:8px;padding:8px 14px;font-weight:600}
.notes{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:8px 14px;margin:8px 0}
td .sub{color:var(--muted);font-size:11.5px}
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def render_doc_markdown(text: str) -> str:
    """A rule's documentation as HTML. Raw HTML in the Markdown is shown as text, never
    interpreted; links are limited to http(s) and in-page anchors."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py comes with rich
        return f"<pre>{esc(text)}</pre>"
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.validateLink = lambda url: bool(re.match(r"^(https?:|#)", url.strip(), re.I))
    # demote headings so a rule's "## What it does" sits below the finding's heading
    out = md.render(str(text))
    return re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m.group(1)}h{min(6, int(m.group(2)) + 2)}>", out)


def diff_html(patch: str) -> str:
    lines = []
    for line in patch.splitlines():
        if line.startswith(("+++", "---", "diff ", "index ")):
            cls = "file"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = "ctx"
        lines.append(f'<span class="{cls}">{esc(line) or " "}</span>')
    return '<pre class="diff">' + "".join(lines) + "</pre>"


def _td(v: str, n: bool = False) -> str:
    return f'<td class="n">{esc(v)}</td>' if n else f"<td>{esc(v)}</td>"


def _td2(main: str, sub: str) -> str:
    """A numeric cell with a second, smaller line (spread, tolerance)."""
    extra = f'<div class="sub">{esc(sub)}</div>' if sub else ""
    return f'<td class="n">{esc(main)}{extra}</td>'


def _badge(text: str, kind: str, known: tuple[str, ...]) -> str:
    """A coloured label; the class comes from a fixed list, never from the data."""
    cls = f"{kind}-{text}" if text in known else f"{kind}-other"
    return f'<span class="badge {cls}">{esc(text)}</span>'


def _html_table(header: list[str], rows: list[str], cls: str, scroll: bool = False) -> str:
    t = (f'<table class="{esc(cls)}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header)
         + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return f'<div class="scroll">{t}</div>' if scroll else t


def render_html(report: dict) -> str:
    r = report
    base, fin = _d(r.get("baseline")), _d(r.get("final"))
    model = model_label(r)
    p: list[str] = []
    p.append('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
             f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
             '<meta name="viewport" content="width=device-width, initial-scale=1">'
             f"<title>autoopt report: {esc(model)}</title><style>{_CSS}</style></head><body>")
    p.append(f'<h1>autoopt report: <code id="model-name">{esc(model)}</code></h1>')
    p.append(f'<div class="muted">{esc(r.get("model_path") or "")} · {esc(r.get("mode") or "?")} · '
             f'{esc(r.get("created_at") or "")} · autoopt {esc(r.get("autoopt_version") or "?")} · '
             f'torch {esc(r.get("torch_version") or "?")}</div>')

    if r.get("interrupted"):
        p.append('<p class="banner">Interrupted: the run was stopped; this report holds what was measured '
                 "until then.</p>")

    # summary
    s, lo, hi = final_speedup(r)
    before, after = before_after(r)
    bst, fst = _d(before.get("step_time_ms")), _d(after.get("step_time_ms"))
    bl, al = batch_label(before), batch_label(after)
    cards = [
        ("big" + ("" if s is not None and s >= 1 else " slow" if s is not None else " none"), "Final speedup",
         fmt_x(s) if s is not None else "not measured",
         f"spread {fmt_x(lo)}–{fmt_x(hi)}" if lo is not None and hi is not None else "throughput vs baseline"),
        ("", "Device", str(_d(r.get("device")).get("name") or _d(r.get("device")).get("type") or "unknown"),
         device_detail(r)),
        ("", "Throughput", f"{fmt_tput(before.get('throughput_per_s'))} → {fmt_tput(after.get('throughput_per_s'))}",
         "samples/s" + (" (baseline re-measured side by side)" if _d(fin.get("baseline_remeasured")) else "")),
        ("", "Step time (median)", f"{fmt_ms(stat(bst, 'median'))} → {fmt_ms(stat(fst, 'median'))} ms",
         f"{bl or 'baseline'}: {spread_text(bst)} · {al or 'final'}: {spread_text(fst)} (p25–p75)"),
        ("", "Peak memory", f"{fmt_mb(before.get('peak_memory_mb'))} → {fmt_mb(after.get('peak_memory_mb'))} MB", ""),
        ("", "Kept", codes_text(fin.get("codes"), ", ") or "nothing", transforms_text(fin.get("transforms"))),
    ]
    p.append('<section id="summary"><div class="cards">')
    for cls, k, v, sub in cards:
        p.append(f'<div class="card {cls}"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
                 f'<div class="muted">{esc(sub)}</div></div>')
    p.append("</div>")
    search = _d(r.get("search"))
    extra = [f"mode {r.get('mode') or '?'}", f"batch size {r.get('batch_size', '?')}", f"seed {r.get('seed', '?')}"]
    if search:
        extra.append(f"{search.get('strategy', '?')} search, {search.get('variants_tried', '?')} variants tried in "
                     f"{fmt_num(search.get('time_s'), 1)} s")
    if num(base.get("mfu")) is not None:
        extra.append(f"baseline MFU {fmt_pct(base.get('mfu'))}")
    if num(r.get("wall_time_s")) is not None:
        extra.append(f"run took {fmt_num(r.get('wall_time_s'), 1)} s")
    p.append(f'<p class="muted">{esc(" · ".join(extra))}</p>')
    if s is None and fin.get("note"):
        p.append(f"<p>{esc(fin['note'])}</p>")
    notes = [n for n in _l(r.get("notes")) if n]
    if notes:
        p.append('<div class="notes"><b>Notes</b><ul>' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>")
    p.append("</section>")

    # variants table
    p.append('<section id="variants"><h2>Variants</h2>')
    vs = variants(r)
    if vs:
        rows = []
        for v in vs:
            st = v.get("step_time_ms")
            iv = speedup_interval(r, v)
            status = str(v.get("status", "?"))
            rows.append(
                "<tr>" + f"<td><code>{esc(v.get('name', '?'))}</code></td>"
                + f"<td><code>{esc(transforms_text(v.get('transforms')))}</code></td>"
                + f"<td>{_badge(status, 's', VARIANT_STATUSES)}</td>"
                + _td2(fmt_ms(stat(st, "median")), spread_text(st) if st else "")
                + _td(fmt_tput(v.get("throughput_per_s")), True)
                + _td(str(v.get("batch_size")) if v.get("batch_size") is not None else "—", True)
                + _td(fmt_mb(v.get("peak_memory_mb")), True)
                + _td(fmt_x(v.get("expected_speedup")), True)
                + _td2(fmt_x(v.get("speedup")), f"{iv[0]:.2f}–{iv[1]:.2f}" if iv else "")
                + _td2(fmt_err(v.get("max_rel_error")),
                       f"tol {fmt_err(v.get('tolerance'))}" if num(v.get("tolerance")) is not None else "")
                + f'<td class="reason">{esc(v.get("reason") or "")}</td></tr>')
        p.append(_html_table(["Variant", "Transforms", "Status", "Step ms: median (p25–p75)", "Samples/s",
                              "Batch", "Peak MB", "Predicted", "Speedup (spread)", "Max rel. error", "Reason"],
                             rows, "variants",
                             scroll=True))
    else:
        p.append('<p class="empty">No variant was measured.</p>')
    p.append("</section>")

    # plots
    p.append('<section id="plots"><h2>Plots</h2><div class="plots">')
    plots = 0
    analysis = _d(r.get("analysis"))
    ab, af = analysis.get("baseline"), analysis.get("final")
    bars = [(lbl, breakdown(a)) for lbl, a in (("baseline", ab), ("final", af)) if _d(a)]
    if bars and any(sum(b.values()) > 0 for _, b in bars) and bl and al and bl != al:
        bars = [(f"{lbl} ({bl if lbl == 'baseline' else al})", b) for lbl, b in bars]
    if bars and any(sum(b.values()) > 0 for _, b in bars):
        p.append('<div class="plotbox">' + svg_stacked_bars(bars, "Step-time breakdown, before and after") + "</div>")
        plots += 1
    sp_rows, sp_err = [], []
    for v in vs:
        sv = num(v.get("speedup"))
        if sv is None:
            continue
        iv = speedup_interval(r, v)
        status = str(v.get("status", ""))
        tip = f"{v.get('name', '?')} ({status}): {sv:.2f}×"
        sp_rows.append((str(v.get("name", "?")), sv, tip, STATUS_COLORS.get(status, "#4c78a8")))
        sp_err.append(iv)
    if sp_rows:
        p.append('<div class="plotbox">' + svg_hbars(sp_rows, "Speedup per variant (whiskers: p25–p75 spread)",
                                                     "× baseline throughput",
                                                     "speedup", ref=1.0, errors=sp_err) + "</div>")
        plots += 1
    bsearch = [b for b in _l(r.get("batch_search")) if isinstance(b, dict) and num(b.get("batch_size")) is not None]
    if bsearch:
        pts = [(num(b["batch_size"]), num(b.get("throughput_per_s")), str(b.get("status", ""))) for b in bsearch]
        chosen = next((num(b["batch_size"]) for b in bsearch if b.get("status") == "chosen"), None)
        for v in ([] if chosen is not None else vs):
            for t in _l(v.get("transforms")):
                if isinstance(t, dict) and t.get("name") == "batch_size":
                    chosen = num(_d(t.get("params")).get("batch_size")) or chosen
        p.append('<div class="plotbox">' + svg_line(pts, "Throughput against batch size (batch search)",
                                                     "batch size", "samples/s", "batch_search", highlight=chosen)
                 + "</div>")
        plots += 1
    for label, a in (("baseline", ab), ("final", af)):
        kind, top = top_entries(a)
        if top:
            rows = [(n, ms, f"{n} ({c if c is not None else '?'} calls): {fmt_ms(ms)} ms", "#4c78a8" if label ==
                     "baseline" else "#54a24b") for n, ms, c in top]
            n = traced_steps(a)
            unit = f"ms over {n} traced steps" if n else "ms"
            p.append('<div class="plotbox">' + svg_hbars(rows, f"Top {kind}, {label}", unit,
                                                         f"top_{label}", label_chars=40) + "</div>")
            plots += 1
    if not plots:
        p.append('<p class="empty">Nothing to plot: no measurement or trace analysis in this report.</p>')
    p.append("</div></section>")

    # batch search table
    if bsearch:
        p.append('<section id="batch-search"><h2>Batch-size search</h2><p>Chosen by throughput within the '
                 'memory budget. A different batch size changes training semantics: scale the learning rate '
                 'and re-check convergence.</p>')
        p.append(_html_table(["Batch size", "Samples/s", "Peak MB", "Status"], [
            "<tr>" + _td(fmt_num(b.get("batch_size"), 0), True) + _td(fmt_tput(b.get("throughput_per_s")), True)
            + _td(fmt_mb(b.get("peak_memory_mb")), True) + _td(str(b.get("status", "?"))) + "</tr>"
            for b in bsearch], "batch"))
        p.append("</section>")

    # top kernels / operators tables
    tops = [(lbl, *top_entries(a)) for lbl, a in (("baseline", ab), ("final", af))]
    if any(t[2] for t in tops):
        p.append('<section id="top"><h2>Top kernels and operators</h2><div class="plots">')
        for label, kind, top in tops:
            if not top:
                continue
            p.append(f'<div><h3>{esc(label)}: top {esc(kind)}</h3>' + _html_table(["Name", "Calls", "ms"], [
                f"<tr><td><code>{esc(n)}</code></td>" + _td(str(c) if c is not None else "—", True)
                + _td(fmt_ms(ms), True) + "</tr>" for n, ms, c in top], "top") + "</div>")
        p.append("</div></section>")

    # findings
    p.append('<section id="findings"><h2>Findings</h2>')
    fs = findings(r)
    if not fs:
        p.append('<p class="empty">No rule fired.</p>')
    for f in fs:
        safety = str(f.get("safety", "?"))
        acc = f.get("accepted")
        anchor = re.sub(r"[^A-Za-z0-9_-]", "", str(f.get("code", "")))
        p.append(f'<div class="finding" id="finding-{anchor}">'
                 f'<h3><code>{esc(f.get("code", "?"))}</code> {esc(f.get("title", ""))} '
                 f'{_badge(safety, "f", SAFETY_LEVELS)}</h3>')
        p.append(f'<p>{esc(f.get("message", ""))}</p>')
        facts = [("rule", f.get("name", "")),
                 ("transform", transforms_text([{"name": f.get("transform") or "none", "params": f.get("params")}])),
                 ("expected speedup", fmt_x(f.get("expected_speedup"))),
                 ("predicted step time", f"{fmt_ms(f.get('predicted_step_time_ms'))} ms"),
                 ("accepted", "yes" if acc else "no" if acc is not None else "—")]
        p.append('<p class="muted">' + " · ".join(f"{esc(k)}: <b>{esc(v)}</b>" for k, v in facts) + "</p>")
        ev = _d(f.get("evidence"))
        if ev:
            p.append(_html_table(["Evidence", "Value"], [
                f"<tr><td><code>{esc(k)}</code></td><td><code>{esc(v)}</code></td></tr>" for k, v in ev.items()],
                "evidence"))
        if f.get("doc"):
            p.append('<details class="doc" open><summary>Documentation</summary>'
                     + render_doc_markdown(str(f["doc"])) + "</details>")
        p.append("</div>")
    p.append("</section>")

    # patch
    p.append('<section id="patch"><h2>Patch</h2>')
    patch = r.get("patch")
    if isinstance(patch, str) and patch.strip():
        p.append('<p class="muted">A unified diff against the model file; applied, the file itself runs the '
                 "final configuration.</p>" + diff_html(patch))
    else:
        p.append('<p class="empty">No patch: no transform was kept.</p>')
    p.append("</section>")

    arts = _d(r.get("artifacts"))
    if arts:
        p.append('<section id="artifacts"><h2>Artifacts</h2><ul>')
        here = Path(str(arts.get("report_html") or "")).parent
        for k, v in arts.items():
            if not v:
                continue
            # files beside report.html get a relative link that works wherever the folder goes
            name = Path(str(v)).name
            link = (name if str(here) not in ("", ".") and Path(str(v)).parent == here
                    and re.fullmatch(r"[\w][\w.+-]*", name) else None)
            target = f'<a href="{esc(link)}"><code>{esc(v)}</code></a>' if link else f"<code>{esc(v)}</code>"
            p.append(f"<li>{esc(k)}: {target}</li>")
        p.append("</ul>")
        if arts.get("logdir"):
            p.append(f'<p>TensorBoard: <code>{esc("autoopt view " + str(arts["logdir"]))}</code></p>')
        p.append("</section>")
    p.append("</body></html>\n")
    return "".join(p)


def write_html(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path