"""`autoopt profile --script train.py -- ARGS`: an unmodified training script under
torch.profiler, then the same analysis and rules as a model file.

The script runs in this process (runpy, `sys.argv = [script] + ARGS`, its directory first
on sys.path, as `python train.py ARGS` would). Steps are marked where training steps
really end: at each `optimizer.step()`, through torch's global optimizer hooks
(`torch.optim.optimizer.register_optimizer_step_post_hook`), whatever the script's
loop looks like.

1. From the start until the first optimizer step, a plain profiler records (the fallback
   for a script that never steps an optimizer: it is then profiled as a whole, one
   window, and the result says so). Global module-forward hooks watch the outermost
   module call meanwhile: the model, its batch, and the source line that calls it.
2. At the first optimizer step that recording is dropped and a scheduled profiler starts
   (warm-up steps, then `steps` profiled steps, the layout autoopt.run.trace writes); each
   further step of the same optimizer calls `prof.step()`. After the last profiled step
   the trace is written and the hook raises a private exception (a BaseException, so a
   script's `except Exception` does not swallow it) that stops the script cleanly.
3. The trace is analyzed (autoopt.analyze) and the rules run on its metrics plus the
   facts the hooks saw (optimizer class and implementation, model structure, batch,
   DataLoader settings, torch's global settings). Nothing is changed automatically: the
   findings say what to change, with the script's source lines — from live frames (where
   the script calls the model and steps the optimizer) and from the trace's stacks
   (synchronisations, data-dependent operators, DataLoader iteration; recorded with
   with_stack=True).

The script's own prints go to stderr, so `--json` keeps stdout to one JSON document.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import gc
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Optional

from autoopt.errors import UserError
from autoopt.pipelines.script_sites import _site_mode, trace_sites
from autoopt.scripting.facts import autocast_on as _autocast_on
from autoopt.scripting.facts import batch_facts as _batch_facts
from autoopt.scripting.facts import env_facts as _env_facts
from autoopt.scripting.facts import loader_facts as _loader_facts
from autoopt.scripting.facts import model_facts, optimizer_facts
from autoopt.scripting.facts import optimizer_impl_of as _optimizer_impl
from autoopt.scripting.facts import user_frame_site as _user_frame_site
from autoopt.scripting.target import check_script as _check_script
from autoopt.userfiles import is_user_file

DEFAULT_STEPS = 3
WARMUP_STEPS = 1
MAX_OUTER_CALLS = 50  # outermost module calls watched before the forward hooks remove themselves


class _StopScript(BaseException):
    """Raised from the optimizer hook after the last profiled step."""


class _Probe:
    """What the hooks see while the script runs."""

    def __init__(self, run_dir: Path, worker: str, steps: int, warmup: int, activities, with_stack: bool):
        self.run_dir = run_dir
        self.worker = worker
        self.steps = steps
        self.warmup = warmup
        self.activities = activities
        self.with_stack = with_stack
        self.phase = "start"  # start -> steps -> done
        self.optimizer_steps = 0
        self.pacer: Optional[int] = None  # id of the optimizer whose steps mark the profiler's steps
        self.optimizers: dict[int, dict] = {}
        self.step_sites: collections.Counter = collections.Counter()
        self.forward_sites: collections.Counter = collections.Counter()
        self.outer_calls = 0
        self.depth = 0
        self.models: dict[int, dict] = {}
        self.model_ref = None
        self.env_facts: dict[str, Any] = {}
        self.loader_facts: dict[str, Any] = {}
        self.prof_a = None
        self.prof_b = None
        self.module_hooks: list = []
        self.notes: list[str] = []
        self.site_mode = None
        self.live_sites: dict[str, collections.Counter] = {
            "sync": collections.Counter(), "data_dependent": collections.Counter(),
            "dataloader": collections.Counter()}

    # -------------------------------------------------------------- module hooks
    def forward_pre(self, module, args) -> None:
        if self.depth == 0:
            self.outer_calls += 1
            site = _user_frame_site(3)
            if site:
                self.forward_sites[site] += 1
            key = id(module)
            if key not in self.models:
                info = {"module": module, "calls": 0, "batch": None, "autocast": False,
                        "params": sum(p.numel() for p in module.parameters())}
                self.models[key] = info
            info = self.models[key]
            info["calls"] += 1
            if info["batch"] is None:
                info["batch"] = _batch_facts(args)
            info["autocast"] = info["autocast"] or _autocast_on()
            if self.outer_calls >= MAX_OUTER_CALLS:
                self.remove_module_hooks()
        self.depth += 1

    def forward_post(self, module, args, output) -> None:
        self.depth = max(0, self.depth - 1)

    def remove_module_hooks(self) -> None:
        for h in self.module_hooks:
            h.remove()
        self.module_hooks = []
        self.depth = 0

    # -------------------------------------------------------------- optimizer hook
    def optimizer_post(self, optimizer, args, kwargs) -> None:
        key = id(optimizer)
        if key not in self.optimizers:
            self.optimizers[key] = {"type": type(optimizer).__name__, "impl": _optimizer_impl(optimizer), "steps": 0}
        self.optimizers[key]["steps"] += 1
        if self.pacer is None:
            self.pacer = key
        if key != self.pacer:
            return
        self.optimizer_steps += 1
        if self.optimizer_steps <= 3:
            site = _user_frame_site(2)
            if site:
                self.step_sites[site] += 1
        if self.phase == "start":
            self._begin_steps()
        elif self.phase == "steps":
            self.stop_site_mode()
            self.prof_b.step()
            if self.prof_b.step_num >= self.warmup + self.steps:
                self.phase = "done"
                raise _StopScript()
        elif self.phase == "done":
            raise _StopScript()

    def _begin_steps(self) -> None:
        from torch.profiler import profile, schedule, tensorboard_trace_handler

        self.remove_module_hooks()
        self.env_facts = _env_facts()
        self.loader_facts = _loader_facts(self._model_batch_size())
        if self.prof_a is not None:
            self.prof_a.stop()  # kept (stopped, unexported) in case the steps window never completes
        self.prof_b = profile(
            activities=self.activities,
            schedule=schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.run_dir), worker_name=self.worker, use_gzip=True),
            record_shapes=True, profile_memory=True, with_stack=self.with_stack,
        )
        self.prof_b.start()
        self.phase = "steps"
        if self.warmup >= 1:  # the warm-up step (not profiled) is watched for source lines
            self.site_mode = _site_mode(self.live_sites)
            self.site_mode.__enter__()

    def stop_site_mode(self) -> None:
        if self.site_mode is not None:
            mode, self.site_mode = self.site_mode, None
            with contextlib.suppress(Exception):
                mode.__exit__(None, None, None)

    # -------------------------------------------------------------- model
    def model_info(self) -> Optional[dict]:
        live = list(self.models.items())
        if not live:
            return None
        # the outermost module with the most parameters: the model (not a loss or a transform)
        k, v = max(live, key=lambda kv: (kv[1]["params"], kv[1]["calls"]))
        return v

    def _model_batch_size(self) -> Optional[int]:
        info = self.model_info()
        return (info["batch"] or {}).get("batch_size") if info else None


# ------------------------------------------------------------------------------- entry point
def _script_error(exc: BaseException, path: Path, shown: str) -> UserError:
    import traceback

    tb = traceback.extract_tb(exc.__traceback__)
    where = ""
    for fr in reversed(tb):
        if os.path.abspath(fr.filename) == str(path) or is_user_file(fr.filename):
            where = f" at {fr.filename}:{fr.lineno} (in {fr.name})"
            break
    msg = " ".join(str(exc).split())[:500]
    hint = ""
    if "profiler" in msg.lower() and ("enabled" in msg.lower() or "already" in msg.lower()):
        hint = " The script starts its own profiler; autoopt profiles it already: run it with the profiler off."
    return UserError(f"The script {shown} raised {type(exc).__name__}: {msg}{where} while autoopt profiled it.{hint} "
                     f"Fix: make `python {shown} ...` with the same arguments run on its own first; --debug shows "
                     "the traceback.", cause=exc)


def profile_script(script_path: str, args: list[str], *, steps: Optional[int] = None, logdir: Optional[str] = None,
                   warmup: int = WARMUP_STEPS, with_stack: bool = True) -> dict[str, Any]:
    """Run an unmodified training script under torch.profiler for a bounded number of
    optimizer steps, analyze and diagnose it. Returns `autoopt profile --json`'s object
    plus "script", "script_path", "args", "optimizer_steps", "profiled_steps",
    "sources" and "notes"."""
    steps = DEFAULT_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps!r}).")
    shown = str(script_path)
    path = _check_script(script_path)  # before importing torch: a bad path fails fast

    from autoopt.analyze import analyze_paths

    probe = _new_probe(path, steps, logdir, warmup, with_stack)
    exit_status = _run_script(probe, path, shown, args)
    if not probe.env_facts:
        probe.env_facts = _env_facts()
        probe.loader_facts = _loader_facts(probe._model_batch_size())
    notes = _write_window(probe, steps)
    traces = sorted(probe.run_dir.glob("*.pt.trace.json.gz"))
    if not traces:
        raise UserError(f"The profiler wrote no trace for {shown} in {probe.run_dir}. Fix: run the script for at least "
                        f"{probe.warmup + 2} optimizer steps, or check that nothing else in it uses torch.profiler.")

    result = analyze_paths([str(probe.run_dir)])
    facts, model_found = _facts(result, probe)
    sources = _sources(probe, traces, with_stack, notes)
    # exact lines seen live in the warm-up step win over the trace's function-level ones
    if probe.live_sites["sync"]:
        facts["metrics.sync_sites"] = sources["sync"]
    if probe.live_sites["data_dependent"]:
        facts["metrics.data_dependent_sites"] = sources["data_dependent"]
    if not model_found:
        notes.append("no torch.nn.Module call was seen: the model.* facts are unknown and rules on them stay silent")
    return _script_result(result, probe, path, args, facts, sources, notes, exit_status)


def _new_probe(path: Path, steps: int, logdir: Optional[str], warmup: int, with_stack: bool) -> _Probe:
    """The probe for this run, with its new run directory under logdir (default reports/profiles)."""
    import torch
    from torch.profiler import ProfilerActivity

    from autoopt.run.trace import new_run_dir
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(logdir) if logdir else Path("reports") / "profiles"
    run_dir = new_run_dir(root, f"{path.stem}-script-{stamp}").resolve()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    worker = path.stem
    return _Probe(run_dir, worker, steps, max(0, int(warmup)), activities, with_stack)


def _run_script(probe: _Probe, path: Path, shown: str, args: list[str]) -> int:
    """Run the script as __main__ under the probe's hooks and first profiler, then undo every
    change to the process; returns its exit status, raises its failure as a UserError."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.profiler import profile

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    opt_hook = register_optimizer_step_post_hook(probe.optimizer_post)
    # the source-line mode watches the script's own loop, never the inside of optimizer.step()
    # (a TorchFunctionMode over its kernels costs time there; once, under it, SGD.step raised ReferenceError)
    pre_hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: probe.stop_site_mode())
    probe.module_hooks = [torch.nn.modules.module.register_module_forward_pre_hook(probe.forward_pre)]
    try:
        probe.module_hooks.append(torch.nn.modules.module.register_module_forward_hook(probe.forward_post,
                                                                                      always_call=True))
    except TypeError:  # pragma: no cover - older torch
        probe.module_hooks.append(torch.nn.modules.module.register_module_forward_hook(probe.forward_post))
    probe.prof_a = profile(activities=probe.activities, record_shapes=True, profile_memory=True,
                           with_stack=probe.with_stack)
    exit_status = 0
    failure: Optional[UserError] = None
    try:
        sys.argv = [str(path)] + [str(a) for a in args]
        sys.path.insert(0, str(path.parent))
        probe.prof_a.start()
        with contextlib.redirect_stdout(sys.stderr):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except _StopScript:
                pass
            except SystemExit as e:
                code = e.code
                if code not in (None, 0):
                    exit_status = code if isinstance(code, int) else 1
                    if probe.phase != "done":
                        failure = UserError(
                            f"The script {shown} exited with status {code!r} before autoopt could profile it"
                            + (" (an argparse usage error exits 2: check the arguments after --)" if code == 2 else "")
                            + f". Fix: make `python {shown} {' '.join(args)}` run on its own first.", cause=e)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - the script's own error becomes a UserError
                failure = _script_error(e, path, shown)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        opt_hook.remove()
        pre_hook.remove()
        _stop_probe(probe)
    if failure is not None:
        raise failure
    return exit_status


