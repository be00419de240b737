"""What the renderers read from a report dict (report.json): the variants, the final speedup
and its spread, the before/after pair, the device, the trace analyses, the batch search
and the distributed facts, each read defensively (any part may be null or malformed).

Also the fixed vocabularies of the outputs: the step-time categories with their labels and
colours, and the colour of each variant status.
"""
from __future__ import annotations

from typing import Any, Optional

from autoopt.output.format import DASH, as_dict, as_list, fmt_x, num, stat

BREAKDOWN_KEYS = ("kernel", "memcpy", "memset", "communication", "runtime", "dataloader", "cpu_exec", "other")
BREAKDOWN_LABELS = {
    "kernel": "GPU kernels",
    "memcpy": "memcpy",
    "memset": "memset",
    "communication": "communication",
    "runtime": "CUDA runtime",
    "dataloader": "data loading",
    "cpu_exec": "CPU execution",
    "other": "other",
}
BREAKDOWN_COLORS = {
    "kernel": "#4c78a8",
    "memcpy": "#f58518",
    "memset": "#e45756",
    "communication": "#72b7b2",
    "runtime": "#eeca3b",
    "dataloader": "#b279a2",
    "cpu_exec": "#54a24b",
    "other": "#9d9da0",
}
STATUS_COLORS = {"kept": "#2e7d32", "rejected": "#c62828", "failed": "#6d6d6d", "skipped": "#b0b0b0"}
DEFAULT_BAR_COLOR = "#4c78a8"


def variants(report: dict) -> list[dict]:
    """The variants that are dicts."""
    return [v for v in as_list(report.get("variants")) if isinstance(v, dict)]


def findings(report: dict) -> list[dict]:
    """The findings that are dicts."""
    return [f for f in as_list(report.get("findings")) if isinstance(f, dict)]


def notes(report: dict) -> list:
    """The report's non-empty notes."""
    return [n for n in as_list(report.get("notes")) if n]


def decision(variant: dict) -> dict:
    """The variant's keep decision (ratio over its anchor, interval, rounds), {} when none."""
    return as_dict(variant.get("decision"))


def decided_text(variant: dict) -> str:
    """'1.12× the baseline (1.05–1.19×, 6 rounds)': the measurement that decided the variant;
    '' without a decision."""
    d = decision(variant)
    ratio = num(d.get("ratio"))
    if ratio is None:
        return ""
    low, high = num(d.get("low")), num(d.get("high"))
    rounds = num(d.get("rounds"))
    inner = [f"{fmt_x(low)}–{fmt_x(high)}"] if low is not None and high is not None else []
    inner.append(f"{rounds:.0f} rounds" if rounds else "measured apart")
    return f"{fmt_x(ratio)} {d.get('anchor') or 'its anchor'} ({', '.join(inner)})"


def beside_ms(report: dict, variant: dict) -> Optional[float]:
    """The median step time of the configuration a variant was measured beside, in the same
    rounds (its anchor; for the final variant, the baseline re-measured with it)."""
    if variant.get("name") == "final":
        before = as_dict(as_dict(report.get("final")).get("baseline_remeasured"))
        return stat(as_dict(before.get("step_time_ms")), "median")
    return num(decision(variant).get("anchor_step_time_ms"))


ONE_STORY = ("Each row's step times are its own, from the alternating rounds that decided it; \"beside\" is the "
             "configuration it had to beat, measured in the same rounds. \"Decided by\" is that ratio with its 95 % "
             "interval. \"× baseline\" multiplies the ratios that led to the row (an estimate); the final row is "
             "measured beside the baseline itself.")


