"""Default (greedy) search against `--search exhaustive` on the examples.

    python bench/search_bench.py [--models simplenet,mlp,gpt,resnet_infer] [--quick]

For each model both searches run the whole optimize pipeline with every finding accepted
(the same transforms), one after the other in this process. Printed per model: the final
speedup each search reached (throughput ratio, re-measured side by side with the
baseline), the variants each tried and the wall time of the search phase. The targets
(issue 6): greedy reaches at least 95 % of the exhaustive best speedup in at most half its
wall time. Summary lines give the medians over the models.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="simplenet,mlp,resnet_infer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer timed steps per variant (noisier)")
    args = ap.parse_args(argv)

    from autoopt.measure import MeasureSettings
    from autoopt.optimize import OptimizeOptions, run_optimize

    settings = MeasureSettings.quick() if args.quick else MeasureSettings(min_steps=10, min_time_s=1.0, max_time_s=6.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            res = {}
            for strategy in ("greedy", "exhaustive"):
                t0 = time.perf_counter()
                rep = run_optimize(
                    OptimizeOptions(model_path=str(ROOT / "examples" / f"{name}.py"), device=args.device,
                                    out_dir=str(Path(tmp) / f"{name}-{strategy}"), search=strategy, measure=settings),
                    decide=lambda f, t: t is not None,
                )
                res[strategy] = (rep, time.perf_counter() - t0)
                print(f"[search_bench] {name} {strategy}: {rep['final']['speedup']:.2f}x, "
                      f"{rep['search']['variants_tried']} variants, {rep['search']['time_s']:.0f} s", file=sys.stderr)
            rows.append((name, res))

    lines = [
        "| model | greedy speedup | exhaustive speedup | greedy / exhaustive | greedy variants | exhaustive variants "
        "| greedy search s | exhaustive search s | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    quality, cost = [], []
    for name, res in rows:
        g, gt = res["greedy"]
        e, et = res["exhaustive"]
        gs, es = g["final"]["speedup"], e["final"]["speedup"]
        q = gs / es if es else float("nan")
        c = g["search"]["time_s"] / e["search"]["time_s"] if e["search"]["time_s"] else float("nan")
        quality.append(q)
        cost.append(c)
        lines.append(
            f"| {name} | {gs:.2f}x ({'+'.join(t['name'] for t in g['final']['transforms']) or 'none'}) "
            f"| {es:.2f}x ({'+'.join(t['name'] for t in e['final']['transforms']) or 'none'}) | {q:.0%} "
            f"| {g['search']['variants_tried']} | {e['search']['variants_tried']} "
            f"| {g['search']['time_s']:.0f} | {e['search']['time_s']:.0f} | {c:.2f} |"
        )
    lines.append("")
    lines.append(f"median greedy/exhaustive speedup: {statistics.median(quality):.0%} (target >= 95 %); "
                 f"median search-time ratio: {statistics.median(cost):.2f} (target <= 0.50)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