def _stop_probe(probe: _Probe) -> None:
    """Remove the probe's hooks and stop its profilers (a window cut short is still written)."""
    probe.stop_site_mode()
    probe.remove_module_hooks()
    if probe.prof_b is not None:
        with contextlib.suppress(Exception):
            probe.prof_b.stop()  # a window cut short by the script's end is still written
    elif probe.prof_a is not None and probe.phase == "start":
        with contextlib.suppress(Exception):
            probe.prof_a.stop()
    gc.collect()  # DataLoader workers of the stopped script shut down with their iterators


def _write_window(probe: _Probe, steps: int) -> list[str]:
    """Notes on what was profiled; without a steps window, the first profiler's recording is
    written as the trace."""
    from torch.profiler import tensorboard_trace_handler

    run_dir, worker = probe.run_dir, probe.worker
    traces = sorted(run_dir.glob("*.pt.trace.json.gz"))
    notes: list[str] = []
    if probe.optimizer_steps == 0:
        notes.append("the script never stepped an optimizer (no optimizer.step() call): it was profiled as a whole, "
                     "one window from start to end, without per-step numbers")
        tensorboard_trace_handler(str(run_dir), worker_name=worker, use_gzip=True)(probe.prof_a)
    elif not traces:
        notes.append(f"the script stepped its optimizer only {probe.optimizer_steps} time(s), too few for the warm-up "
                     f"and a profiled step: its start and first step were profiled as one window")
        tensorboard_trace_handler(str(run_dir), worker_name=worker, use_gzip=True)(probe.prof_a)
    elif probe.phase != "done":
        profiled = max(0, probe.prof_b.step_num - probe.warmup)
        notes.append(f"the script ended after {probe.optimizer_steps} optimizer step(s): {profiled} of the {steps} "
                     "requested step(s) were profiled")
    else:
        notes.append(f"stopped the script after {probe.optimizer_steps} optimizer steps: {probe.warmup} warm-up and "
                     f"{steps} profiled step(s), each ending at optimizer.step()")
    if len(probe.optimizers) > 1:
        names = ", ".join(o["type"] for o in probe.optimizers.values())
        notes.append(f"the script steps {len(probe.optimizers)} optimizers ({names}); steps are marked at the first "
                     "one's step()")
    probe.prof_a = probe.prof_b = None
    return notes


