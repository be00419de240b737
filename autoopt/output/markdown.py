"""report.md: the report as GitHub-flavoured Markdown, one function per section.

Each section function takes the report dict and returns its lines (a trailing blank line
included), or none where the report has nothing for it. Everything from the run goes
through md_text / md_code / a fence (autoopt.safe), so names with Markdown or HTML
in them stay text, and control characters in them (report.md is read with cat too) show as
visible escapes.
"""
from __future__ import annotations

import re

from autoopt.output import data as D
from autoopt.output.format import (
    DASH,
    accepted_text,
    as_dict,
    codes_text,
    error_text,
    fmt_mb,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_tput,
    fmt_x,
    md_code,
    md_text,
    short,
    spread_text,
    stat,
    text_or_dash,
    transforms_text,
)
from autoopt.safe import terminal_text

BATCH_SEMANTICS = ("A different batch size changes training semantics: scale the learning rate and re-check "
                   "convergence.")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A pipe table; cells must already be escaped."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def fence(text: str, lang: str = "") -> list[str]:
    """A fenced code block longer than any backtick run in the text, so it stays verbatim
    (but for control characters, shown as escapes; CRLF line ends become LF)."""
    text = terminal_text(text)
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=0)
    f = "`" * max(3, longest + 1)
    return [f + lang, text.rstrip("\n"), f, ""]


def header(r: dict) -> list[str]:
    """The title and the run's facts: model, device, mode, batch size, seed, versions."""
    meta = [
        ("Model", md_text(r.get("model_path") or D.model_label(r))),
        ("Device", md_text(D.device_text(r))),
        ("Mode", md_text(r.get("mode") or DASH)),
        ("Batch size", md_text(text_or_dash(r.get("batch_size")))),
        ("Seed", md_text(text_or_dash(r.get("seed")))),
        ("Created", md_text(r.get("created_at") or DASH)),
        ("Versions", md_text(f"autoopt {r.get('autoopt_version') or '?'}, torch {r.get('torch_version') or '?'}")),
    ]
    return [f"# autoopt report: {md_text(D.model_label(r))}", ""] + [f"- **{k}:** {v}" for k, v in meta] + [""]


def result(r: dict) -> list[str]:
    """The final speedup with the throughput and step time before and after, and what was kept."""
    out = ["## Result", ""]
    if r.get("interrupted"):
        out += ["**Interrupted:** the run was stopped; this report holds what was measured until then.", ""]
    fin = as_dict(r.get("final"))
    if D.final_speedup(r)[0] is None:
        out += ["No final configuration was measured (the run failed or was interrupted before "
                "the final measurement); see the variants below for what was measured.", ""]
        return out + ([md_text(fin["note"]), ""] if fin.get("note") else [])
    before, after = D.before_after(r)
    bst, fst = as_dict(before.get("step_time_ms")), as_dict(after.get("step_time_ms"))
    remeasured = " (the baseline re-measured side by side)" if D.remeasured(r) else ""
    return out + _headline(r) + [
        f"**{md_text(D.speedup_text(r))}** in throughput{remeasured}: "
        f"{fmt_tput(before.get('throughput_per_s'))} → {fmt_tput(after.get('throughput_per_s'))} samples/s; "
        f"{fmt_ms(stat(bst, 'median'))} ms per step at {md_text(D.batch_label(before) or '?')} → "
        f"{fmt_ms(stat(fst, 'median'))} ms at {md_text(D.batch_label(after) or '?')} (medians).",
        "",
        f"Kept: {md_text(codes_text(fin.get('codes'), ', ') or 'nothing')} "
        f"({md_code(transforms_text(fin.get('transforms')))}).",
        "",
    ] + not_applied(r)