def speedup_interval(report: dict, variant: dict) -> Optional[tuple[float, float]]:
    """The interval of a variant's speedup over the baseline. The final variant: the report's
    speedup_low/high. A variant decided side by side: the 95 % interval of the ratio that
    decided it, carried to the baseline by the same factor as the ratio (its speedup is that
    ratio times its anchor's). Otherwise (older reports) the quartiles of its and the
    baseline's step times: the low end pairs the fastest quarter of the baseline with the
    slowest quarter of the variant, the high end the reverse."""
    s = num(variant.get("speedup"))
    if s is None or variant.get("name") == "baseline":  # the reference itself: 1.00x by definition
        return None
    if variant.get("name") == "final":
        fin = as_dict(report.get("final"))
        lo, hi = num(fin.get("speedup_low")), num(fin.get("speedup_high"))
        if lo is not None and hi is not None:
            return (min(lo, s), max(hi, s))
    d = decision(variant)
    ratio, low, high = num(d.get("ratio")), num(d.get("low")), num(d.get("high"))
    if ratio and low is not None and high is not None and ratio > 0:
        return (s * low / ratio, s * high / ratio)
    base = as_dict(as_dict(report.get("baseline")).get("step_time_ms"))
    var = as_dict(variant.get("step_time_ms"))
    bm, b25, b75 = stat(base, "median"), stat(base, "p25"), stat(base, "p75")
    vm, v25, v75 = stat(var, "median"), stat(var, "p25"), stat(var, "p75")
    if None in (bm, b25, b75, vm, v25, v75) or min(bm, b25, vm, v25, v75) <= 0:
        return None
    lo = s * (b25 / bm) / (v75 / vm)
    hi = s * (b75 / bm) / (v25 / vm)
    return (min(lo, s), max(hi, s))


def final_speedup(report: dict) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(speedup, low, high) of the final configuration; the spread derived from the final
    variant's quartiles where the report does not give it."""
    fin = as_dict(report.get("final"))
    s = num(fin.get("speedup"))
    lo, hi = num(fin.get("speedup_low")), num(fin.get("speedup_high"))
    if s is not None and (lo is None or hi is None):
        for v in variants(report):
            if v.get("name") == "final":
                iv = speedup_interval(report, v)
                if iv:
                    lo, hi = iv
    return s, lo, hi


def speedup_text(report: dict) -> str:
    """'1.52× (spread 1.48×–1.57×)', or 'no final measurement'."""
    s, lo, hi = final_speedup(report)
    if s is None:
        return "no final measurement"
    if lo is not None and hi is not None:
        return f"{fmt_x(s)} (spread {fmt_x(lo)}–{fmt_x(hi)})"
    return fmt_x(s)


def before_after(report: dict) -> tuple[dict, dict]:
    """The two measurements behind the final speedup: the baseline as re-measured side by
    side with the final configuration where the report has it (final.baseline_remeasured),
    else the first baseline; and the final configuration."""
    fin = as_dict(report.get("final"))
    before = as_dict(fin.get("baseline_remeasured")) or as_dict(report.get("baseline"))
    if "batch_size" not in before and report.get("batch_size") is not None:
        before = dict(before, batch_size=report.get("batch_size"))
    return before, fin


def remeasured(report: dict) -> bool:
    """Whether the final speedup compares with a baseline re-measured side by side."""
    return bool(as_dict(as_dict(report.get("final")).get("baseline_remeasured")))


def batch_label(m: dict) -> str:
    """'batch 32' for a measurement with a batch size, else ''."""
    bs = m.get("batch_size")
    return f"batch {bs}" if bs is not None else ""


def device_name(report: dict) -> str:
    """The device's name, else its type, else 'unknown'."""
    dev = as_dict(report.get("device"))
    return str(dev.get("name") or dev.get("type") or "unknown")


def device_detail(report: dict) -> str:
    """Type, compute capability and memory of the report's device: 'cuda · sm 8.0 · 40 GiB'."""
    dev = as_dict(report.get("device"))
    parts = [str(dev["type"])] if dev.get("type") else []
    if dev.get("compute_capability"):
        parts.append(f"sm {dev['compute_capability']}")
    mem = num(dev.get("total_memory_mb"))
    if mem:
        parts.append(f"{mem / 1024:,.0f} GiB")
    return " · ".join(parts)


def device_text(report: dict) -> str:
    """'NVIDIA A100 (cuda · sm 8.0 · 40 GiB)'."""
    dev = as_dict(report.get("device"))
    name = str(dev.get("name") or dev.get("type") or "unknown device")
    detail = device_detail(report)
    return f"{name} ({detail})" if detail and detail != name else name