def _sources(probe: _Probe, traces: list[Path], with_stack: bool, notes: list[str]) -> dict[str, list[str]]:
    """The script's source lines behind the findings: live frames first, the trace's stacks where
    the warm-up step saw nothing."""
    sources = {
        "optimizer_step": [s for s, _ in probe.step_sites.most_common(3)],
        "model_forward": [s for s, _ in probe.forward_sites.most_common(3)],
        "sync": [], "data_dependent": [], "dataloader": [],
    }
    for key, counter in probe.live_sites.items():
        sources[key] = [f"{site} — {what} x{n}" for (site, what), n in counter.most_common(5)]
    if with_stack and not all(sources[k] for k in ("sync", "data_dependent", "dataloader")):
        try:  # the trace's stacks name the function where the warm-up step saw nothing
            for key, found in trace_sites(str(traces[0])).items():
                if not sources[key]:
                    sources[key] = found
        except Exception as e:  # noqa: BLE001 - the findings stand without stack-derived lines
            notes.append(f"source functions from the trace's stacks unavailable: {type(e).__name__}: {e}")
    return sources


def _script_result(result: dict, probe: _Probe, path: Path, args: list[str], facts: dict,
                   sources: dict[str, list[str]], notes: list[str], exit_status: int) -> dict[str, Any]:
    """The rules' findings on the facts, with their source lines, added to the analysis."""
    from autoopt.diagnosis.facts_builder import diagnose

    findings = diagnose(facts, result)
    fjson = [_with_sources(f, sources) for f in findings]
    result.setdefault("notes", [])
    result["notes"] = list(result["notes"]) + notes
    device = _device_json(probe)
    result.update({
        "script": path.name,
        "script_path": str(path),
        "args": list(args),
        "model": path.stem,
        "mode": "train" if probe.optimizer_steps else "whole-script",
        "device": device,
        "optimizer_steps": probe.optimizer_steps,
        "profiled_steps": (result.get("metrics") or {}).get("steps") or 0,
        "optimizers": [{k: v for k, v in o.items()} for o in probe.optimizers.values()],
        "sources": sources,
        "exit_status": exit_status,
        "logdir": str(probe.run_dir),
        "findings": fjson,
        "advice_only": "autoopt does not change scripts: each finding says what to change and where",
    })
    return result


