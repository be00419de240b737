"""`autoopt profile MODEL`: measure and trace the model file as written, analyze the trace
and run the rules. Nothing is changed; `autoopt optimize` is the command that changes things."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable, Optional

from autoopt.diagnosis.facts_builder import build_facts, diagnose
from autoopt.errors import UserError
from autoopt.results import ProfileResult
from autoopt.run.measure import count_flops, measure
from autoopt.run.session import Session
from autoopt.run.trace import new_run_dir, trace_session
from autoopt.run.verify import record_run
from autoopt.settings import MeasureSettings, ProfileSettings
from autoopt.types import Capabilities


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
    caps: Optional[Capabilities] = None,
    cpu_busy_other: Optional[float] = None,
) -> dict[str, Any]:
    """`autoopt profile --json`'s object. `caps` replaces the detected device's capabilities
    (tests judge a CPU run as a given CPU would be judged); `cpu_busy_other` the other work
    on a CPU's cores (measured before the run when not given)."""
    from autoopt.analyze import analyze_paths
    from autoopt.env import detect_capabilities
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    if steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps}).")
    progress("load", f"loading {model_path}")
    spec = load_model_file(model_path)
    caps = caps or detect_capabilities(device)
    wl = build_workload(spec, caps, batch_size=batch_size, seed=seed)
    if caps.device_type == "cpu":
        from autoopt.env import cpu_busy_other as measure_other_load
        from autoopt.workload.inspect import note_cpu_load

        note_cpu_load(wl, cpu_busy_other if cpu_busy_other is not None else measure_other_load())
    root = Path(logdir) if logdir else Path("reports") / "profiles"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = wl.base_config().with_(grad_accum_steps=int(getattr(spec.module, "GRAD_ACCUM_STEPS", 1) or 1))
    notes: list[str] = []
    health = None
    with Session(wl, cfg) as s:
        if s.train:  # gradient health on a few seeded steps from the initial weights, before any timed step
            progress("health", "measuring gradient health (4 training steps)")
            health = record_run(s, health=True).health
        progress("measure", "measuring (warm-up, then timed steps)")
        flops = count_flops(s, notes)
        m = measure(s, caps, measure_settings or MeasureSettings(), flops_per_step=flops)
        progress("profile", "tracing with torch.profiler")
        run = trace_session(s, new_run_dir(root, f"{spec.name}-{stamp}"),
                            ProfileSettings(active=steps, with_stack=with_stack))
    progress("analyze", "analyzing the trace")
    result = analyze_paths([str(run.run_dir)])
    result["notes"] = list(result.get("notes") or []) + notes
    facts = build_facts(analysis=result, device=caps, live=True, workload=wl.facts, config=cfg, measurement=m,
                        health=health)
    return ProfileResult(result, spec.name, str(spec.path), wl.mode, caps.to_json(), m.to_json(),
                         str(run.run_dir.resolve()), diagnose(facts, result), extra={"health": health}).to_json()