def model_label(report: dict) -> str:
    """The model's name, or 'model'."""
    return str(report.get("model") or "model")


def analyses(report: dict) -> list[tuple[str, Any]]:
    """[("baseline", analysis), ("final", analysis)]: the two trace analyses, either may be
    anything (None, malformed)."""
    a = as_dict(report.get("analysis"))
    return [("baseline", a.get("baseline")), ("final", a.get("final"))]


def _op_ms(o: dict, gpu: bool) -> Optional[float]:
    """An operator's self time: `self_ms`, or autoopt analyze's device_self_ms (GPU traces,
    where it is non-zero) / host_self_ms, then the totals."""
    keys = ("self_ms", "device_self_ms", "host_self_ms") if gpu else ("self_ms", "host_self_ms")
    for k in keys + ("total_ms", "host_total_ms"):
        v = num(o.get(k))
        if v is not None and (v > 0 or k == keys[-1]):
            return v
    return None


def top_entries(analysis: Any, limit: int = 10) -> tuple[str, list[tuple[str, float, Optional[int]]]]:
    """('kernels'|'operators', [(name, ms, calls)]) of one trace analysis, totals over the
    traced steps: kernels where the trace has any (a GPU run), else operators by self time
    (a CPU run)."""
    a = as_dict(analysis)
    out = []
    for k in as_list(a.get("top_kernels")):
        if isinstance(k, dict) and num(k.get("total_ms")) is not None:
            out.append((str(k.get("name", "?")), num(k["total_ms"]), k.get("calls")))
    if out:
        out.sort(key=lambda r: -r[1])
        return "kernels", out[:limit]
    gpu = as_dict(a.get("device")).get("type") == "cuda"
    for o in as_list(a.get("top_operators")):
        if not isinstance(o, dict):
            continue
        ms = _op_ms(o, gpu)
        if ms is not None:
            out.append((str(o.get("name", "?")), ms, o.get("calls")))
    out.sort(key=lambda r: -r[1])
    return "operators", out[:limit]


def traced_steps(analysis: Any) -> Optional[int]:
    """The number of steps a trace analysis covers, or None."""
    n = as_dict(analysis).get("steps")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def breakdown(analysis: Any) -> dict[str, float]:
    """ms per step by category (BREAKDOWN_KEYS) of one trace analysis; 0 where missing."""
    bd = as_dict(as_dict(analysis).get("breakdown_ms"))
    return {k: num(bd.get(k)) or 0.0 for k in BREAKDOWN_KEYS}


def batch_search(report: dict) -> list[dict]:
    """The batch-search entries that are dicts."""
    return [b for b in as_list(report.get("batch_search")) if isinstance(b, dict)]


def chosen_batch(report: dict) -> Optional[float]:
    """The batch size the search chose (its "chosen" entry), else the one a batch_size
    transform of a variant sets."""
    for b in batch_search(report):
        if b.get("status") == "chosen" and num(b.get("batch_size")) is not None:
            return num(b["batch_size"])
    chosen = None
    for v in variants(report):
        for t in as_list(v.get("transforms")):
            if isinstance(t, dict) and t.get("name") == "batch_size":
                chosen = num(as_dict(t.get("params")).get("batch_size")) or chosen
    return chosen


def per_rank(report: dict) -> list[dict]:
    """The per-rank rows of a distributed report."""
    return [r for r in as_list(report.get("per_rank")) if isinstance(r, dict)]


def distributed_text(report: dict) -> str:
    """One sentence on a distributed run's set-up: processes, backend, world size, batches."""
    def val(k: str) -> str:
        v = report.get(k)
        return "?" if v is None else str(v)

    return (f"{val('nproc')} processes per node, backend {val('backend')}, world size {val('world_size')}, "
            f"per-rank batch {val('batch_size')} (global {val('global_batch_size')}). "
            "Step times are the slowest rank's.")


