"""GPU check: optimize the bundled examples and the zoo's ResNet-50 and GPT-2 on the GPU at hand
and print Markdown tables.

    python bench/gpu_check.py [--device cuda] [--out reports/gpu-check]
                              [--models simplenet,gpt,resnet_infer,zoo/resnet,zoo/gpt2]

Each model goes through the whole optimize pipeline with every finding accepted (as
`--yes --accept batch_size,grad_accumulation` would: the changes of training included) (baseline, findings,
verified variants, search, final side-by-side re-measurement). The table gives the median
step time of the baseline and of the final configuration as re-measured side by side, the
speedup (throughput ratio) with training unchanged (final.fixed_batch_speedup) and, where a
change of training such as a larger batch was kept (every finding is accepted here), the
final speedup with it, named; the kept transforms and the MFU of both.
For the zoo's models (real architectures at realistic batch sizes: ResNet-50 at 224x224,
GPT-2 small at 1024 tokens) a second table puts autoopt's final configuration beside the
hand-tuned recipe (bf16 autocast + channels_last + torch.compile + fused AdamW; SDPA
attention is already GPT-2's), measured side by side (bench/recipe.py): autoopt's
throughput as a percentage of the recipe's, and each one's MFU against the card's peak.
Meant to finish in about ten minutes on one H100/H200; on a CPU it runs too (slowly), which
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
GPU_BATCH = {"simplenet": 256, "gpt": 32, "resnet_infer": 128, "mlp": 1024, "zoo/resnet": 128, "zoo/gpt2": 16}
# the zoo's realistic sizes on a GPU (the files default to CPU-friendly ones where they differ)
ZOO_ENV = {"zoo/gpt2": {"AUTOOPT_ZOO_SEQ_LEN": "1024"}, "zoo/resnet": {"AUTOOPT_ZOO_IMAGE_SIZE": "224"}}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "reports" / "gpu-check"))
    ap.add_argument("--models", default="simplenet,gpt,resnet_infer,zoo/resnet,zoo/gpt2")
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip remaining models past this wall time")
    ap.add_argument("--model-budget-s", type=float, default=150.0,
                    help="each optimize run's --time-budget (baseline and search)")
    ap.add_argument("--no-recipe", action="store_true", help="skip the hand-tuned recipe comparison")
    ap.add_argument("--compile-modes", default="default,reduce-overhead",
                    help="torch.compile modes to measure (max-autotune's GEMM tuning alone takes minutes)")
    return ap.parse_args(argv)


def _optimize_one(name: str, args, caps, settings):
    """(report or None, note, recipe comparison or None) of one model."""
    from autoopt.pipelines.optimize import run_optimize
    from autoopt.settings import OptimizeSettings, SearchSettings

    path = ROOT / "examples" / f"{name}.py"
    os.environ.update(ZOO_ENV.get(name, {}))
    bs = GPU_BATCH.get(name) if caps.device_type == "cuda" else None
    opts = OptimizeSettings(
        model_path=str(path), device=args.device, batch_size=bs, out_dir=str(Path(args.out) / name), force=True,
        measure=settings,
        search=SearchSettings(compile_modes=tuple(args.compile_modes.split(",")),
                              time_budget_s=args.model_budget_s or None),
    )
    t0 = time.perf_counter()
    rep = run_optimize(opts, decide=lambda f, t: t is not None)
    note = f"{time.perf_counter() - t0:.0f} s"
    comparison = None
    if name.startswith("zoo/") and not args.no_recipe:
        from recipe import compare

        try:
            comparison = compare(str(path), rep, args.device, settings, batch_size=bs)
        except Exception as e:  # the recipe failing (a compile error) must not hide autoopt's row
            note += f"; recipe failed: {type(e).__name__}: {str(e)[:200]}"
    return rep, note, comparison


def _row(name: str, rep: dict, wall: str) -> str:
    fin = rep["final"] or {}
    base = fin.get("baseline_remeasured") or rep["baseline"]
    bst = base["step_time_ms"]
    fst = fin.get("step_time_ms") or bst
    kept = ", ".join(f"{t['name']}" + (f"({t['params'].get('batch_size')})" if t["name"] == "batch_size" else "")
                     for t in fin.get("transforms", [])) or "none"
    mfu_b = base.get("mfu")
    mfu_f = fin.get("mfu")
    mfu = f"{mfu_b:.1%} → {mfu_f:.1%}" if mfu_b and mfu_f else (f"{mfu_b:.1%}" if mfu_b else "n/a")
    return (f"| {name} | {rep['mode']} | {rep['batch_size']}→{fin.get('batch_size', rep['batch_size'])} | "
            f"{bst['median']:.2f} ({bst['p25']:.2f}–{bst['p75']:.2f}) | {fst['median']:.2f} "
            f"({fst['p25']:.2f}–{fst['p75']:.2f}) | "
            f"{_fixed(fin)} | {_with_semantic(fin)} | {kept} | {mfu} | {wall} |")


def _fixed(fin: dict) -> str:
    """The speedup with training unchanged (final.fixed_batch_speedup) with its interval."""
    s, lo, hi = fin.get("fixed_batch_speedup"), fin.get("fixed_batch_low"), fin.get("fixed_batch_high")
    if s is None:
        return "—"
    return f"{s:.2f}x" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else "")


def _with_semantic(fin: dict) -> str:
    """The final speedup with the changes of training it holds (a larger batch), named; "—"
    when the final changes nothing in training (the fixed-batch column is then the final)."""
    if not fin.get("semantic_changes"):
        return "—"
    return (f"{fin.get('speedup', 1.0):.2f}x ({fin.get('speedup_low', 1.0):.2f}–{fin.get('speedup_high', 1.0):.2f}) "
            f"with {fin['semantic_changes']}")


def main(argv=None) -> int:
    args = _args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.settings import MeasureSettings

    caps = detect_capabilities(args.device)
    card = caps.name or caps.device_type
    settings = MeasureSettings.quick() if args.quick else MeasureSettings(min_steps=20, min_time_s=0.5, max_time_s=4.0)
    rows, recipes = [], []
    t_start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append((name, None, "skipped: time budget spent"))
            continue
        try:
            rep, note, comparison = _optimize_one(name, args, caps, settings)
            rows.append((name, rep, note))
            if name.startswith("zoo/") and not args.no_recipe:
                recipes.append((name, comparison, note))
        except Exception as e:  # one model failing must not hide the others
            rows.append((name, None, f"failed: {type(e).__name__}: {e}"))
        print(f"[gpu_check] {name}: {rows[-1][2]}", file=sys.stderr, flush=True)

    lines = [
        f"GPU check on **{card}** (torch {torch.__version__}, CUDA {torch.version.cuda}), "
        f"{time.strftime('%Y-%m-%d')}, total {time.perf_counter() - t_start:.0f} s",
        "",
        "| model | mode | batch | baseline ms (median, IQR) | final ms (median, IQR) | speedup, training unchanged "
        "(95 % interval) | speedup with changes of training (range) | kept transforms | MFU base → final | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(n, rep, wall) if rep is not None else f"| {n} | | | | | | | {wall} | | |" for n, rep, wall in rows]
    lines += ["", "Speedups are throughput ratios (samples/s) over the baseline. \"Training unchanged\" is "
              "report.json final.fixed_batch_speedup: the kept transforms without those that change training "
              "(same batch size and semantics). The next column is the final configuration, re-measured back "
              "to back with the baseline, when it also holds a change of training (a larger batch), named; "
              "every finding is accepted here, batch size included."]
    if recipes:
        from recipe import table as recipe_table

        lines += ["", "autoopt's final configuration beside the hand-tuned recipe, measured side by side at the "
                  "batch size autoopt started from (the recipe keeps it; autoopt may have changed it):", ""]
        lines += recipe_table(recipes)
    table = "\n".join(lines)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu-results.md").write_text(table + "\n")
        for name, rep, _ in rows:
            if rep is not None:
                dump = json.dumps(rep, indent=1, default=str)
                Path(out_dir, f"{name.replace('/', '-')}-report.json").write_text(dump)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