def _device_json(probe: _Probe) -> dict:
    from autoopt.env import detect_capabilities

    info = probe.model_info()
    dev = (info or {}).get("batch") or {}
    m = info["module"] if info else None
    kind = None
    if m is not None:
        p = next(m.parameters(), None)
        kind = p.device.type if p is not None else None
    kind = kind or dev.get("device") or "cpu"
    try:
        return detect_capabilities("cuda" if kind == "cuda" else "cpu").to_json()
    except UserError:
        return detect_capabilities("cpu").to_json()


def _facts(result: dict, probe: _Probe) -> tuple[dict, bool]:
    """The rules' facts of a script run (autoopt.diagnosis.facts_builder): the trace analysis,
    the device the script's model ran on, the torch settings the script ran with, and the
    workload facts its model, optimizer, loader and batches show; and whether a model was seen."""
    from autoopt.diagnosis.facts_builder import build_facts
    from autoopt.env import available_cpus, detect_capabilities

    info = probe.model_info()
    model = info["module"] if info else None
    kind = "cpu"
    if model is not None:
        p = next(model.parameters(), None)
        kind = p.device.type if p is not None else ((info.get("batch") or {}).get("device") or "cpu")
    try:
        caps = detect_capabilities("cuda" if kind == "cuda" else "cpu")
    except UserError:
        caps = detect_capabilities("cpu")
    wf: dict[str, Any] = dict(probe.loader_facts)
    wf["workload.cpu_count"] = available_cpus()
    wf.update(_optimizer_facts(probe))
    if model is not None:
        wf.update(_model_facts(model, info))
    facts = build_facts(analysis=result, device=caps, env=probe.env_facts, workload=wf)
    # the trace's own step time is all there is for a script (no separate timed run)
    return facts, model is not None


