"""Record the GPU traces of the planted models that tests/test_planted.py reads.

    python tests/planted/record_gpu_traces.py OUT_DIR [--batch-scale N] [--models NAME,...]

For every model file in tests/planted/ this runs what `autoopt profile --device cuda`
runs — build the workload, measure (warm-up, then timed steps), trace a few steps with
torch.profiler — and writes, per model, into OUT_DIR/<model>-b<batch size>/:

- `<model>.pt.trace.json.gz`: the Kineto trace as torch.profiler wrote it;
- `facts.json`: what the live run knew besides the trace (device capabilities, torch
  settings, the model file's workload and model facts, the timed measurement), i.e.
  `autoopt.diagnosis.facts_builder.build_facts(device=caps, live=True, workload=..., measurement=...)`, plus the torch version
  and the device name.

The test combines the two exactly as `autoopt profile` does (trace facts first, live facts
over them), so the rules see on this CPU-only machine what they saw on the GPU. It needs
a CUDA device; it does not need orjson (the trace is analyzed later, where the tests run).

tests/planted/gpu_traces/ holds the recordings the tests use, made on one NVIDIA H200
(torch 2.11.0+cu130) with `--batch-scale 1` (the files' own batch sizes), `--batch-scale
64` (fp32_gemm, control_bf16, nchw_cnn) and `--batch-scale 512` (host_read and its
control: per-block GPU work large enough that a host read has queued work to wait for).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def record(model: Path, out: Path, batch_scale: int) -> dict:
    import torch

    from autoopt.diagnosis.facts_builder import build_facts
    from autoopt.env import detect_capabilities
    from autoopt.run.measure import MeasureSettings, measure
    from autoopt.run.session import Session
    from autoopt.run.trace import ProfileSettings, new_run_dir, trace_session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    spec = load_model_file(str(model))
    caps = detect_capabilities("cuda")
    bs = (spec.default_batch_size or 32) * batch_scale
    wl = build_workload(spec, caps, batch_size=bs, seed=0)
    with Session(wl, wl.base_config()) as s:
        m = measure(s, caps, MeasureSettings.quick())
        tmp = Path(tempfile.mkdtemp())
        run = trace_session(s, new_run_dir(tmp, spec.name),
                            ProfileSettings(wait=1, warmup=2, active=3, with_stack=True))
    dest = out / f"{spec.name}-b{bs}"
    dest.mkdir(parents=True, exist_ok=True)
    (trace,) = run.trace_files
    shutil.copy(trace, dest / f"{spec.name}.pt.trace.json.gz")
    facts = build_facts(device=wl.caps, live=True, workload=wl.facts, measurement=m)
    record = {"model": spec.name, "torch_version": torch.__version__, "device": caps.name,
              "batch_size": bs, "facts": facts}
    (dest / "facts.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--batch-scale", type=int, default=1)
    ap.add_argument("--models", default="", help="comma-separated model names (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = [n for n in args.models.split(",") if n]
    for model in sorted(HERE.glob("*.py")):
        if model.name == Path(__file__).name or (names and model.stem not in names):
            continue
        t0 = time.perf_counter()
        try:
            r = record(model, out, args.batch_scale)
        except Exception as e:  # one broken model must not lose the others' traces
            print(f"{model.stem}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        f = r["facts"]
        print(f"{model.stem}: batch {r['batch_size']}, step {f.get('metrics.step_time_ms'):.3f} ms, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
