"""report.html: one self-contained page rendered from the Jinja2 templates in templates/.

Each section function below reads the report dict and returns the values its template
(templates/sections/<name>.html.j2) shows, or None where the section has nothing to show.
The templates autoescape every value; the only markup passed in as safe is what this
package generated itself: the plots (plots.svg_markup, serialized by xml.etree) and a rule's
documentation (markdown-it with raw HTML off).

The page loads nothing: inline CSS, inline SVG, no script, and a Content-Security-Policy
that forbids every network load, so it renders the same from file:// without a network.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from markupsafe import Markup

from autoopt.output import data as D
from autoopt.output import plots as P
from autoopt.output.format import (
    accepted_text,
    as_dict,
    codes_text,
    fmt_err,
    fmt_mb,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_tput,
    fmt_x,
    num,
    printable,
    spread_text,
    stat,
    text_or_dash,
    transforms_text,
)
from autoopt.types import SAFETY_LEVELS, VARIANT_STATUSES

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _printable(value: Any) -> Any:
    """Every value a template shows, before its escape: text from the run without control or
    bidi characters (safe.printable); markup this package made itself is left as it is."""
    return value if isinstance(value, Markup) or not isinstance(value, str) else printable(value)


@lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment of the report templates, autoescaping everything, and showing
    control and bidi characters of the data as U+FFFD."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, finalize=_printable)


@lru_cache(maxsize=1)
def _doc_renderer():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.validateLink = lambda url: bool(re.match(r"^(https?:|#)", url.strip(), re.I))

    def demote(state) -> None:  # a rule's "## What it does" sits below the finding's <h3>
        for tok in state.tokens:
            if tok.type in ("heading_open", "heading_close"):
                tok.tag = f"h{min(6, int(tok.tag[1]) + 2)}"

    md.core.ruler.push("demote_headings", demote)
    return md


def render_doc_markdown(text: str) -> str:
    """A rule's documentation (Markdown) as HTML. Raw HTML in it is shown as text, never
    interpreted; links are limited to http(s) and in-page anchors; headings are demoted
    two levels."""
    return _doc_renderer().render(str(text))


def badge_class(text: str, kind: str, known: tuple[str, ...]) -> str:
    """The CSS class of a coloured label, from a fixed list, never from the data."""
    return f"{kind}-{text}" if text in known else f"{kind}-other"


def header(r: dict) -> dict:
    """The title line and the run's facts."""
    return {"model": D.model_label(r), "interrupted": bool(r.get("interrupted")),
            "meta": " · ".join([str(r.get("model_path") or ""), str(r.get("mode") or "?"),
                                str(r.get("created_at") or ""), f"autoopt {r.get('autoopt_version') or '?'}",
                                f"torch {r.get('torch_version') or '?'}"])}


def _cards(r: dict) -> list[tuple[str, str, str, str]]:
    """(class, key, value, subtitle) of the summary cards."""
    s, lo, hi = D.final_speedup(r)
    before, after = D.before_after(r)
    fin = as_dict(r.get("final"))
    bst, fst = as_dict(before.get("step_time_ms")), as_dict(after.get("step_time_ms"))
    bl, al = D.batch_label(before), D.batch_label(after)
    tone = "" if s is not None and s >= 1 else " slow" if s is not None else " none"
    final_card = ("big" + tone, "Final speedup", fmt_x(s) if s is not None else "not measured",
                  f"spread {fmt_x(lo)}–{fmt_x(hi)}" if lo is not None and hi is not None else "throughput vs baseline")
    return _headline_cards(r, final_card) + [
        ("", "Device", D.device_name(r), D.device_detail(r)),
        ("", "Throughput", f"{fmt_tput(before.get('throughput_per_s'))} → {fmt_tput(after.get('throughput_per_s'))}",
         "samples/s" + (" (baseline re-measured side by side)" if D.remeasured(r) else "")),
        ("", "Step time (median)", f"{fmt_ms(stat(bst, 'median'))} → {fmt_ms(stat(fst, 'median'))} ms",
         f"{bl or 'baseline'}: {spread_text(bst)} · {al or 'final'}: {spread_text(fst)} (p25–p75)"),
        ("", "Peak memory", f"{fmt_mb(before.get('peak_memory_mb'))} → {fmt_mb(after.get('peak_memory_mb'))} MB", ""),
        ("", "Kept", codes_text(fin.get("codes"), ", ") or "nothing", transforms_text(fin.get("transforms"))),
    ]


