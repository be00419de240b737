"""autoopt's own TensorBoard summaries, readable by TensorBoard's core dashboards offline.

Every variant of an optimize run is a run directory `tb/<variant>/`; torch.profiler's
traces for torch-tb-profiler (`*.pt.trace.json.gz`) already live there and are left
untouched. Into the same directories this module writes event files with:

- Scalars (step 0, one value per variant): `autoopt/step_time_ms` (median),
  `autoopt/step_time_ms_p25`, `autoopt/step_time_ms_p75`, `autoopt/throughput_per_s`,
  `autoopt/peak_memory_mb`, `autoopt/speedup`, and where measured `autoopt/mfu`,
  `autoopt/max_rel_error`, `autoopt/compile_time_s`. The batch search goes into the
  summary run as `autoopt/batch_search/throughput_per_s` (and `.../peak_memory_mb`) with
  the batch size as the step, so the chart is throughput against batch size.
- Text: `autoopt/variant` in every run; `autoopt/summary`, `autoopt/report` (the variants
  table) and `autoopt/findings` in the summary run (the baseline run).
- Images: `autoopt/step_time_breakdown` (baseline against final) in the summary run, and
  each analysed run's own breakdown.
- Gradient health (the summary run, when the report has `health`): `autoopt/health/loss`,
  `autoopt/health/grad_norm` and `autoopt/health/grad_scale` per verification step, and
  `autoopt/health/layer_grad_norm` with the layer's depth as the step; `autoopt/health` text
  names the layers.
- HParams: one session per variant (its transforms as hyperparameters, the scalars above
  as metrics), so the HParams dashboard compares every variant in one table.

The event files carry the suffix `.autoopt`; writing again replaces them, so summaries
never double up.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from autoopt.output import data as D
from autoopt.output import format as F
from autoopt.output import plots as P
from autoopt.output.terminal import final_table_rows

EVENT_SUFFIX = ".autoopt"
SUMMARY_RUN_FALLBACK = "autoopt"

# scalar tag -> how to read it from a variant dict
METRIC_TAGS = {
    "autoopt/step_time_ms": lambda v: F.stat(v.get("step_time_ms"), "median"),
    "autoopt/step_time_ms_p25": lambda v: F.stat(v.get("step_time_ms"), "p25"),
    "autoopt/step_time_ms_p75": lambda v: F.stat(v.get("step_time_ms"), "p75"),
    "autoopt/throughput_per_s": lambda v: F.num(v.get("throughput_per_s")),
    "autoopt/peak_memory_mb": lambda v: F.num(v.get("peak_memory_mb")),
    "autoopt/speedup": lambda v: F.num(v.get("speedup")),
    "autoopt/mfu": lambda v: F.num(v.get("mfu")),
    "autoopt/max_rel_error": lambda v: F.num(v.get("max_rel_error")),
    "autoopt/compile_time_s": lambda v: F.num(v.get("compile_time_s")),
}
# the metrics shown as columns of the HParams table
HPARAM_METRICS = (
    "autoopt/step_time_ms",
    "autoopt/throughput_per_s",
    "autoopt/speedup",
    "autoopt/peak_memory_mb",
    "autoopt/max_rel_error",
)


def run_name(name: Any) -> str:
    """A variant name as a directory name: the same name where it is safe ("AO201+AO301"),
    never empty, never a path."""
    s = re.sub(r"[^A-Za-z0-9._+=,-]", "_", str(name or "")).strip()
    return s if s.strip(".") else "variant"


def run_dirs(report: dict, tb_dir: Path) -> dict[str, Path]:
    """variant name -> its run directory under tb_dir: the variant's own logdir where it
    lies inside tb_dir, else tb_dir/<name>."""
    tb_dir = Path(tb_dir)
    root = tb_dir.resolve()
    out: dict[str, Path] = {}
    for v in D.variants(report):
        name = str(v.get("name", ""))
        d: Optional[Path] = None
        if v.get("logdir"):
            p = Path(str(v["logdir"]))
            try:
                if p.resolve() != root and root in p.resolve().parents:
                    d = p
            except (OSError, RuntimeError):
                d = None
        if d is None:
            d = tb_dir / run_name(name)
        if name in out:  # duplicate names keep distinct runs
            d = tb_dir / f"{run_name(name)}-{len(out)}"
        out[name] = d
    return out


def _transform_hparams(report: dict) -> list[str]:
    names: list[str] = []
    for v in D.variants(report):
        for t in F.as_list(v.get("transforms")):
            n = str(t.get("name")) if isinstance(t, dict) else str(t)
            if n and n not in names:
                names.append(n)
    return names


def variant_hparams(report: dict, v: dict, transform_names: list[str]) -> dict[str, Any]:
    """The hyperparameters of one variant: its name, status and codes, one entry per
    transform seen in the run ("off" where this variant does not use it, else its params
    or "on"), and its batch size."""
    hp: dict[str, Any] = {
        "variant": str(v.get("name", "?")),
        "status": str(v.get("status", "?")),
        "codes": F.codes_text(v.get("codes"), "+") or "none",
    }
    used = {}
    for t in F.as_list(v.get("transforms")):
        if isinstance(t, dict):
            params = F.as_dict(t.get("params"))
            used[str(t.get("name"))] = ", ".join(f"{k}={val}" for k, val in params.items()) or "on"
    for n in transform_names:
        hp[f"transform.{n}"] = used.get(n, "off")
    bs = F.num(v.get("batch_size"))
    if bs is None and v.get("name") == "baseline":
        bs = F.num(report.get("batch_size"))
    hp["batch_size"] = bs
    return hp


def _variant_text(report: dict, v: dict) -> str:
    st = v.get("step_time_ms")
    iv = D.speedup_interval(report, v)
    rows = [
        ("status", F.md_text(v.get("status", "?"))),
        ("reason", F.md_text(v.get("reason") or "—")),
        ("codes", F.md_text(F.codes_text(v.get("codes"), ", ") or "—")),
        ("transforms", F.md_code(F.transforms_text(v.get("transforms")))),
        ("step time, median (p25–p75)", f"{F.fmt_ms(F.stat(st, 'median'))} ms ({F.spread_text(st)})"),
        ("throughput", f"{F.fmt_tput(v.get('throughput_per_s'))} samples/s"),
        ("batch size", F.md_text(v.get("batch_size") if v.get("batch_size") is not None else "—")),
        ("peak memory", f"{F.fmt_mb(v.get('peak_memory_mb'))} MB"),
        ("speedup", F.fmt_x(v.get("speedup")) + (f" ({F.fmt_x(iv[0])}–{F.fmt_x(iv[1])})" if iv else "")),
        ("max rel. error", F.md_text(F.error_text(v))),
    ]
    return "\n".join([f"### {F.md_text(v.get('name', '?'))}", "", "| | |", "|---|---|"]
                     + [f"| {k} | {val} |" for k, val in rows])


def _variants_table(report: dict) -> str:
    rows = final_table_rows(report)
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(F.md_text(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _summary_text(report: dict) -> str:
    before, after = D.before_after(report)
    fin = F.as_dict(report.get("final"))
    bst, fst = F.as_dict(before.get("step_time_ms")), F.as_dict(after.get("step_time_ms"))
    lines = [
        f"## autoopt: {F.md_text(D.model_label(report))}",
        "",
        f"- **device:** {F.md_text(D.device_text(report))}",
        f"- **mode:** {F.md_text(report.get('mode') or '—')}, batch size {F.md_text(report.get('batch_size', '—'))}",
        f"- **final speedup:** {F.md_text(D.speedup_text(report))}",
        f"- **throughput:** {F.fmt_tput(before.get('throughput_per_s'))} → "
        f"{F.fmt_tput(after.get('throughput_per_s'))} samples/s",
        f"- **step time (median):** {F.fmt_ms(F.stat(bst, 'median'))} ms ({F.md_text(D.batch_label(before) or '?')})"
        f" → {F.fmt_ms(F.stat(fst, 'median'))} ms ({F.md_text(D.batch_label(after) or '?')})",
        f"- **kept:** {F.md_text(F.codes_text(fin.get('codes'), ', ') or 'nothing')} "
        f"({F.md_code(F.transforms_text(fin.get('transforms')))})",
    ]
    if report.get("interrupted"):
        lines.insert(2, "**Interrupted:** this holds what was measured until the run was stopped.\n")
    notes = D.notes(report)
    if notes:
        lines += ["", "**Notes**", ""] + [f"- {F.md_text(n)}" for n in notes]
    return "\n".join(lines)


def _findings_text(report: dict) -> str:
    fs = D.findings(report)
    if not fs:
        return "No rule fired."
    out = []
    for f in fs:
        out += [
            f"### {F.md_text(f.get('code', '?'))} {F.md_text(f.get('name', ''))}",
            "",
            f"**{F.md_text(f.get('title', ''))}**",
            "",
            F.md_text(f.get("message", "")),
            "",
            f"safety: **{F.md_text(f.get('safety', '?'))}** · transform: "
            f"{F.md_code(F.transforms_text([{'name': f.get('transform') or 'none', 'params': f.get('params')}]))}"
            f" · expected speedup: {F.fmt_x(f.get('expected_speedup'))} · accepted: "
            f"{F.accepted_text(f.get('accepted'))}",
            "",
        ]
        ev = F.as_dict(f.get("evidence"))
        if ev:
            out += ["evidence: " + ", ".join(f"{F.md_code(k)} = {F.md_code(val)}" for k, val in ev.items()), ""]
    return "\n".join(out).rstrip()


def breakdown_image(bars: list[tuple[str, dict[str, float]]], title: str):
    """An RGB uint8 array (H, W, 3) of stacked horizontal bars, ms per step by category
    (the report's breakdown plot, rasterized)."""
    return P.rgb_array(P.breakdown_plot(bars, title))


def _add_text(w, tag: str, text: str, step: int = 0) -> None:
    """Markdown text under exactly `tag` (SummaryWriter.add_text appends "/text_summary")."""
    from torch.utils.tensorboard.summary import text as text_summary

    summ = text_summary(tag, text)
    summ.value[0].tag = tag
    # a scalar string renders as Markdown; torch writes shape [1], which the text
    # dashboard shows wrapped in a one-cell table
    summ.value[0].tensor.tensor_shape.ClearField("dim")
    w.file_writer.add_summary(summ, step)


def _clear_old(run_dir: Path) -> None:
    for f in run_dir.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"):
        f.unlink()


def write_summaries(report: dict, tb_dir) -> dict[str, Path]:
    """Write autoopt's summaries for every variant of `report` under `tb_dir` (one run per
    variant, beside its profiler traces). Returns variant name -> run directory."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    tb_dir = Path(tb_dir)
    tb_dir.mkdir(parents=True, exist_ok=True)
    dirs = run_dirs(report, tb_dir)
    vs = D.variants(report)
    names = [str(v.get("name", "")) for v in vs]
    summary_name = "baseline" if "baseline" in names else (names[0] if names else None)
    summary_dir = dirs[summary_name] if summary_name is not None else tb_dir / SUMMARY_RUN_FALLBACK

    transform_names = _transform_hparams(report)
    all_hp = [variant_hparams(report, v, transform_names) for v in vs]
    domains: dict[str, list[str]] = {}
    for hp in all_hp:
        for k, val in hp.items():
            if isinstance(val, str):
                domains.setdefault(k, [])
                if val not in domains[k]:
                    domains[k].append(val)
    exp_template: dict[str, Any] = {}
    for hp in all_hp:
        for k, val in hp.items():
            if val is not None and k not in exp_template:
                exp_template[k] = val
    metric_dict = {t: 0.0 for t in HPARAM_METRICS}

    analysis = F.as_dict(report.get("analysis"))
    written: dict[str, Path] = {}
    for v, hp in zip(vs, all_hp):
        name = str(v.get("name", ""))
        d = dirs[name]
        d.mkdir(parents=True, exist_ok=True)
        _clear_old(d)
        w = SummaryWriter(log_dir=str(d), filename_suffix=EVENT_SUFFIX)
        try:
            for tag, get in METRIC_TAGS.items():
                val = get(v)
                if val is not None:
                    w.add_scalar(tag, val, 0)
            _add_text(w, "autoopt/variant", _variant_text(report, v))
            _write_convergence(w, v)
            a = analysis.get(name)
            if F.as_dict(a):
                w.add_image("autoopt/step_time_breakdown_run",
                            breakdown_image([(name, D.breakdown(a))], f"Step-time breakdown: {name}"), 0,
                            dataformats="HWC")
            present = {k: val for k, val in hp.items() if val is not None}
            exp, ssi, sei = hparams(present, metric_dict,
                                    {k: dom for k, dom in domains.items() if k in present})
            if d == summary_dir:
                exp_full, _, _ = hparams(exp_template, metric_dict,
                                         {k: dom for k, dom in domains.items() if k in exp_template})
                w.file_writer.add_summary(exp_full)
            w.file_writer.add_summary(ssi)
            w.file_writer.add_summary(sei)
            if d == summary_dir:
                _write_summary_run(w, report)
        finally:
            w.close()
        written[name] = d
    if summary_name is None:  # no variant at all (a failed run): the summary still goes somewhere
        summary_dir.mkdir(parents=True, exist_ok=True)
        _clear_old(summary_dir)
        w = SummaryWriter(log_dir=str(summary_dir), filename_suffix=EVENT_SUFFIX)
        try:
            _write_summary_run(w, report)
        finally:
            w.close()
        written[SUMMARY_RUN_FALLBACK] = summary_dir
    return written


def _write_convergence(w, v: dict) -> None:
    """The convergence check's loss curves, per optimizer step: each baseline seed's and the
    candidate's (a step whose loss was not finite is left out)."""
    c = F.as_dict(v.get("convergence"))
    curves = [(f"autoopt/convergence/baseline_loss_seed{s}", b)
              for s, b in zip(F.as_list(c.get("seeds")), F.as_list(c.get("baseline_curves")))]
    curves.append(("autoopt/convergence/candidate_loss", c.get("candidate_curve")))
    for tag, curve in curves:
        for step, val in enumerate(F.as_list(curve), start=1):
            if F.num(val) is not None:
                w.add_scalar(tag, F.num(val), step)


def _write_summary_run(w, report: dict) -> None:
    _add_text(w, "autoopt/summary", _summary_text(report))
    _add_text(w, "autoopt/report", _variants_table(report) if D.variants(report) else "No variant was measured.")
    _add_text(w, "autoopt/findings", _findings_text(report))
    analysis = F.as_dict(report.get("analysis"))
    bars = [(lbl, D.breakdown(a)) for lbl, a in (("baseline", analysis.get("baseline")),
                                                 ("final", analysis.get("final"))) if F.as_dict(a)]
    if bars:
        w.add_image("autoopt/step_time_breakdown", breakdown_image(bars, "Step-time breakdown, before and after"), 0,
                    dataformats="HWC")
    _write_health(w, F.as_dict(report.get("health")))
    for b in F.as_list(report.get("batch_search")):
        if not isinstance(b, dict):
            continue
        bs = F.num(b.get("batch_size"))
        if bs is None:
            continue
        for key in ("throughput_per_s", "peak_memory_mb"):
            val = F.num(b.get(key))
            if val is not None:
                w.add_scalar(f"autoopt/batch_search/{key}", val, int(bs))


def _write_health(w, health: dict) -> None:
    """The baseline's gradient health (report.json `health`): the loss, the total gradient norm
    and the GradScaler's scale per verification step, and each layer's first gradient norm with
    the layer's depth as the step (input side first: a curve that falls or climbs steeply over
    depth is vanishing or exploding), the depth -> layer names in a text table."""
    if not health:
        return
    per_step = {"autoopt/health/loss": F.as_list(health.get("loss")),
                "autoopt/health/grad_norm": F.as_list(health.get("grad_norm")),
                "autoopt/health/grad_scale": F.as_list(F.as_dict(health.get("grad_scaler")).get("scale"))}
    for tag, values in per_step.items():
        for step, val in enumerate(values, start=1):
            if F.num(val) is not None:
                w.add_scalar(tag, F.num(val), step)
    lines = ["| depth | layer | gradient norm (first step) | update ratio | inf/NaN |", "|---|---|---|---|---|"]
    for depth, row in enumerate(r for r in F.as_list(health.get("layers")) if isinstance(r, dict)):
        norm = F.num(row.get("grad_norm"))
        if norm is not None:
            w.add_scalar("autoopt/health/layer_grad_norm", norm, depth)
        ratio = F.num(row.get("update_ratio"))
        lines.append(f"| {depth} | {F.md_text(str(row.get('name', '?')))} | "
                     f"{'—' if norm is None else f'{norm:.3g}'} | {'—' if ratio is None else f'{ratio:.3g}'} | "
                     f"{int(F.num(row.get('nonfinite')) or 0)} |")
    _add_text(w, "autoopt/health", "\n".join(lines))
