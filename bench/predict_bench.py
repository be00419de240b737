"""Prediction error: each finding's predicted speedup against the measured speedup of its
transform applied alone.

    python bench/predict_bench.py [--device cpu|cuda|auto] [--models NAME,...] [--with-batch]
                                  [--budget-s S] [--json PATH] [--markdown PATH]

For every model (by default the bundled examples/*.py and the planted-bottleneck models
tests/planted/*.py that are not controls) this runs the whole `autoopt optimize` loop
(`autoopt.pipelines.optimize.run_optimize`) with small measurement settings, accepting every finding
that has a transform. Each rule's gain model (autoopt/gain.py, the rule's `gain` table)
predicts from the baseline's trace how much its transform can at most save; the optimize
loop measures each accepted transform alone against the baseline (its solo variant, a
throughput ratio after warm-up and synchronisation). The table pairs the two:

    error = predicted / measured - 1       (positive: the prediction promised more)

A gain model is an upper bound, so a good one errs on the positive side by little; a
negative error means the transform beat its own bound (the model misses something it
saves). Findings without a gain model ("no prediction"), and transforms that were not
measured alone (skipped: the same transform proposed by an earlier finding, or a check
failed; rejected by the numerics check; failed) are counted apart. Batch-size findings
are not accepted unless --with-batch (their throughput search measures many batch sizes
and is the slowest part of a run).

Timings on a shared machine are noisy: each measured speedup carries the quartile range
of the two measurements; read the table as a sign and an order of magnitude, not as a
third digit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_models() -> list[Path]:
    # model files only: examples/train_script.py is a training script (autoopt optimize --script)
    ex = sorted(p for p in (ROOT / "examples").glob("*.py") if "def build_model" in p.read_text(encoding="utf-8"))
    planted = sorted(p for p in (ROOT / "tests" / "planted").glob("*.py")
                     if not p.name.startswith(("control_", "record_", "_")))
    return ex + planted


def resolve_models(names: str) -> list[Path]:
    if not names:
        return default_models()
    pool = {p.stem: p for p in default_models()}
    out = []
    for n in (x.strip() for x in names.split(",")):
        if not n:
            continue
        p = Path(n)
        if p.suffix == ".py" and p.exists():
            out.append(p.resolve())
        elif n in pool:
            out.append(pool[n])
        else:
            raise SystemExit(f"predict_bench: no model {n!r}; use a path or one of {', '.join(sorted(pool))}")
    return out


def bench_settings():
    from autoopt.settings import MeasureSettings, ProfileSettings

    return (MeasureSettings(warmup_steps=2, warmup_min_s=0.0, min_steps=5, max_steps=15, min_time_s=0.3,
                            max_time_s=3.0),
            ProfileSettings(wait=0, warmup=1, active=2))


def rows_of(rep: dict) -> list[dict[str, Any]]:
    """One row per finding: its prediction and, where its transform ran alone against the
    baseline, the measured speedup (with the quartile range of the two measurements)."""
    base = rep.get("baseline") or {}
    base_st = (base.get("step_time_ms") or {})
    rows = []
    for f in rep.get("findings", []):
        code = f["code"]
        solo = [v for v in rep.get("variants", []) if v.get("codes") == [code]]
        v = solo[0] if solo else None
        measured = v.get("speedup") if v else None
        low = high = None
        if measured is not None and v.get("step_time_ms") and base_st:
            vst = v["step_time_ms"]
            b_bs, v_bs = rep.get("batch_size") or 1, v.get("batch_size") or rep.get("batch_size") or 1
            if vst.get("p75") and vst.get("p25"):
                low = (base_st["p25"] / b_bs) / (vst["p75"] / v_bs)
                high = (base_st["p75"] / b_bs) / (vst["p25"] / v_bs)
        pred = f.get("expected_speedup")
        if v is None:
            status = "advice only" if not f.get("transform") else "not run"
        elif measured is None:
            status = f"{v['status']}: {v.get('reason', '')}".strip()
        else:
            status = v["status"]
        rows.append({
            "model": rep["model"], "code": code, "transform": f.get("transform"),
            "predicted": pred, "predicted_step_time_ms": f.get("predicted_step_time_ms"),
            "baseline_step_time_ms": base_st.get("median"),
            "measured": measured, "measured_low": low, "measured_high": high,
            "measured_step_time_ms": (v.get("step_time_ms") or {}).get("median") if v and measured else None,
            "error": (pred / measured - 1.0) if pred is not None and measured else None,
            "status": status,
        })
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errs = [r["error"] for r in rows if r["error"] is not None]
    return {
        "findings": len(rows),
        "compared": len(errs),
        "median_abs_error": statistics.median(abs(e) for e in errs) if errs else None,
        "median_error": statistics.median(errs) if errs else None,
        "over_predicted": sum(1 for e in errs if e > 0),
        "no_prediction": sum(1 for r in rows if r["predicted"] is None),
        "no_measurement": sum(1 for r in rows if r["measured"] is None),
        "within_quartile_range": sum(
            1 for r in rows if r["error"] is not None and r["measured_low"] is not None
            and r["measured_low"] <= r["predicted"] <= r["measured_high"]),
    }


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(rows: list[dict[str, Any]], summary: dict[str, Any], header: str, failures: list[str]) -> str:
    lines = [header, "",
             "| model | finding | transform | baseline ms | predicted | measured (quartile range) | error | variant |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rng = (f" ({r['measured_low']:.2f}–{r['measured_high']:.2f})"
               if r["measured"] is not None and r["measured_low"] is not None else "")
        err = "-" if r["error"] is None else f"{r['error']:+.0%}"
        base = "-" if r["baseline_step_time_ms"] is None else f"{r['baseline_step_time_ms']:.1f}"
        status = r["status"].replace("|", "/")
        if len(status) > 70:
            status = status[:67] + "..."
        lines.append(f"| {r['model']} | {r['code']} | {r['transform'] or '(advice)'} | {base} | {_x(r['predicted'])} | "
                     f"{_x(r['measured'])}{rng} | {err} | {status} |")
    for f in failures:
        lines.append(f"| {f} | | | | | | | |")
    s = summary
    mae = "-" if s["median_abs_error"] is None else f"{s['median_abs_error']:.0%}"
    med = "-" if s["median_error"] is None else f"{s['median_error']:+.0%}"
    lines += ["",
              f"Summary: {s['findings']} findings; {s['compared']} with both a prediction and a solo measurement: "
              f"median absolute error {mae} (median signed error {med}), {s['over_predicted']} of {s['compared']} "
              f"over-predicted (the gain models are upper bounds), {s['within_quartile_range']} inside the measured "
              f"quartile range. No prediction (no gain model or a missing fact): {s['no_prediction']}. "
              f"No solo measurement (advice only, skipped, rejected or failed): {s['no_measurement']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="", help="comma-separated names (examples/ or tests/planted/) or paths")
    ap.add_argument("--with-batch", action="store_true", help="also accept batch-size findings (slow)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip the remaining models past this wall time (0: no "
                                                                "limit)")
    ap.add_argument("--out", default="", help="where the optimize reports go (default: a temporary directory)")
    ap.add_argument("--json", default="", help="also write the rows and summary as JSON here")
    ap.add_argument("--markdown", default="", help="also write the table here")
    args = ap.parse_args(argv)

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.pipelines.optimize import run_optimize
    from autoopt.settings import OptimizeSettings

    caps = detect_capabilities(args.device)
    measure_s, profile_s = bench_settings()
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="predict-bench-"))

    def decide(finding, transform) -> bool:
        if transform is None:
            return False
        return args.with_batch or transform.name != "batch_size"

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    t_start = time.perf_counter()
    for path in resolve_models(args.models):
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            failures.append(f"{path.stem}: skipped, time budget spent")
            continue
        t0 = time.perf_counter()
        opts = OptimizeSettings(model_path=str(path), device=args.device, out_dir=str(out_root / path.stem), force=True,
                               measure=measure_s, profile=profile_s)
        try:
            rep = run_optimize(opts, decide=decide)
        except Exception as e:  # one model failing must not hide the others
            first = str(e).splitlines()[0][:120] if str(e) else ""
            failures.append(f"{path.stem}: failed, {type(e).__name__}: {first}")
            print(f"[predict_bench] {failures[-1]}", file=sys.stderr, flush=True)
            continue
        rows += rows_of(rep)
        print(f"[predict_bench] {path.stem}: {len(rep.get('findings', []))} findings, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    summary = summarize(rows)
    header = (f"Prediction error on {caps.name or caps.device_type} ({caps.device_type}), torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - t_start:.0f} s; "
              f"speedups are throughput ratios of the transform alone over the baseline.")
    table = render(rows, summary, header, failures)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": caps.to_json(), "rows": rows, "summary": summary,
                                               "failures": failures}, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