def _headline_cards(r: dict, final_card: tuple[str, str, str, str]) -> list[tuple[str, str, str, str]]:
    """The headline first: the speedup with training unchanged; then, when a change of
    training was accepted, the final speedup named as such (else the final card alone, for
    reports without final.fixed_batch_speedup)."""
    fs, flo, fhi, how = D.fixed_batch(r)
    if fs is None and not D.fixed_batch(r)[3]:
        return [final_card]
    sem = D.semantic_text(r)
    fixed = ("big" + ("" if fs is not None and fs >= 1 else " slow" if fs is not None else " none"),
             "Speedup, training unchanged", fmt_x(fs) if fs is not None else "not measured",
             (f"95 % interval {fmt_x(flo)}–{fmt_x(fhi)}; " if flo is not None and fhi is not None else "") + how)
    if not sem:
        return [fixed]
    return [fixed, (final_card[0].replace("big", "").strip(), f"With {sem} (changes training)", final_card[2],
                    final_card[3])]


def summary(r: dict) -> dict:
    """The final card, the other summary cards, the run's settings and its notes."""
    search = as_dict(r.get("search"))
    extra = [f"mode {r.get('mode') or '?'}", f"batch size {r.get('batch_size', '?')}", f"seed {r.get('seed', '?')}"]
    if search:
        extra.append(D.search_info(r)["line"].rstrip("."))
    base = as_dict(r.get("baseline"))
    if num(base.get("mfu")) is not None:
        extra.append(f"baseline MFU {fmt_pct(base.get('mfu'))}")
    if num(r.get("wall_time_s")) is not None:
        extra.append(f"run took {fmt_num(r.get('wall_time_s'), 1)} s")
    fin = as_dict(r.get("final"))
    note = fin.get("note") if D.final_speedup(r)[0] is None and fin.get("note") else None
    return {"cards": _cards(r), "extra": " · ".join(extra), "note": note, "notes": D.notes(r),
            "search": D.search_info(r), "not_applied": D.manual_skip_lines(r)}


def _variant_row(r: dict, v: dict) -> dict:
    st = v.get("step_time_ms")
    iv = D.speedup_interval(r, v)
    status = str(v.get("status", "?"))
    estimate = "≈" if v.get("name") not in ("final", "baseline") and D.decision(v) else ""
    decided = D.decided_text(v) or ("re-measured beside the baseline" if v.get("name") == "final" else "")
    return {
        "name": v.get("name", "?"), "transforms": transforms_text(v.get("transforms")), "status": status,
        "status_class": badge_class(status, "s", VARIANT_STATUSES),
        "cells": [
            (fmt_ms(stat(st, "median")), spread_text(st) if st else ""),
            (fmt_ms(D.beside_ms(r, v)), ""),
            (fmt_tput(v.get("throughput_per_s")), ""),
            (text_or_dash(v.get("batch_size")), ""),
            (fmt_mb(v.get("peak_memory_mb")), ""),
            (fmt_x(v.get("expected_speedup")), ""),
            (decided, ""),
            (estimate + fmt_x(v.get("speedup")), f"{iv[0]:.2f}–{iv[1]:.2f}" if iv else ""),
            (fmt_err(v.get("max_rel_error")),
             f"tol {fmt_err(v.get('tolerance'))}" if num(v.get("tolerance")) is not None else ""),
        ],
        "reason": v.get("reason") or "",
    }