def _headline(r: dict) -> list[str]:
    """The speedup with training unchanged, first; the one with a change of training named as such."""
    fs, _, _, how = D.fixed_batch(r)
    if fs is None and not how:
        return []
    out = [f"**Speedup: {md_text(D.headline_text(r))}.**", ""]
    if how:
        out += [f"Training unchanged (same batch size and semantics): {md_text(how)}.", ""]
    if D.semantic_text(r):
        out += [f"The final configuration below changes training ({md_text(D.semantic_text(r))}); its speedup:", ""]
    return out


def not_applied(r: dict) -> list[str]:
    """The findings not applied because they change training, with how to apply them."""
    lines = D.manual_skip_lines(r)
    if not lines:
        return []
    return (["Not applied, because they change training (`--yes` accepts only transforms that keep training "
             "the same):", ""] + [f"- {md_text(x)}" for x in lines] + [""])


def notes(r: dict) -> list[str]:
    """The run's notes as a list."""
    ns = D.notes(r)
    return ["## Notes", ""] + [f"- {md_text(n)}" for n in ns] + [""] if ns else []


def baseline(r: dict) -> list[str]:
    """The baseline measurement: step-time statistics, throughput, memory, MFU, FLOPs."""
    base = as_dict(r.get("baseline"))
    if not base:
        return ["## Baseline", "", "The baseline was not measured.", ""]
    st = as_dict(base.get("step_time_ms"))
    mean_sd = f"{fmt_ms(stat(st, 'mean'))} ± {fmt_ms(stat(st, 'stdev'))}" if stat(st, "mean") is not None else DASH
    return ["## Baseline", ""] + md_table(
        ["Step time median (ms)", "p25–p75 (ms)", "Mean ± stdev (ms)", "Steps", "Samples/s",
         "Peak memory (MB)", "MFU", "FLOPs/step", "Batch"],
        [[fmt_ms(stat(st, "median")), spread_text(st), mean_sd, md_text(st.get("n", DASH)),
          fmt_tput(base.get("throughput_per_s")), fmt_mb(base.get("peak_memory_mb")), fmt_pct(base.get("mfu")),
          fmt_num(base.get("flops_per_step")), md_text(base.get("batch_size", r.get("batch_size", DASH)))]],
    )


def _variant_row(r: dict, v: dict) -> list[str]:
    st = v.get("step_time_ms")
    iv = D.speedup_interval(r, v)
    sp = fmt_x(v.get("speedup")) + (f" ({fmt_x(iv[0])}–{fmt_x(iv[1])})" if iv else "")
    if v.get("name") not in ("final", "baseline") and D.decision(v):
        sp = "≈" + sp
    decided = D.decided_text(v) or ("re-measured beside the baseline" if v.get("name") == "final" else DASH)
    return [
        md_code(v.get("name", "?")), md_text(codes_text(v.get("codes"), ", ") or DASH),
        md_code(transforms_text(v.get("transforms"))), f"**{md_text(v.get('status', '?'))}**",
        fmt_ms(stat(st, "median")), spread_text(st), fmt_ms(D.beside_ms(r, v)), fmt_tput(v.get("throughput_per_s")),
        md_text(text_or_dash(v.get("batch_size"))), fmt_mb(v.get("peak_memory_mb")),
        fmt_x(v.get("expected_speedup")), md_text(decided), sp, error_text(v), md_text(v.get("reason") or ""),
    ]


def variants(r: dict) -> list[str]:
    """One table row per measured (or failed, or skipped) variant, each with the numbers of
    the measurement that decided it (data.ONE_STORY)."""
    vs = D.variants(r)
    if not vs:
        return ["## Variants", "", "No variant was measured.", ""]
    return ["## Variants", "", md_text(D.ONE_STORY), ""] + md_table(
        ["Variant", "Codes", "Transforms", "Status", "Median (ms)", "p25–p75 (ms)", "Beside (ms)", "Samples/s",
         "Batch", "Peak MB", "Predicted", "Decided by", "× baseline (95 % interval)", "Max rel. error", "Reason"],
        [_variant_row(r, v) for v in vs])


