"""GPU check: optimize three bundled examples on the GPU at hand and print a Markdown table.

    python bench/gpu_check.py [--device cuda] [--out reports/gpu-check] [--models simplenet,gpt,resnet_infer]

Each model goes through the whole `autoopt optimize --yes` pipeline (baseline, findings,
verified variants, search, final side-by-side re-measurement). The table gives the median
step time of the baseline and of the final configuration as re-measured side by side, the
speedup (throughput ratio) with its quartile range, the kept transforms and the MFU of both.
Meant to finish in under eight minutes on one H100/H200; on a CPU it runs too (slowly), which
is how it is smoke-tested.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Per-model batch sizes for a GPU: large enough that the GPU is not idle waiting on Python.
GPU_BATCH = {"simplenet": 256, "gpt": 32, "resnet_infer": 128, "mlp": 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "reports" / "gpu-check"))
    ap.add_argument("--models", default="simplenet,gpt,resnet_infer")
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining models past this wall time")
    ap.add_argument("--compile-modes", default="default,reduce-overhead",
                    help="torch.compile modes to measure (max-autotune's GEMM tuning alone takes minutes)")
    args = ap.parse_args(argv)

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.pipelines.optimize import run_optimize
    from autoopt.settings import MeasureSettings, OptimizeSettings, SearchSettings

    caps = detect_capabilities(args.device)
    card = caps.name or caps.device_type
    settings = MeasureSettings.quick() if args.quick else MeasureSettings(min_steps=20, min_time_s=0.5, max_time_s=4.0)
    rows = []
    t_start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = ROOT / "examples" / f"{name}.py"
        if time.perf_counter() - t_start > args.budget_s:
            rows.append((name, None, "skipped: time budget spent"))
            continue
        bs = GPU_BATCH.get(name) if caps.device_type == "cuda" else None
        opts = OptimizeSettings(
            model_path=str(path), device=args.device, batch_size=bs, out_dir=str(Path(args.out) / name),
            measure=settings,
            search=SearchSettings(compile_modes=tuple(args.compile_modes.split(",")), time_budget_s=None),
        )
        t0 = time.perf_counter()
        try:
            rep = run_optimize(opts, decide=lambda f, t: t is not None)
            rows.append((name, rep, f"{time.perf_counter() - t0:.0f} s"))
        except Exception as e:  # one model failing must not hide the others
            rows.append((name, None, f"failed: {type(e).__name__}: {e}"))
        print(f"[gpu_check] {name}: {rows[-1][2]}", file=sys.stderr, flush=True)

    lines = [
        f"GPU check on **{card}** (torch {torch.__version__}, CUDA {torch.version.cuda}), "
        f"{time.strftime('%Y-%m-%d')}, total {time.perf_counter() - t_start:.0f} s",
        "",
        "| model | mode | batch | baseline ms (median, IQR) | final ms (median, IQR) | speedup (range) | kept "
        "transforms | MFU base → final | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rep, wall in rows:
        if rep is None:
            lines.append(f"| {name} | | | | | | {wall} | | |")
            continue
        fin = rep["final"] or {}
        base = fin.get("baseline_remeasured") or rep["baseline"]
        bst = base["step_time_ms"]
        fst = fin.get("step_time_ms") or bst
        kept = ", ".join(f"{t['name']}" + (f"({t['params'].get('batch_size')})" if t["name"] == "batch_size" else "")
                         for t in fin.get("transforms", [])) or "none"
        mfu_b = base.get("mfu")
        mfu_f = fin.get("mfu")
        mfu = f"{mfu_b:.1%} → {mfu_f:.1%}" if mfu_b and mfu_f else (f"{mfu_b:.1%}" if mfu_b else "n/a")
        lines.append(
            f"| {name} | {rep['mode']} | {rep['batch_size']}→{fin.get('batch_size', rep['batch_size'])} | "
            f"{bst['median']:.2f} ({bst['p25']:.2f}–{bst['p75']:.2f}) | {fst['median']:.2f} "
            f"({fst['p25']:.2f}–{fst['p75']:.2f}) | "
            f"{fin.get('speedup', 1.0):.2f}x ({fin.get('speedup_low', 1.0):.2f}–{fin.get('speedup_high', 1.0):.2f}) | "
            f"{kept} | {mfu} | {wall} |"
        )
    lines.append("")
    lines.append("Speedup is the throughput ratio (samples/s) of the final configuration over the baseline, "
                 "re-measured back to back; the range pairs the quartiles of the two measurements.")
    table = "\n".join(lines)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu-results.md").write_text(table + "\n")
        for name, rep, _ in rows:
            if rep is not None:
                Path(out_dir, f"{name}-report.json").write_text(json.dumps(rep, indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