def variants(r: dict) -> list[dict]:
    """One table row per variant: name, transforms, status badge, measurements, reason."""
    return [_variant_row(r, v) for v in D.variants(r)]



def distributed(r: dict) -> Optional[dict]:
    """A distributed run's set-up, its per-rank table and the DDP snippet; None for a
    single-process run."""
    if r.get("distributed") is not True:
        return None
    ranks = [{"rank": text_or_dash(p.get("rank")), "host": text_or_dash(p.get("host")),
              "cells": [fmt_ms(p.get("measured_step_time_ms")), fmt_ms(p.get("busy_ms_per_step")),
                        fmt_ms(p.get("collective_wait_ms_per_step"))]} for p in D.per_rank(r)]
    snippet = r.get("ddp_snippet")
    return {"text": D.distributed_text(r), "ranks": ranks,
            "snippet": snippet.rstrip("\n") if isinstance(snippet, str) and snippet.strip() else None}


# ---------------------------------------------------------------------------------------
# plots


def _breakdown_plot(r: dict) -> Optional[P.Plot]:
    before, after = D.before_after(r)
    bl, al = D.batch_label(before), D.batch_label(after)
    bars = [(lbl, D.breakdown(a)) for lbl, a in D.analyses(r) if as_dict(a)]
    if not any(sum(b.values()) > 0 for _, b in bars):
        return None
    if bl and al and bl != al:
        bars = [(f"{lbl} ({bl if lbl == 'baseline' else al})", b) for lbl, b in bars]
    return P.breakdown_plot(bars, "Step-time breakdown, before and after")


def _speedup_plot(r: dict) -> Optional[P.Plot]:
    bars, errors = [], []
    for v in D.variants(r):
        s = num(v.get("speedup"))
        if s is None:
            continue
        status = str(v.get("status", ""))
        name = str(v.get("name", "?"))
        bars.append(P.Bar(name, s, f"{s:.2f}×", f"{name} ({status}): {s:.2f}×",
                          D.STATUS_COLORS.get(status, D.DEFAULT_BAR_COLOR)))
        errors.append(D.speedup_interval(r, v))
    if not bars:
        return None
    return P.hbar_plot(bars, "Speedup per variant (final: measured beside the baseline; others: the product of "
                       "the side-by-side ratios that led there; whiskers: 95 % interval)", "× baseline throughput",
                       ref=1.0, errors=errors)


def _batch_plot(r: dict) -> Optional[P.Plot]:
    rows = [b for b in D.batch_search(r) if num(b.get("batch_size")) is not None]
    if not rows:
        return None
    measured = [b for b in rows if num(b.get("throughput_per_s")) is not None]
    if any(num(b.get("ratio_to_previous")) is not None for b in measured):
        # each size by the ratio that decided it: beside the size before it, with its interval
        # (never the compounded product along the chain)
        judged = [b for b in rows if num(b.get("ratio_to_previous")) is not None or b not in measured]
        pts = [(num(b["batch_size"]), num(b.get("ratio_to_previous")),
                f"{b.get('status', '')}" + (f", beside batch {fmt_num(b['previous_batch_size'], 0)}"
                                           if num(b.get("previous_batch_size")) is not None else ""))
               for b in judged]
        errors = [(num(b["ratio_low"]), num(b["ratio_high"]))
                  if num(b.get("ratio_low")) is not None and num(b.get("ratio_high")) is not None else None
                  for b in judged]
        return P.batch_plot(pts, "Each batch size against the size before it (the ratio that decided it; "
                            "whiskers: 95 % interval)", "batch size", "samples/s over the size before",
                            highlight=D.chosen_batch(r), errors=errors, pairwise=True)
    pts = [(num(b["batch_size"]), num(b.get("throughput_per_s")), str(b.get("status", ""))) for b in rows]
    return P.batch_plot(pts, "Throughput against batch size (batch search; each size measured on its own)",
                        "batch size", "samples/s", highlight=D.chosen_batch(r))


