"""Trace-analysis benchmark: autoopt against torch-tb-profiler and Holistic Trace Analysis.

Each tool runs as a whole command (a fresh Python process, start-up and imports included) on
the same trace files in the same run; wall time and the command's peak RSS (os.wait4) are
measured, medians over --repeat runs, and ratios are taken side by side. The ~1 GB case is
synthesized under /tmp by repeating a real ResNet-50 V100 trace in time (ids renumbered).

    python bench/analyze_bench.py                 # real traces + the 1 GB trace, all three tools
    python bench/analyze_bench.py --no-big        # real traces only
    python bench/analyze_bench.py --big-only --repeat 1

What each command does:
- autoopt:  python -m autoopt.analyze TRACE --json  (every analysis, JSON on stdout)
- tb:       torch_tb_profiler RunProfileData.parse + process (what TensorBoard's plugin runs to
            build its overview, operator, kernel and GPU-metric views of one trace)
- hta:      hta TraceAnalysis(trace_dir) + temporal breakdown + idle-time breakdown

Each small trace gets one untimed warm-up run per tool first (bytecode and page caches).
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "tests" / "data" / "traces" / "real"
REAL = [TRACES / "kineto" / "resnet50_v100_num_workers_0.pt.trace.json.gz",
        TRACES / "param" / "resnet_rtx2080ti_no_profiler_step.json.gz",
        TRACES / "hta" / "v100_gpu_bound_ns_resolution_2024.pt.trace.json.gz"]
BIG_SOURCE = TRACES / "kineto" / "resnet50_v100_num_workers_0.pt.trace.json.gz"
WORK = Path(tempfile.gettempdir()) / "autoopt_analyze_bench"
# every tool runs as it would once installed: with compiled bytecode (pip compiles site-packages;
# this sandbox sets PYTHONDONTWRITEBYTECODE, so a cache directory under /tmp stands in for it)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")

TB = """
import sys, logging
logging.disable(logging.CRITICAL)
from torch_tb_profiler.profiler.data import RunProfileData
p = RunProfileData.parse('worker0', 'span', sys.argv[1], sys.argv[2])
print(p.gpu_metrics_parser.gpu_utilization[0] if p.gpu_metrics_parser.gpu_ids else None)
"""
HTA = """
import sys, logging, warnings
logging.disable(logging.CRITICAL)
warnings.filterwarnings('ignore')
from hta.trace_analysis import TraceAnalysis
a = TraceAnalysis(trace_dir=sys.argv[1])
print(a.get_temporal_breakdown(visualize=False).to_string())
print(a.get_idle_time_breakdown(visualize=False)[0].to_string())
"""


def run(cmd: list[str], timeout: float) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS MB, exit status, CPU seconds) of one command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    try:
        _, status, ru = _wait4(p, timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return float("nan"), float("nan"), -9, float("nan")
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  ! {' '.join(cmd[:4])} ... exited {code}: {err.strip().splitlines()[-1:] }", file=sys.stderr)
    return wall, ru.ru_maxrss / 1024.0, code, ru.ru_utime + ru.ru_stime


def _wait4(p: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, ru
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(p.args, timeout)
        time.sleep(0.01)


def commands(trace: Path) -> dict[str, list[str]]:
    hta_dir = WORK / f"hta_{trace.name}"
    if not hta_dir.exists():
        hta_dir.mkdir(parents=True)
        os.symlink(trace, hta_dir / trace.name)
    cache = WORK / "tb_cache"
    cache.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    return {
        "autoopt": [py, "-m", "autoopt.analyze", str(trace), "--json"],
        "torch-tb-profiler": [py, "-c", TB, str(trace), str(cache)],
        "hta": [py, "-c", HTA, str(hta_dir)],
    }


def _shifted(e: dict, dt: float, did: int, dstep: int) -> dict:
    """An event of a later copy: its time, flow and correlation ids and step number moved on."""
    e = dict(e)
    if isinstance(e.get("ts"), (int, float)):
        e["ts"] = e["ts"] + dt
    if e.get("ph") in ("s", "f") and isinstance(e.get("id"), int):
        e["id"] = e["id"] + did
    a = e.get("args")
    if isinstance(a, dict):
        a = dict(a)
        for k in ("correlation", "External id", "external id"):
            if isinstance(a.get(k), int) and a[k] > 0:
                a[k] = a[k] + did
        e["args"] = a
    n = e.get("name")
    if isinstance(n, str) and n.startswith("ProfilerStep#"):
        e["name"] = f"ProfilerStep#{int(n.split('#')[1]) + dstep}"
    return e


def synthesize(source: Path, target_bytes: int) -> Path:
    """Repeat a real trace in time until it reaches target_bytes; correlation / External ids and
    ProfilerStep numbers are offset per copy so that every copy stays a consistent trace."""
    raw = source.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    doc = orjson.loads(raw)
    evs = doc.pop("traceEvents")
    reps = max(1, round(target_bytes / len(orjson.dumps(evs))))
    out = WORK / f"{source.name.split('.')[0]}_x{reps}.json"
    if out.exists() and out.stat().st_size > 0.9 * target_bytes:
        return out
    ts = [e["ts"] for e in evs if isinstance(e.get("ts"), (int, float))]
    span = (max(ts) - min(ts)) + 1000
    ids = [v for e in evs for k in ("correlation", "External id", "external id")
           for v in [(e.get("args") or {}).get(k)] if isinstance(v, int)]
    idspan = max(ids) + 1
    steps = [int(e["name"].split("#")[1]) for e in evs if str(e.get("name", "")).startswith("ProfilerStep#")]
    stepspan = (max(steps) + 1) if steps else 0
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        head = orjson.dumps(doc)[:-1]
        f.write(head + (b"," if len(doc) else b"") + b'"traceEvents":[\n')
        first = True
        for r in range(reps):
            for e in evs:
                ph = e.get("ph")
                if r and ph == "M":
                    continue
                if r and e.get("name") in ("Record Window End", "Iteration Start: PyTorch Profiler"):
                    continue
                if r:
                    e = _shifted(e, r * span, r * idspan, r * stepspan)
                    if e.get("cat") == "Trace":
                        continue
                if not first:
                    f.write(b",\n")
                f.write(orjson.dumps(e))
                first = False
        f.write(b"\n]}\n")
    tmp.rename(out)
    return out


def json_size(p: Path) -> int:
    with open(p, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return p.stat().st_size
    n = 0
    with gzip.open(p, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return n
            n += len(b)


def bench(traces: list[Path], repeat: int, tools: list[str], timeout: float, warmup: bool = True) -> list[dict]:
    rows = []
    for tr in traces:
        size_mb = json_size(tr) / 1e6
        cmds = commands(tr)
        res: dict[str, list[tuple[float, float, int, float]]] = {t: [] for t in tools}
        if warmup:
            for t in tools:  # bytecode caches and the page cache, for every tool alike
                run(cmds[t], timeout)
        for _ in range(repeat):
            for t in tools:  # interleaved, so that machine noise hits every tool alike
                res[t].append(run(cmds[t], timeout))
        row = {"trace": tr.name, "size_mb": size_mb}
        for t in tools:
            ok = [r for r in res[t] if r[2] == 0]
            row[t] = (statistics.median(r[0] for r in ok), max(r[1] for r in ok),
                      statistics.median(r[3] for r in ok)) if ok else None
        rows.append(row)
        print(_fmt_row(row, tools), flush=True)
    return rows


def _fmt_row(row: dict, tools: list[str]) -> str:
    cells = [row["trace"], f"{row['size_mb']:.0f}"]
    base = row.get("autoopt")
    for t in tools:
        v = row.get(t)
        cells.append("failed" if v is None else f"{v[0]:.2f} s ({v[2]:.2f} s CPU) / {v[1]:.0f} MB")
    for t in tools[1:]:
        v = row.get(t)
        if v is None or base is None:
            cells.append("-")
        else:
            cells.append(f"{v[0] / base[0]:.1f}x / {v[1] / base[1]:.1f}x")
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-gb", type=float, default=1.0)
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--big-only", action="store_true")
    ap.add_argument("--big-repeat", type=int, default=1)
    ap.add_argument("--tools", default="autoopt,torch-tb-profiler,hta")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    tools = args.tools.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    header = ["trace", "JSON MB"] + [f"{t}: wall (CPU) / peak RSS" for t in tools] + [
        f"{t} / autoopt: wall / RSS" for t in tools[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    if not args.big_only:
        bench([p for p in REAL if p.exists()], args.repeat, tools, args.timeout)
    if not args.no_big:
        big = synthesize(BIG_SOURCE, int(args.big_gb * 1e9))
        rows = bench([big], args.big_repeat, tools, args.timeout, warmup=False)
        a = rows[0].get("autoopt")
        if a:
            print(f"\n1 GB goal (< 60 s, < 3 GB): autoopt {a[0]:.1f} s wall ({a[2]:.1f} s CPU), "
                  f"{a[1] / 1024:.2f} GB -> {'met' if a[0] < 60 and a[1] < 3072 else 'NOT met'}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    shutil.rmtree(WORK / "tb_cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