def final(r: dict) -> list[str]:
    """The final configuration: transforms, codes, step time, throughput, memory, speedup."""
    fin = as_dict(r.get("final"))
    if not fin:
        return ["## Final configuration", "", "No final configuration.", ""]
    fst = as_dict(fin.get("step_time_ms"))
    return ["## Final configuration", "",
            f"- **Transforms:** {md_code(transforms_text(fin.get('transforms')))}",
            f"- **Codes:** {md_text(codes_text(fin.get('codes'), ', ') or 'none')}",
            f"- **Step time:** {fmt_ms(stat(fst, 'median'))} ms median ({spread_text(fst)} ms p25–p75, "
            f"n={md_text(fst.get('n', DASH))})",
            f"- **Throughput:** {fmt_tput(fin.get('throughput_per_s'))} samples/s at batch size "
            f"{md_text(fin.get('batch_size', r.get('batch_size', DASH)))}",
            f"- **Peak memory:** {fmt_mb(fin.get('peak_memory_mb'))} MB",
            f"- **Speedup:** {md_text(D.speedup_text(r))}"
            + (f" (with {md_text(D.semantic_text(r))}, which changes training)" if D.semantic_text(r) else ""),
            ] + ([f"- **Speedup with training unchanged:** {md_text(D.headline_text(r).split('; ')[0])}"]
                 if D.fixed_batch(r)[0] is not None else []) + [""]


def accuracy(r: dict) -> list[str]:
    """The model file's evaluate() metrics, baseline and each evaluated variant side by side
    (none without evaluate())."""
    rows = D.accuracy_rows(r)
    if not rows:
        return []
    return ["## Accuracy", "", md_text(D.ACCURACY_NOTE), ""] + md_table(
        ["Variant", "Metric", "Better", "Baseline", "Variant value", "Difference", "Allowed", "Within tolerance"],
        [[md_code(x["variant"]), md_text(x["metric"]), x["better"], fmt_num(x["baseline"]), fmt_num(x["value"]),
          x["difference_text"], f"{x['allowed_text']} at most ({fmt_num(x['tolerance'])} tolerance)",
          "yes" if x["ok"] else "**no**"] for x in rows])


def convergence(r: dict) -> list[str]:
    """The convergence check of each accepted change of training (none when not run)."""
    rows = D.convergence_rows(r)
    if not rows:
        return []
    return ["## Convergence check", "", md_text(D.CONVERGENCE_NOTE), ""] + md_table(
        ["Variant", "Learning-rate rule", "Steps", "Seeds", "Baseline loss", "Band", "Candidate loss", "Kept",
         "Why"],
        [[md_code(x["variant"]), md_text(x["lr_rule"]), str(x["steps"]), str(x["seeds"]), fmt_num(x["baseline"]),
          f"{fmt_num(x['low'])}-{fmt_num(x['high'])}", fmt_num(x["candidate"]), "yes" if x["ok"] else "**no**",
          md_text(x["reason"])] for x in rows])


def script(r: dict) -> list[str]:
    """The training script an `optimize --script` run drove, and how reproducible it was."""
    text = D.script_text(r)
    return ["## Script", "", md_text(text), ""] if text else []


def distributed(r: dict) -> list[str]:
    """A distributed run's set-up, one row per rank, and the DDP snippet for a torchrun script."""
    if r.get("distributed") is not True:
        return []
    out = ["## Distributed (DDP)", "", md_text(D.distributed_text(r)), ""]
    rows = [[md_text(text_or_dash(p.get("rank"))), md_text(text_or_dash(p.get("host"))),
             fmt_ms(p.get("measured_step_time_ms")), fmt_ms(p.get("busy_ms_per_step")),
             fmt_ms(p.get("collective_wait_ms_per_step"))] for p in D.per_rank(r)]
    if rows:
        out += md_table(["Rank", "Host", "Measured step (ms)", "Busy (ms/step)", "Collective wait (ms/step)"], rows)
    else:
        out += ["No per-rank measurement.", ""]
    snippet = r.get("ddp_snippet")
    if isinstance(snippet, str) and snippet.strip():
        out += ["For your own torchrun script:", ""] + fence(snippet, "python")
    return out