def search_info(report: dict) -> dict[str, Any]:
    """The search's story in plain text: its cost and time budget, the noise check, the
    variants the budget left unmeasured and the calls too close to settle (each with its
    ratio, interval, rounds, anchor and why)."""
    s = as_dict(report.get("search"))
    if not s:
        return {"line": "", "noise": None, "unmeasured": [], "unsettled": []}
    tried = s.get("variants_tried", "?")
    line = f"{s.get('strategy', '?')} search, {tried} variant{'' if tried == 1 else 's'} tried in "
    line += f"{num(s.get('time_s')) or 0:.1f} s"
    budget = num(s.get("time_budget_s"))
    if budget:
        line += f"; time budget {budget:.0f} s" + (" (spent)" if s.get("budget_spent") else "")
    elif "time_budget_s" in s:
        line += "; no time budget"
    noise = as_dict(s.get("noise"))
    unsettled = []
    for u in as_list(s.get("unsettled")):
        u = as_dict(u)
        if num(u.get("ratio")) is None:
            continue
        low, high = num(u.get("low")), num(u.get("high"))
        unsettled.append({"variant": str(u.get("variant", "?")), "ratio": fmt_x(u.get("ratio")),
                          "interval": f"{fmt_x(low)}–{fmt_x(high)}" if low and high else "?",
                          "rounds": str(u.get("rounds", "?")), "anchor": str(u.get("anchor", "?")),
                          "why": str(u.get("why", ""))})
    return {"line": line + ".", "noise": str(noise["message"]) if isinstance(noise.get("message"), str) else None,
            "unmeasured": [str(x) for x in as_list(s.get("unmeasured"))], "unsettled": unsettled}


def no_patch_text(r: dict) -> str:
    """Why there is no patch: nothing kept, or the patched file failed its check."""
    check = as_dict(r.get("patch_check"))
    if check and not check.get("ok", True):
        return (f"No patch: the patched model file failed autoopt's check, so no patch was written "
                f"({check.get('reason')}). The kept transforms are in plan.json.")
    return "No patch: no transform was kept."


ACCURACY_NOTE = ("The model file's evaluate(model) after the same training steps from the same seed (verification's), "
                 "baseline and variant side by side. A metric is better higher unless its name says loss; a variant "
                 "whose metric got worse by more than the allowed margin is rejected.")


def _accuracy_entries(report: dict) -> list[tuple[str, dict]]:
    """(name, accuracy) of each variant evaluated, then the final configuration's when no
    variant named final carries it."""
    out = [(str(v.get("name", "?")), as_dict(v.get("accuracy"))) for v in variants(report)]
    out = [(n, a) for n, a in out if a]
    fin = as_dict(as_dict(report.get("final")).get("accuracy"))
    if fin and not any(n == "final" for n, _ in out):
        out.append(("final", fin))
    return out


CONVERGENCE_NOTE = ("An accepted change of training (a larger batch with its scaled learning rate, gradient "
                    "accumulation) trained beside the configuration without it for the same number of optimizer "
                    "steps; the band is the spread of the baseline's smoothed final loss over its seeds. The change "
                    "is kept only when its smoothed final loss lies within or below the band.")


def convergence_rows(report: dict) -> list[dict[str, Any]]:
    """One row per variant that ran the convergence check."""
    rows = []
    for v in variants(report):
        c = as_dict(v.get("convergence"))
        if not c:
            continue
        band = as_list(c.get("band")) + [None, None]
        rule = as_dict(v.get("lr_rule"))
        rows.append({"variant": str(v.get("name", "?")), "steps": c.get("steps"),
                     "seeds": len(as_list(c.get("seeds"))), "baseline": num(c.get("baseline_final_loss")),
                     "low": num(band[0]), "high": num(band[1]), "candidate": num(c.get("candidate_final_loss")),
                     "ok": bool(c.get("ok")), "reason": str(c.get("reason") or ""),
                     "lr_rule": (f"{rule.get('rule')} x{num(rule.get('factor')) or 0:g}"
                                 + (f", warm-up {rule.get('warmup_steps')} steps" if rule.get("warmup_steps") else "")
                                 if rule else DASH)})
    return rows