def _top_plot(label: str, a: Any) -> Optional[P.Plot]:
    kind, top = D.top_entries(a)
    if not top:
        return None
    color = D.DEFAULT_BAR_COLOR if label == "baseline" else D.BREAKDOWN_COLORS["cpu_exec"]
    bars = [P.Bar(n, ms, f"{fmt_ms(ms)} ms", f"{n} ({c if c is not None else '?'} calls): "
                  f"{fmt_ms(ms)} ms", color) for n, ms, c in top]
    n = D.traced_steps(a)
    return P.hbar_plot(bars, f"Top {kind}, {label}", f"ms over {n} traced steps" if n else "ms", label_chars=40)


def _grad_norm_plot(r: dict) -> Optional[P.Plot]:
    rows, left = D.health_layers(r, limit=15)
    layers = [(str(x.get("name", "?")), num(x.get("grad_norm_max")) or 0.0, int(num(x.get("nonfinite")) or 0))
              for x in rows]
    if not layers:
        return None
    more = f"; {left} layers between them left out" if left else ""
    return P.grad_norm_plot(layers, f"Gradient norm per layer on the baseline's verification steps (input "
                                    f"side first{more})")


def _figure(kind: str, build: Callable[[], Optional[P.Plot]]) -> Optional[dict]:
    """{"svg": markup, "error": None} of one plot, {"svg": None, "error": why} where
    matplotlib failed on this data, None where the report has nothing to plot."""
    try:
        plot = build()
        if plot is None:
            return None
        return {"svg": Markup(P.svg_markup(plot, kind, plot.title)), "error": None}
    except Exception as e:  # noqa: BLE001 - one odd value must not cost the whole report
        return {"svg": None,
                "error": f"The {kind.replace('_', ' ')} plot could not be drawn: {type(e).__name__}: {e}"}


def plots(r: dict) -> list[dict]:
    """The inline SVG figures: breakdown, speedup, batch search, per-layer gradient norms,
    top kernels/operators."""
    figs = [_figure("breakdown", lambda: _breakdown_plot(r)), _figure("speedup", lambda: _speedup_plot(r)),
            _figure("batch_search", lambda: _batch_plot(r)), _figure("grad_norms", lambda: _grad_norm_plot(r)),
            _figure("convergence", lambda: _convergence_plot(r))]
    figs += [_figure(f"top_{label}", lambda label=label, a=a: _top_plot(label, a)) for label, a in D.analyses(r)]
    return [f for f in figs if f]


# ---------------------------------------------------------------------------------------
# tables and text


def accuracy(r: dict) -> list[list[str]]:
    """Rows of the accuracy table (the model file's evaluate(); none without it)."""
    return [[x["variant"], x["metric"], x["better"], fmt_num(x["baseline"]), fmt_num(x["value"]),
             x["difference_text"], x["allowed_text"], "yes" if x["ok"] else "no"]
            for x in D.accuracy_rows(r)]


def convergence(r: dict) -> list[list[str]]:
    """Rows of the convergence-check table (none when no check ran)."""
    return [[x["variant"], x["lr_rule"], str(x["steps"]), str(x["seeds"]), fmt_num(x["baseline"]),
             f"{fmt_num(x['low'])}-{fmt_num(x['high'])}", fmt_num(x["candidate"]), "yes" if x["ok"] else "no",
             x["reason"]] for x in D.convergence_rows(r)]


def _convergence_plot(r: dict) -> Optional[P.Plot]:
    got = D.convergence_curves(r)
    if got is None:
        return None
    name, base, cand = got
    return P.convergence_plot(base, cand, f"Training loss of {name} beside the configuration without the change "
                                          f"(convergence check, {len(base)} baseline seeds)")


