"""`autoopt optimize` on the model zoo (examples/zoo/): what it keeps and what it gains per model.

    python bench/zoo_bench.py [--models resnet18,vit] [--time-budget 300] [--repeat 2] [--out DIR]
                              [--batch-size N] [--image-size PX] [--seq-len T] [--full-size] [--device auto]

Each run is `autoopt optimize MODEL --yes --accept batch_size --json --out DIR --time-budget S`
in a subprocess (--yes alone leaves out the batch size, which changes training: the table
names it explicitly so its two speedup columns, with and without it, both mean something)
(so every model starts from a fresh process: no torch state, compiled code or allocator
cache carried over). By default the workloads are shrunk to CPU-friendly sizes — a smaller
batch per model, and images / sequences through the AUTOOPT_ZOO_IMAGE_SIZE and
AUTOOPT_ZOO_SEQ_LEN variables the zoo files read — each overridable by a flag; --full-size
runs the files as written (their BATCH_SIZE, 224x224 images, full sequences: for a GPU).

Printed at the end, one row per run (--repeat N runs each model N times, to show whether
the decisions reproduce): the workload size, the transforms kept (report.json final), the
final speedup with its 95 % range (with the batch size, when one was kept), the fixed-batch
speedup (report.json final.fixed_batch_speedup: what the kept transforms gain with training
unchanged, at the file's own batch size; "—" where the report has none), the smallest gain the noise check
could resolve (search.noise.resolvable_gain), how many variants the budget left unmeasured
and how many decisions it left unsettled, and the wall time. Reports stay under --out (by
default a new temporary folder, printed at the end); each run's stderr is in its folder's
optimize.log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples" / "zoo"

# CPU-friendly defaults: batch size, and the image side or sequence length the file is shrunk to
MODELS = {
    "resnet": {"batch": 8, "image": 64},
    "resnet18": {"batch": 16, "image": 64},
    "vit": {"batch": 8, "image": 64},
    "bert": {"batch": 8, "seq": 64},
    "gpt2": {"batch": 4, "seq": 64},
    "text_gru": {"batch": 32, "seq": 64},
}
# the files' own sizes (--full-size)
FULL = {
    "resnet": {"batch": 32, "image": 224},
    "resnet18": {"batch": 32, "image": 224},
    "vit": {"batch": 32, "image": 224},
    "bert": {"batch": 32, "seq": 128},
    "gpt2": {"batch": 8, "seq": 256},
    "text_gru": {"batch": 64, "seq": 128},
}


def workload_size(name: str, args) -> dict:
    """{"batch", "image" | "seq"} for one model: the defaults, then the flags."""
    size = dict((FULL if args.full_size else MODELS)[name])
    if args.batch_size:
        size["batch"] = args.batch_size
    if "image" in size and args.image_size:
        size["image"] = args.image_size
    if "seq" in size and args.seq_len:
        size["seq"] = args.seq_len
    return size


def run_one(name: str, size: dict, out: Path, args) -> tuple[dict | None, float, str]:
    """One `autoopt optimize` subprocess: (report.json or None, wall seconds, failure text)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if "image" in size:
        env["AUTOOPT_ZOO_IMAGE_SIZE"] = str(size["image"])
    if "seq" in size:
        env["AUTOOPT_ZOO_SEQ_LEN"] = str(size["seq"])
    cmd = [sys.executable, "-m", "autoopt", "optimize", str(ZOO / f"{name}.py"), "--yes", "--accept", "batch_size",
           "--json", "--out", str(out), "--force", "--time-budget", str(args.time_budget), "--device", args.device,
           "--batch-size", str(size["batch"])]
    if args.quick:
        cmd.append("--quick")
    timeout = args.timeout or 3 * args.time_budget + 600
    t0 = time.perf_counter()
    with open(out / "optimize.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    report_path = out / "report.json"
    if proc.returncode == 0 and report_path.is_file():
        return json.loads(report_path.read_text()), wall, ""
    tail = (out / "optimize.log").read_text().strip().splitlines()[-1:] or [""]
    return None, wall, f"exit {proc.returncode}: {tail[0][:160]}"


def fixed_batch_speedup(report: dict) -> float | None:
    """The speedup with training unchanged, as the report states it (final.fixed_batch_speedup)."""
    return (report.get("final") or {}).get("fixed_batch_speedup")


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def table_row(name: str, run: int, size: dict, report: dict | None, wall: float, failure: str) -> str:
    extent = f"{size['image']}px" if "image" in size else f"seq {size['seq']}"
    head = f"| {name} | {run} | bs {size['batch']}, {extent} |"
    if report is None:
        return f"{head} failed: {failure} | — | — | — | — | — | {wall:.0f} |"
    fin, search = report["final"], report.get("search") or {}
    codes = fin.get("codes") or []
    if len(codes) != len(fin["transforms"]):
        codes = [""] * len(fin["transforms"])
    kept = ", ".join(f"{c} {t['name']}".strip() for c, t in zip(codes, fin["transforms"])) or "none"
    if "batch_size" in {t["name"] for t in fin["transforms"]}:
        kept += f" (bs {fin.get('batch_size')})"
    low, high = fin.get("speedup_low"), fin.get("speedup_high")
    span = f" ({low:.2f}-{high:.2f})" if low is not None and high is not None else ""
    noise = (search.get("noise") or {}).get("resolvable_gain")
    resolvable = "—" if noise is None else f"{noise:.0%}"
    return (f"{head} {kept} | {fin['speedup']:.2f}x{span} | {_x(fixed_batch_speedup(report))} | {resolvable} "
            f"| {len(search.get('unmeasured') or [])} | {len(search.get('unsettled') or [])} | {wall:.0f} |")


HEADER = [
    "| model | run | workload | kept transforms | final speedup (95 % range) "
    "| fixed-batch speedup (training unchanged) | resolvable gain | unmeasured | unsettled | wall s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--time-budget", type=float, default=300, help="seconds per optimize run (default 300)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per model (one row each)")
    ap.add_argument("--out", help="keep the reports here (default: a new temporary folder)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, help="batch size for every model (default: per model)")
    ap.add_argument("--image-size", type=int, help="image side for resnet/resnet18/vit (a multiple of 16 for vit)")
    ap.add_argument("--seq-len", type=int, help="sequence length for bert/gpt2/text_gru")
    ap.add_argument("--full-size", action="store_true", help="the files' own sizes (for a GPU) unless flags say")
    ap.add_argument("--quick", action="store_true", help="pass --quick to optimize (fewer timed steps)")
    ap.add_argument("--timeout", type=float, help="seconds before a run is killed (default 3 x budget + 600)")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; the zoo has {', '.join(MODELS)}")
    return args, names


def main(argv=None) -> int:
    args, names = parse_args(argv)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="zoo_bench-"))
    rows = list(HEADER)
    failed = 0
    for name in names:
        size = workload_size(name, args)
        for run in range(1, args.repeat + 1):
            report, wall, failure = run_one(name, size, out_root / f"{name}-{run}", args)
            failed += report is None
            done = f"{report['final']['speedup']:.2f}x" if report else failure
            print(f"[zoo_bench] {name} run {run}: {done} in {wall:.0f} s", file=sys.stderr)
            rows.append(table_row(name, run, size, report, wall, failure))
    print("\n".join(rows))
    print(f"\nreports: {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
