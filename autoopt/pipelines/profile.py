"""`autoopt profile MODEL`: measure and trace the model file as written, analyze the trace
and run the rules. Nothing is changed; `autoopt optimize` is the command that changes things."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable, Optional

from autoopt.run.measure import MeasureSettings, count_flops, measure
from autoopt.run.trace import ProfileSettings, new_run_dir, trace_session
from autoopt.run.session import Session


def profile_model(
    model_path: str,
    *,
    device: str = "auto",
    batch_size: Optional[int] = None,
    steps: int = 3,
    logdir: Optional[str] = None,
    seed: int = 0,
    with_stack: bool = False,
    measure_settings: Optional[MeasureSettings] = None,
    progress: Callable[..., None] = lambda *a, **k: None,
    caps=None,
) -> dict[str, Any]:
    from autoopt.analyze import analyze_paths
    from autoopt.env import detect_capabilities
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file
    from autoopt.pipelines.optimize import collect_facts
    from autoopt.diagnosis.rules import evaluate, load_rules

    if steps < 1:
        from autoopt.errors import UserError

        raise UserError(f"--steps must be at least 1 (got {steps}).")
    progress("load", f"loading {model_path}")
    spec = load_model_file(model_path)
    caps = caps or detect_capabilities(device)
    wl = build_workload(spec, caps, batch_size=batch_size, seed=seed)
    root = Path(logdir) if logdir else Path("reports") / "profiles"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = wl.base_config().with_(grad_accum_steps=int(getattr(spec.module, "GRAD_ACCUM_STEPS", 1) or 1))
    with Session(wl, cfg) as s:
        progress("measure", "measuring (warm-up, then timed steps)")
        flops = count_flops(s)
        m = measure(s, caps, measure_settings or MeasureSettings(), flops_per_step=flops)
        progress("profile", "tracing with torch.profiler")
        run = trace_session(s, new_run_dir(root, f"{spec.name}-{stamp}"),
                            ProfileSettings(active=steps, with_stack=with_stack))
    progress("analyze", "analyzing the trace")
    result = analyze_paths([str(run.run_dir)])
    facts = collect_facts(wl, result, m)
    findings = evaluate(load_rules(), facts)
    result.update({
        "model": spec.name,
        "model_path": str(spec.path),
        "mode": wl.mode,
        "device": caps.to_json(),
        "measurement": m.to_json(),
        "logdir": str(run.run_dir.resolve()),
        "findings": [f.to_json() for f in findings],
    })
    return result