def batch_search(r: dict) -> list[list[str]]:
    """Rows of the batch-size search table: each size with the ratio that decided it."""
    return [[fmt_num(b.get("batch_size"), 0), fmt_tput(b.get("throughput_per_s")), fmt_mb(b.get("peak_memory_mb")),
             D.pairwise_text(b) or "—", str(b.get("status", "?"))]
            for b in D.batch_search(r) if num(b.get("batch_size")) is not None]


def top_tables(r: dict) -> list[dict]:
    """The top kernels or operators of each trace analysis, as tables."""
    out = []
    for label, a in D.analyses(r):
        kind, top = D.top_entries(a)
        if top:
            out.append({"label": label, "kind": kind,
                        "rows": [(n, text_or_dash(c), fmt_ms(ms)) for n, ms, c in top]})
    return out


def _finding(f: dict) -> dict:
    safety = str(f.get("safety", "?"))
    transform = transforms_text([{"name": f.get("transform") or "none", "params": f.get("params")}])
    facts = [("rule", f.get("name", "")), ("transform", transform),
             ("expected speedup", fmt_x(f.get("expected_speedup"))),
             ("predicted step time", f"{fmt_ms(f.get('predicted_step_time_ms'))} ms"),
             ("accepted", accepted_text(f.get("accepted")))]
    return {"anchor": re.sub(r"[^A-Za-z0-9_-]", "", str(f.get("code", ""))), "code": f.get("code", "?"),
            "title": f.get("title", ""), "safety": safety, "safety_class": badge_class(safety, "f", SAFETY_LEVELS),
            "message": f.get("message", ""), "facts": facts, "evidence": list(as_dict(f.get("evidence")).items()),
            "doc": Markup(render_doc_markdown(str(f["doc"]))) if f.get("doc") else None}


def findings(r: dict) -> list[dict]:
    """Each rule that fired, with its facts, evidence and rendered documentation."""
    return [_finding(f) for f in D.findings(r)]


def _diff_class(line: str) -> str:
    if line.startswith(("+++", "---", "diff ", "index ")):
        return "file"
    if line.startswith("@@"):
        return "hunk"
    return {"+": "add", "-": "del"}.get(line[:1], "ctx")


def patch(r: dict) -> Optional[list[tuple[str, str]]]:
    """The patch as (class, line) pairs coloured by kind; None without a patch."""
    p = r.get("patch")
    if not (isinstance(p, str) and p.strip()):
        return None
    return [(_diff_class(line), line) for line in p.splitlines()]


def artifacts(r: dict) -> Optional[dict]:
    """The files the run wrote; those beside report.html get a relative link that works
    wherever the folder goes."""
    arts = as_dict(r.get("artifacts"))
    if not arts:
        return None
    here = Path(str(arts.get("report_html") or "")).parent
    items = []
    for k, v in arts.items():
        if not v:
            continue
        name = Path(str(v)).name
        near = str(here) not in ("", ".") and Path(str(v)).parent == here and re.fullmatch(r"[\w][\w.+-]*", name)
        items.append((k, v, name if near else None))
    return {"files": items, "logdir": f"autoopt view {arts['logdir']}" if arts.get("logdir") else None}


def render_html(report: dict) -> str:
    """report.html for a report dict."""
    r = as_dict(report)
    return environment().get_template("report.html.j2").render(
        head=header(r), summary=summary(r), variants=variants(r), one_story=D.ONE_STORY, distributed=distributed(r),
        plots=plots(r), accuracy=accuracy(r), accuracy_note=D.ACCURACY_NOTE, convergence=convergence(r),
        convergence_note=D.CONVERGENCE_NOTE,
        batch_search=batch_search(r), top=top_tables(r), findings=findings(r), patch=patch(r),
        no_patch=D.no_patch_text(r), artifacts=artifacts(r), patch_note=D.patch_note(r), script=D.script_text(r))