def _optimizer_facts(probe: _Probe) -> dict[str, Any]:
    if probe.pacer is None:
        return optimizer_facts(None, None)
    o = probe.optimizers[probe.pacer]
    return optimizer_facts(o["type"], o["impl"])


def _model_facts(model, info: dict) -> dict[str, Any]:
    return model_facts(model, info.get("batch"), bool(info.get("autocast")))


# rule family -> the source lines a finding of that family points at
_FAMILY_SOURCES = {
    "precision": ("model_forward",),
    "memory layout": ("model_forward",),
    "compilation and launch overhead": ("model_forward",),
    "batch size and memory": ("dataloader", "model_forward"),
    "input pipeline": ("dataloader", "model_forward"),
    "host-device synchronisation": ("sync", "data_dependent"),
    "optimizer": ("optimizer_step",),
    "distributed": ("model_forward",),
}


def _with_sources(f, sources: dict[str, list[str]]) -> dict:
    d = f.to_json()
    lines: list[str] = []
    for key in _FAMILY_SOURCES.get(f.family, ()):
        if sources.get(key):
            lines = sources[key]
            break
    d["sources"] = lines
    if lines and "(at " not in d["message"]:
        shown = lines[0].split(" — ")[0]
        d["message"] = f"{d['message']} (at {shown})"
    return d
