"""Does the patched script gain what `autoopt optimize --script` reported?

    python bench/script_bench.py [--script examples/train_script.py] [--rounds 6] [--epochs 4] [--steps 100]
                                 [--time-budget 180] [--out DIR] [-- SCRIPT ARGS]

1. `autoopt optimize --script SCRIPT --yes --json --out DIR -- ARGS` in a subprocess: the
   speedup it reports (report.json final: the kept configuration beside the baseline, both
   driven through autoopt's hooks) with its 95 % range.
2. patch.diff applied to a copy of the script (`patch -p1`), beside the original.
3. The two scripts run as plain processes (`python SCRIPT ARGS --epochs E --steps-per-epoch N`,
   no autoopt anywhere), one after the other in alternating rounds, and each measures itself:
   the script prints the time of each epoch's training loop ("epoch K done: train T s"). A
   run's time per step is the median over its epochs after the first (warm-up, compilation),
   divided by N. Each round gives a ratio (original over patched); their geometric mean and
   95 % t-interval are the patched script's own speedup.

Printed: both speedups with their ranges, and whether they agree — the two 95 % ranges
overlap. The script must take --steps-per-epoch and --epochs and print its epochs' training
times as the bundled example does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autoopt.run.measure import t975  # noqa: E402 - the same t-quantiles as the search's intervals

DEFAULT_SCRIPT = ROOT / "examples" / "train_script.py"


def optimize(script: Path, args: list[str], out: Path, budget: int) -> dict:
    cmd = [sys.executable, "-m", "autoopt", "optimize", "--script", str(script), "--yes", "--json", "--out", str(out),
           "--time-budget", str(budget), "--", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(out.parent / "optimize.log", "w") as log:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=script.parent, text=True)
    if p.returncode != 0:
        sys.exit(f"autoopt optimize --script failed (exit {p.returncode}); see {out.parent / 'optimize.log'}")
    return json.loads(p.stdout)


def patched_copy(script: Path, report: dict, where: Path) -> Path:
    """The script's directory copied to `where`, with patch.diff applied to the copy."""
    if not report.get("patch"):
        sys.exit("the report has no patch (nothing kept, or the patched script failed its check): nothing to compare")
    dst = where / "patched"
    shutil.copytree(script.parent, dst, ignore=shutil.ignore_patterns("__pycache__", "reports", ".git"))
    p = subprocess.run(["patch", "-p1", "--quiet"], input=report["patch"], text=True, cwd=dst, capture_output=True)
    if p.returncode != 0:
        sys.exit(f"patch.diff does not apply to a copy of {script}: {p.stdout}{p.stderr}")
    return dst / script.name


EPOCH_RE = re.compile(r"epoch (\d+) done: train ([\d.]+) s")


def per_step_ms(script: Path, args: list[str], epochs: int, steps: int) -> float:
    """The script's own timing: the median training time of its epochs after the first, per step."""
    cmd = [sys.executable, str(script), *args, "--epochs", str(epochs), "--steps-per-epoch", str(steps)]
    p = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{script} {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    times = [float(t) for e, t in EPOCH_RE.findall(p.stdout) if int(e) > 0]
    if not times:
        sys.exit(f"{script} printed no 'epoch K done: train T s' lines after the first epoch")
    return statistics.median(times) / steps * 1000.0


def interval(ratios: list[float]) -> tuple[float, float, float]:
    logs = [math.log(r) for r in ratios]
    mid = math.exp(statistics.fmean(logs))
    if len(logs) < 2:
        return mid, float("nan"), float("nan")
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return mid, math.exp(statistics.fmean(logs) - half), math.exp(statistics.fmean(logs) + half)


def main() -> None:
    argv = sys.argv[1:]
    script_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, script_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", default=str(DEFAULT_SCRIPT))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each plain run (the first is warm-up)")
    ap.add_argument("--steps", type=int, default=100, help="training steps per epoch of each plain run")
    ap.add_argument("--time-budget", type=int, default=180)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    script = Path(a.script).resolve()
    work = Path(a.out or tempfile.mkdtemp(prefix="autoopt-script-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / "report"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    report = optimize(script, script_args, out, a.time_budget)
    wall = time.perf_counter() - t0
    final = report.get("final") or {}
    kept = " + ".join(t["name"] for t in final.get("transforms") or []) or "nothing"
    patched = patched_copy(script, report, work)
    orig_ms, new_ms, ratios = [], [], []
    for _ in range(a.rounds):
        o = per_step_ms(script, script_args, a.epochs, a.steps)
        p = per_step_ms(patched, script_args, a.epochs, a.steps)
        orig_ms.append(o)
        new_ms.append(p)
        ratios.append(o / p)
    mid, lo, hi = interval(ratios)
    rep, rep_lo, rep_hi = final.get("speedup"), final.get("speedup_low"), final.get("speedup_high")
    agree = rep is not None and lo <= (rep_hi or rep) and (rep_lo or rep) <= hi
    print(f"script: {script} {' '.join(script_args)}; kept: {kept}; optimize wall {wall:.0f} s; report in {out}")
    print("| measured by | speedup | 95 % range | original ms/step (median) | patched ms/step (median) |")
    print("|---|---|---|---|---|")
    base_ms = report["baseline"]["step_time_ms"]["median"]
    final_ms = final["step_time_ms"]["median"]
    print(f"| autoopt optimize --script (report.json final) | {rep:.2f}x | {rep_lo:.2f}-{rep_hi:.2f} | "
          f"{base_ms:.2f} | {final_ms:.2f} |")
    print(f"| the patched script, plain processes, {a.rounds} rounds | {mid:.2f}x | {lo:.2f}-{hi:.2f} | "
          f"{statistics.median(orig_ms):.2f} | {statistics.median(new_ms):.2f} |")
    print(f"agree (the two 95 % ranges overlap): {'yes' if agree else 'NO'}")


if __name__ == "__main__":
    main()
