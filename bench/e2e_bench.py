"""End to end on the machine at hand: optimize a model file, apply the patch to a copy, and
check how much of the reported speedup the patched file reproduces on its own.

    python bench/e2e_bench.py [--model examples/simplenet.py] [--repeat 2]

For each repeat: `autoopt optimize --yes` (the whole loop, as the Quick start runs it: no
change of training such as a larger batch, which --yes leaves out), then `patch -p1` on a copy of
the model file, then the original and the patched file are measured back to back by the
same harness `autoopt profile` uses (warm-up, synchronised timed steps, median). Printed:
the reported final speedup (with its range) and the speedup of the patched file over the
original, as throughput ratios, and the share reproduced (target: at least 60 %).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def throughput(path: Path, device: str, settings) -> tuple[float, object]:
    from autoopt.env import detect_capabilities
    from autoopt.run.measure import measure
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    spec = load_model_file(path)
    caps = detect_capabilities(device)
    wl = build_workload(spec, caps, seed=0)
    cfg = wl.base_config().with_(grad_accum_steps=int(getattr(spec.module, "GRAD_ACCUM_STEPS", 1) or 1))
    with Session(wl, cfg) as s:
        m = measure(s, caps, settings)
    return m.throughput_per_s, m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "simplenet.py"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--accept", default="", help="codes or transforms that change training to apply too, as "
                    "`autoopt optimize --accept` (e.g. batch_size); by default, as --yes: none")
    args = ap.parse_args(argv)

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.pipelines.optimize import run_optimize
    from autoopt.settings import Consent, MeasureSettings, OptimizeSettings

    caps = detect_capabilities(args.device)
    consent = Consent(yes=True, accept=[c for c in args.accept.split(",") if c.strip()])
    settings = MeasureSettings(min_steps=15, min_time_s=2.0, max_time_s=10.0)
    model = Path(args.model).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            rep = run_optimize(OptimizeSettings(model_path=str(model), device=args.device,
                                               out_dir=str(Path(tmp) / f"run{i}"), measure=settings),
                               decide=lambda f, t: t is not None and bool(consent.decide(f.code, t.name, f.safety)))
            wall = time.perf_counter() - t0
            fin = rep["final"]
            work = Path(tmp) / f"patched{i}"
            work.mkdir()
            shutil.copy(model, work / model.name)
            if rep["patch"]:
                r = subprocess.run(["patch", "-p1"], input=rep["patch"], text=True, capture_output=True, cwd=work)
                if r.returncode != 0:
                    print(r.stdout + r.stderr, file=sys.stderr)
                    return 1
            # original and patched measured back to back, twice, alternating
            orig, patched = [], []
            for _ in range(2):
                orig.append(throughput(model, args.device, settings)[0])
                patched.append(throughput(work / model.name, args.device, settings)[0])
            repro = statistics.median(patched) / statistics.median(orig)
            rows.append((fin, repro, wall, orig, patched))
            print(f"[e2e_bench] run {i}: reported {fin['speedup']:.2f}x, patched file {repro:.2f}x", file=sys.stderr)

    print(f"End to end on {caps.name or caps.device_type} ({caps.device_type}), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, model {model.name}")
    print()
    print("| run | kept transforms | reported speedup (range) | patched file vs original | patched / reported "
          "| share of the gain | optimize wall s |")
    print("|---|---|---|---|---|---|---|")
    for i, (fin, repro, wall, orig, patched) in enumerate(rows):
        kept = " + ".join(t["name"] + (f"({t['params'].get('batch_size')})" if t["name"] == "batch_size" else "")
                          for t in fin.get("transforms", [])) or "none"
        share = (repro - 1) / (fin["speedup"] - 1) if fin["speedup"] > 1.0001 else float("nan")
        print(f"| {i} | {kept} | {fin['speedup']:.2f}x ({fin['speedup_low']:.2f}–{fin['speedup_high']:.2f}) "
              f"| {repro:.2f}x ({statistics.median(orig):.0f} → {statistics.median(patched):.0f} samples/s) "
              f"| {repro / fin['speedup']:.0%} | {share:.0%} | {wall:.0f} |")
    print()
    print("patched / reported: the patched file's own speedup over the reported one (target >= 60 %); share of "
          "the gain: (patched - 1) / (reported - 1), the stricter reading.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