def convergence_curves(report: dict) -> Optional[tuple[str, list[list[float]], list[float]]]:
    """(variant name, baseline curves, candidate curve) of the first variant with curves."""
    for v in variants(report):
        c = as_dict(v.get("convergence"))
        base, cand = as_list(c.get("baseline_curves")), as_list(c.get("candidate_curve"))
        if base and cand:
            return str(v.get("name", "?")), [[num(x) for x in as_list(b)] for b in base], [num(x) for x in cand]
    return None


def accuracy_rows(report: dict) -> list[dict[str, Any]]:
    """One row per evaluated variant and metric: the baseline's value, the variant's, their
    difference, the margin allowed (the tolerance that decided) and whether it held."""
    rows = []
    for name, acc in _accuracy_entries(report):
        base, var, diff, allowed = (as_dict(acc.get(k)) for k in ("baseline", "variant", "difference", "allowed"))
        higher = as_dict(acc.get("higher_is_better"))
        for metric, b in base.items():
            d, a, up = num(diff.get(metric)), num(allowed.get(metric)), bool(higher.get(metric, True))
            rows.append({"variant": name, "metric": str(metric), "baseline": num(b), "value": num(var.get(metric)),
                         "difference": d, "allowed": a, "better": "higher" if up else "lower",
                         "difference_text": DASH if d is None else f"{d:+.4g}",
                         # the worst change allowed: a drop for a metric better higher, a rise for a loss
                         "allowed_text": DASH if a is None else f"{'-' if up else '+'}{a:.4g}",
                         "ok": bool(acc.get("ok")), "tolerance": num(acc.get("tolerance")),
                         "steps": acc.get("steps")})
    return rows


def pairwise_text(row: dict) -> str:
    """The ratio that decided a batch size: '1.42× batch 64 (1.38×–1.46×, side by side)', or ''
    (the start size, or a size not measured)."""
    ratio, prev = num(row.get("ratio_to_previous")), num(row.get("previous_batch_size"))
    if ratio is None or prev is None:
        return ""
    lo, hi = num(row.get("ratio_low")), num(row.get("ratio_high"))
    how = "side by side" if row.get("side_by_side") is not False else "measured apart"
    iv = f"{fmt_x(lo)}–{fmt_x(hi)}, " if lo is not None and hi is not None else ""
    return f"{fmt_x(ratio)} batch {prev:.0f} ({iv}{how})"


def manual_skipped(report: dict) -> list[dict]:
    """The findings not applied because they change training and nobody named them: skipped,
    not accepted, safety `manual`."""
    return [v for v in variants(report) if v.get("status") == "skipped" and v.get("accepted") is False
            and v.get("safety") == "manual" and not str(v.get("reason") or "").startswith(ADVICE_PREFIX)]


ADVICE_PREFIX = "advice only on a script: "


def advice_lines(report: dict) -> list[str]:
    """`optimize --script`: the findings hooks cannot apply to a script, one line each with the
    reason ('AO402 (batch_size): autoopt does not change the batch a script builds ...')."""
    out = []
    for v in variants(report):
        reason = str(v.get("reason") or "")
        if v.get("status") == "skipped" and reason.startswith(ADVICE_PREFIX):
            names = [str(as_dict(t).get("name", "?")) for t in as_list(v.get("transforms"))]
            out.append(f"{v.get('name')} ({', '.join(names) or '?'}): {reason[len(ADVICE_PREFIX):]}")
    return out


def manual_skip_lines(report: dict) -> list[str]:
    """'AO402 (batch_size): changes training; pass --accept AO402 to try it', one per finding."""
    out = []
    for v in manual_skipped(report):
        code = str(v.get("name") or "?")
        names = [str(as_dict(t).get("name", "?")) for t in as_list(v.get("transforms"))]
        out.append(f"{code} ({', '.join(names) or '?'}): changes training; pass --accept {code} to try it")
    return out


def fixed_batch(report: dict) -> tuple[Optional[float], Optional[float], Optional[float], str]:
    """(speedup, low, high, how) with training unchanged (final.fixed_batch_*); Nones and ''
    where the report does not have it (older reports, no final)."""
    fin = as_dict(report.get("final"))
    s = num(fin.get("fixed_batch_speedup"))
    return s, num(fin.get("fixed_batch_low")), num(fin.get("fixed_batch_high")), str(fin.get("fixed_batch_how") or "")