def search(r: dict) -> list[str]:
    """How the variants were searched: strategy, variants tried, time and its budget, the
    noise check, what the budget left unmeasured and the calls too close to settle."""
    info = D.search_info(r)
    if not info["line"]:
        return []
    out = ["## Search", "", md_text(info["line"]), ""]
    if info["noise"]:
        out += [md_text(info["noise"][:1].upper() + info["noise"][1:]) + ".", ""]
    if info["unmeasured"]:
        out += ["Not measured (the time budget was spent before their turn; `--time-budget` gives more): "
                + ", ".join(md_text(x) for x in info["unmeasured"]) + ".", ""]
    if info["unsettled"]:
        out += ["Too close to call (not kept; the interval of the ratio holds both a gain and none):", ""]
        out += md_table(["Variant", "Ratio", "95 % interval", "Rounds", "Against", "Why"],
                        [[md_text(u["variant"]), md_text(u["ratio"]), md_text(u["interval"]), md_text(u["rounds"]),
                          md_text(u["anchor"]), md_text(u["why"])] for u in info["unsettled"]])
        out.append("")
    return out


def batch_search(r: dict) -> list[str]:
    """Each batch size tried, its throughput, memory and outcome."""
    bs = D.batch_search(r)
    if not bs:
        return []
    return ["## Batch-size search", "", f"Chosen by throughput, within the memory budget. {BATCH_SEMANTICS} "
            "Each size is judged by its samples/s over the size before it, measured side by side: that ratio, "
            "with its 95 % interval, decided (not a product along the chain).",
            ""] + md_table(["Batch size", "Samples/s", "Peak memory (MB)", "× size before (deciding ratio)",
                            "Status"],
                           [[md_text(b.get("batch_size", "?")), fmt_tput(b.get("throughput_per_s")),
                             fmt_mb(b.get("peak_memory_mb")), md_text(D.pairwise_text(b) or DASH),
                             md_text(b.get("status", "?"))] for b in bs])


def trace_analysis(r: dict) -> list[str]:
    """The step-time breakdown of the baseline and final traces, and their top kernels or
    operators."""
    (_, ab), (_, af) = D.analyses(r)
    if not (as_dict(ab) or as_dict(af)):
        return []
    bb, bf = D.breakdown(ab), D.breakdown(af)
    rows = [[D.BREAKDOWN_LABELS[k], fmt_ms(bb[k]) if as_dict(ab) else DASH, fmt_ms(bf[k]) if as_dict(af) else DASH]
            for k in D.BREAKDOWN_KEYS if bb[k] or bf[k]]
    before, after = D.before_after(r)
    head = ["Category", f"Baseline ({md_text(D.batch_label(before) or '?')})",
            f"Final ({md_text(D.batch_label(after) or '?')})"]
    out = ["## Step-time breakdown (ms per step)", ""]
    out += md_table(head, rows) if rows else ["All categories are zero.", ""]
    for label, a in D.analyses(r):
        kind, top = D.top_entries(a)
        if top:
            n = D.traced_steps(a)
            out += [f"### Top {kind}, {label}", "", f"Totals over the {n} traced steps." if n else "", ""]
            out += md_table(["Name", "Calls", "Time (ms)"], [[md_code(short(name, 120)), md_text(text_or_dash(c)),
                                                              fmt_ms(ms)] for name, ms, c in top])
    return out


