"""Human-facing reports of an optimize run: report.md, report.html and the terminal table.

This module is the facade the rest of autoopt imports; the work is done per output:

- `markdown` renders report.md, one function per section;
- `html` renders report.html from the Jinja2 templates in templates/, with `plots`
  drawing the figures (matplotlib, inline SVG);
- `terminal` builds the rows of the terminal table;
- `data` reads the report dict and `format` formats its numbers and escapes its text.

Every function reads the report dict, which is exactly report.json (docs/contracts.md's `autoopt
optimize --json` keys plus extras). Any optional part may be null or missing (a failed
run, a CPU run without kernels, no batch search): each section renders what is there and
says plainly what is not. A distributed report ("distributed": true) gets its own section.

report.html is one self-contained file: inline CSS and inline SVG plots, no script, and a
Content-Security-Policy that forbids every network load, so it renders the same from
file:// on a machine without network. Everything that comes from the run (model, kernel
and operator names, reasons, the patch) is escaped.
"""
from __future__ import annotations

from pathlib import Path

from autoopt.output.data import (
    BREAKDOWN_COLORS,
    BREAKDOWN_KEYS,
    BREAKDOWN_LABELS,
    STATUS_COLORS,
    before_after,
    breakdown,
    device_text,
    final_speedup,
    findings,
    model_label,
    speedup_interval,
    speedup_text,
    top_entries,
    traced_steps,
    variants,
)
from autoopt.output.format import (
    codes_text,
    error_text,
    esc,
    fmt_err,
    fmt_mb,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_tput,
    fmt_x,
    md_code,
    md_text,
    num,
    spread_text,
    stat,
    transforms_text,
)
from autoopt.output.html import render_doc_markdown, render_html
from autoopt.output.markdown import render_markdown
from autoopt.output.terminal import FINAL_TABLE_HEADER, final_table_rows

__all__ = [
    "BREAKDOWN_COLORS", "BREAKDOWN_KEYS", "BREAKDOWN_LABELS", "FINAL_TABLE_HEADER", "STATUS_COLORS",
    "before_after", "breakdown", "codes_text", "device_text", "error_text", "esc", "final_speedup",
    "final_table_rows", "findings", "fmt_err", "fmt_mb", "fmt_ms", "fmt_num", "fmt_pct", "fmt_tput", "fmt_x",
    "md_code", "md_text", "model_label", "num", "render_doc_markdown", "render_html", "render_markdown",
    "speedup_interval", "speedup_text", "spread_text", "stat", "top_entries", "traced_steps", "transforms_text",
    "variants", "write_html", "write_markdown",
]


def _write(text: str, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", errors="replace")  # a lone surrogate from the JSON must not fail the write
    return path


def write_markdown(report: dict, path) -> Path:
    """Render report.md for `report` into `path` (parent folders created); returns the path."""
    return _write(render_markdown(report), path)


def write_html(report: dict, path) -> Path:
    """Render report.html for `report` into `path` (parent folders created); returns the path."""
    return _write(render_html(report), path)