def semantic_text(report: dict) -> str:
    """What the final configuration changes in training ('batch size 16 -> 128'), or ''."""
    return str(as_dict(report.get("final")).get("semantic_changes") or "")


def headline_text(report: dict) -> str:
    """The headline: the speedup with training unchanged first, then, when a change of training
    was accepted, the speedup with it, named as such. Falls back to the final speedup alone."""
    s, lo, hi, _ = fixed_batch(report)
    if s is None:
        return speedup_text(report)
    iv = f" (95 % interval {fmt_x(lo)}–{fmt_x(hi)})" if lo is not None and hi is not None else ""
    text = f"{fmt_x(s)}{iv} with training unchanged"
    sem = semantic_text(report)
    if sem:
        text += f"; {speedup_text(report)} with {sem}, which changes training"
    return text


def health_layers(report: dict, limit: int = 5) -> tuple[list[dict], int]:
    """report.json's per-layer gradient health rows to show: all of them when there are at
    most 2 * limit, else the `limit` layers with the largest and the `limit` with the smallest
    first-step gradient norm (in the model's order); and the number of layers left out."""
    rows = [r for r in as_list(as_dict(report.get("health")).get("layers")) if isinstance(r, dict)]
    if len(rows) <= 2 * limit:
        return rows, 0
    by_norm = sorted(range(len(rows)), key=lambda i: num(rows[i].get("grad_norm")) or 0.0)
    keep = set(by_norm[:limit]) | set(by_norm[-limit:])
    return [r for i, r in enumerate(rows) if i in keep], len(rows) - len(keep)


PATCH_NOTE_FILE = "A unified diff against the model file; applied, the file itself runs the final configuration."


def patch_note(report: dict) -> str:
    """What patch.diff is: a diff to the model file, or to the training script (and how it was checked)."""
    script = report.get("script")
    if not isinstance(script, dict):
        return PATCH_NOTE_FILE
    check = report.get("patch_check") or {}
    text = ("A unified diff against the training script; applied, the script itself runs the final configuration "
            "(`patch -p1 < patch.diff` beside it).")
    if check.get("ok") and check.get("max_rel_error") is not None:
        text += (f" Checked before writing: the patched script ran {len(check.get('losses') or [])} steps and its "
                 f"losses matched the kept configuration's within {check['max_rel_error']:.1e} relative "
                 f"(tolerance {check['tolerance']:.1e}).")
    return text


def script_text(report: dict) -> str:
    """The script a --script run optimized: its arguments, how it was driven, whether its losses
    repeat under a fixed seed; "" for a model file."""
    s = report.get("script")
    if not isinstance(s, dict):
        return ""
    args = " ".join(str(a) for a in s.get("args") or [])
    text = f"The unmodified script {s.get('shown') or s.get('path')}" + (f" with arguments `{args}`" if args else "")
    text += (", run in its own process per configuration (its __main__, its arguments, working directory "
             f"{s.get('cwd')}), stopped after the optimizer steps autoopt needed")
    if (s.get("nproc") or 1) > 1:
        text += f"; {s['nproc']} ranks per configuration (torch.distributed.run), each step timed at the slowest rank"
    if s.get("framework"):
        text += f"; a {s['framework']} Trainer script, optimized through the Trainer's own arguments"
    spread = s.get("seed_spread")
    if s.get("reproducible") is True:
        text += (". Under fixed seeds (torch, random, numpy and PYTHONHASHSEED) its losses repeat exactly, so each "
                 "variant was checked at its own tolerance")
    elif s.get("reproducible") is False and spread is not None:
        text += (f". Under fixed seeds (torch, random, numpy and PYTHONHASHSEED) its losses do not repeat (threads, "
                 f"the clock or other randomness no seed reaches: "
                 f"two baseline runs differ by {spread:.1e} relative), so each check's tolerance was widened to at "
                 "least 3x that spread")
    return text + "."