def _finding(f: dict) -> list[str]:
    out = [f"### {md_text(f.get('code', '?'))} {md_text(f.get('name', ''))}: {md_text(f.get('title', ''))}", ""]
    if f.get("message"):
        out += [md_text(f["message"]), ""]
    transform = transforms_text([{"name": f.get("transform") or "none", "params": f.get("params")}])
    out.append(f"- **Safety:** {md_text(f.get('safety', '?'))}; **transform:** {md_code(transform)}; "
               f"**expected speedup:** {fmt_x(f.get('expected_speedup'))}; "
               f"**accepted:** {accepted_text(f.get('accepted'))}")
    ev = as_dict(f.get("evidence"))
    if ev:
        out.append("- **Evidence:** " + ", ".join(f"{md_code(k)} = {md_code(v)}" for k, v in ev.items()))
    return out + [f"- Documentation: {md_code('autoopt explain ' + str(f.get('code', '')))}", ""]


def _sci(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else DASH


def health(r: dict) -> list[str]:
    """Gradient health of the baseline's verification steps: a line of totals and a short
    per-layer table (the layers with the largest and smallest gradient norms)."""
    h = as_dict(r.get("health"))
    if not h.get("steps"):
        return []
    losses = [x for x in h.get("loss") or [] if x is not None]
    norms = [x for x in h.get("grad_norm") or [] if x is not None]
    scaler = as_dict(h.get("grad_scaler"))
    line = (f"Over the baseline's {h['steps']} verification steps: loss {_sci(losses[0] if losses else None)} -> "
            f"{_sci(losses[-1] if losses else None)}, total gradient norm {_sci(norms[0] if norms else None)} -> "
            f"{_sci(norms[-1] if norms else None)}, median update/weight ratio {_sci(h.get('update_ratio'))} "
            f"(norm ~1e-3), inf/NaN gradient elements {h.get('nonfinite_grads', 0)}")
    if scaler:
        line += f", GradScaler skipped {scaler.get('skipped_steps', 0)} step(s)"
    rows, left = D.health_layers(r)
    out = ["## Gradient health", "", md_text(line + "."), ""]
    out += md_table(["Layer", "Grad norm (step 1)", "Grad norm (last)", "Update/weight", "inf/NaN"],
                    [[md_code(short(str(x.get("name", "?")), 80)), _sci(x.get("grad_norm")),
                      _sci(x.get("grad_norm_last")), _sci(x.get("update_ratio")), md_text(str(x.get("nonfinite", 0)))]
                     for x in rows])
    if left:
        out += [f"The {len(rows) // 2} layers with the largest and the smallest gradient norms, in the model's "
                    f"order; {left} more in report.json's `health.layers`.", ""]
    return out


def findings(r: dict) -> list[str]:
    """Each rule that fired: message, safety, transform, evidence, where its docs are."""
    fs = D.findings(r)
    out = ["## Findings", ""]
    if not fs:
        return out + ["No rule fired.", ""]
    for f in fs:
        out += _finding(f)
    return out


def patch(r: dict) -> list[str]:
    """The unified diff against the model file, in a diff fence."""
    p = r.get("patch")
    if isinstance(p, str) and p.strip():
        return ["## Patch", "", md_text(D.patch_note(r)), ""] + fence(p, "diff")
    return ["## Patch", "", md_text(D.no_patch_text(r)), ""]


def artifacts(r: dict) -> list[str]:
    """The files the run wrote, and how to open its TensorBoard logs."""
    arts = as_dict(r.get("artifacts"))
    if not arts:
        return []
    out = ["## Artifacts", ""] + [f"- {md_text(k)}: {md_code(v)}" for k, v in arts.items() if v] + [""]
    if arts.get("logdir"):
        out += [f"View the traces and summaries with {md_code('autoopt view ' + str(arts['logdir']))}.", ""]
    return out


SECTIONS = (header, result, notes, script, baseline, variants, final, accuracy, convergence, distributed, search,
            batch_search, trace_analysis, health, findings, patch, artifacts)


def render_markdown(report: dict) -> str:
    """report.md for a report dict."""
    r = as_dict(report)
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(r)
    return "\n".join(lines).rstrip("\n") + "\n"
