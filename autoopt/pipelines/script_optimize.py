"""`autoopt optimize --script train.py -- ARGS`: the whole optimize loop on a training script
as it is.

The stages are the model file's (autoopt.pipelines.optimize.OptimizeRun), with the script's
evaluator (autoopt.scripting.evaluator.ScriptEvaluator): each configuration runs the script's
`__main__` in its own process, with its arguments and working directory, driven through hooks
(autoopt.scripting.driver) for as many optimizer steps as autoopt asks for. So:

1. baseline: the script as written, run twice from the same seed (do its losses repeat? if not,
   the tolerance of every check is widened from the measured seed-to-seed spread, and the report
   says so), traced and measured;
2. findings: the rules on the baseline's trace and on the facts the hooks saw (model, optimizer,
   DataLoader, batch, torch settings);
3. the accepted transforms that hooks can apply to an unmodified script (AMP, channels_last,
   torch.compile, a fused / foreach optimizer, DataLoader settings, TF32, cudnn.benchmark,
   threads) go to the search; the others (batch size, gradient accumulation, activation
   checkpointing, CUDA graphs) are advice with the reason — `skipped` variants, never dropped;
4. search, final re-measurement beside the baseline: as for a model file;
5. the patch: a diff to the script itself (autoopt.patching.script_editor), each change where a
   person would write it; the patched script is run once, as written, and its losses compared
   with the kept configuration's before the diff is written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from autoopt import __version__
from autoopt.diagnosis.facts_builder import build_facts, diagnose
from autoopt.errors import UserError
from autoopt.output.data import ADVICE_PREFIX
from autoopt.pipelines.candidates import CandidateBuilder, Decide, check_try_names
from autoopt.pipelines.optimize import OptimizeRun, Progress, _noop, analyze_run, budget_line
from autoopt.results import Variant
from autoopt.search.trial import Candidate, Point
from autoopt.settings import OptimizeSettings
from autoopt.transforms.base import Transform
from autoopt.types import ExecConfig, Finding, Status

# transforms the driver applies to an unmodified script, through hooks or the framework's knobs
SCRIPT_TRANSFORMS = ("amp", "channels_last", "compile", "fused_optimizer", "dataloader", "tf32", "cudnn_benchmark",
                     "threads")

# why the others stay advice on a script
ADVICE_ONLY = {
    "batch_size": ("autoopt does not change the batch a script builds (its DataLoader's batch_size or its own "
                   "slicing): a larger batch changes training, its epochs and its learning rate. Set it where the "
                   "script takes it (e.g. its --batch-size argument), scale the learning rate with it, and run "
                   "`autoopt optimize --script` again to measure it"),
    "grad_accumulation": ("the script's loop decides when the optimizer steps: accumulating gradients means "
                          "editing the loop (loss / k, step every k batches)"),
    "activation_checkpointing": ("which blocks to recompute is a change inside the model's forward, in the "
                                 "script's model code: wrap the repeated blocks in torch.utils.checkpoint.checkpoint"),
    "cuda_graphs": ("CUDA graphs need the whole step captured with static inputs: try "
                    "torch.compile(model, mode='reduce-overhead') in the script"),
    "inference_mode": "the script trains: inference_mode applies to inference runs",
    "weights_dtype": "the script trains: reduced-precision weights apply to inference runs",
}


# ExecConfig field -> the key of patch_script's changes that writes it
_CHANGE_OF_FIELD = {"amp_dtype": "amp", "grad_scaler": "amp", "compile_mode": "compile",
                    "optimizer_impl": "optimizer_impl", "matmul_precision": "matmul_precision",
                    "dataloader": "dataloader", "cudnn_benchmark": "cudnn_benchmark",
                    "channels_last": "channels_last", "num_threads": "num_threads"}


def advice_reason(name: str) -> Optional[str]:
    """Why transform `name` is advice only on a script (None: the driver applies it)."""
    if name in SCRIPT_TRANSFORMS:
        return None
    why = ADVICE_ONLY.get(name, "autoopt cannot apply it to a script through hooks")
    return f"{ADVICE_PREFIX}{why}"


class ScriptCandidateBuilder(CandidateBuilder):
    """The model file's candidate builder, with the transforms hooks cannot apply to a script
    recorded as skipped advice (with the reason) instead of tried."""

    def _candidate(self, f: Finding, t: Transform, params: dict, ok: bool, *,
                   explore: bool = True) -> Optional[Candidate]:
        reason = advice_reason(t.name)
        if reason is not None:
            self._skip(f, t.name, params, accepted=ok, reason=reason)
            return None
        return super()._candidate(f, t, params, ok, explore=explore)


def script_changes(cfg: ExecConfig, base: ExecConfig) -> dict[str, Any]:
    """What the kept configuration changes, as autoopt.patching.script_editor.patch_script takes it."""
    changes: dict[str, Any] = {
        "amp": None, "channels_last": bool(cfg.channels_last and not base.channels_last), "compile": None,
        "optimizer_impl": cfg.optimizer_impl if cfg.optimizer_impl != base.optimizer_impl else None,
        "dataloader": None, "matmul_precision": None, "cudnn_benchmark": None, "num_threads": None,
        "framework_kwargs": None,
    }
    if cfg.amp_dtype and cfg.amp_dtype != base.amp_dtype:
        changes["amp"] = {"device_type": cfg.device, "dtype": cfg.amp_dtype, "scaler": bool(cfg.grad_scaler)}
    if cfg.compile_call_mode is not None and base.compile_call_mode is None:
        changes["compile"] = {"mode": cfg.compile_call_mode, "backend": cfg.compile_backend}
    if cfg.dataloader and cfg.dataloader != base.dataloader:
        changes["dataloader"] = {k: v for k, v in cfg.dataloader.items() if k != "intra_op_threads"}
    if cfg.matmul_precision and cfg.matmul_precision != base.matmul_precision:
        changes["matmul_precision"] = cfg.matmul_precision
    if cfg.cudnn_benchmark and cfg.cudnn_benchmark != base.cudnn_benchmark:
        changes["cudnn_benchmark"] = True
    threads = cfg.num_threads or (cfg.dataloader or {}).get("intra_op_threads")
    if threads and threads != base.num_threads:
        changes["num_threads"] = int(threads)
    return changes


class ScriptOptimizeRun(OptimizeRun):
    """One `autoopt optimize --script` run. `run()` writes the report directory and returns
    report.json's object (with its "script" section)."""

    no_change = "no transform was verified and faster than the baseline; the script is best as written"

    def __init__(self, settings: OptimizeSettings, decide: Decide, progress: Progress = _noop):
        super().__init__(settings, decide, progress)
        self.target = None
        self.patched_losses: Optional[list[float]] = None

    # ------------------------------------------------------------------ stages
    def _setup(self) -> None:
        from autoopt.env import detect_capabilities
        from autoopt.scripting.evaluator import ScriptEvaluator
        from autoopt.scripting.target import ScriptTarget, check_script

        s = self.settings
        check_try_names(s.extra_transforms)
        path = check_script(s.script_path)
        self.given_path = Path(os.path.abspath(s.script_path))
        self.target = ScriptTarget(path=path, args=[str(a) for a in s.script_args],
                                   cwd=Path(s.script_cwd or os.getcwd()).resolve(), shown=str(s.script_path))
        self.progress("load", f"checking {s.script_path}")
        self.caps = detect_capabilities(s.device)
        self._make_out()
        self.evaluator = ScriptEvaluator(self.target, self.caps, measure_settings=s.measure,
                                         profile_settings=s.profile, search_settings=s.search,
                                         tb_dir=self.tb if s.trace else None, log_dir=self.out / "logs",
                                         seed=s.seed, progress=self.progress,
                                         nproc=max(1, s.distributed.nproc or 1))
        self.base_cfg = ExecConfig(device=self.caps.device_type)
        self.progress("budget", budget_line(s.search.time_budget_s))

    def _baseline(self) -> None:
        self.progress("baseline", f"baseline: running {self.target.shown} as written")
        self.base = self.evaluator.baseline(self.base_cfg)
        self.base_cfg = self.base.config  # with the batch the script feeds its model
        self.workload = self.evaluator.workload
        if self.evaluator.caps is not None:
            self.caps = self.evaluator.caps  # the device the script's model runs on
        if self.caps.device_type == "cpu":
            from autoopt.env import cpu_busy_other
            from autoopt.workload.inspect import note_cpu_load

            note_cpu_load(self.workload, cpu_busy_other())
        self.builder = ScriptCandidateBuilder(self.workload, self.caps, self.decide, self.variants)
        self.notes += self.evaluator.notes
        self.variants.append(Variant(name="baseline", codes=[], transforms=[], accepted=True, status=Status.KEPT,
                                     reason="the script as written", config=self.base_cfg,
                                     measurement=self.base.measurement, speedup=1.0, logdir=self.base.logdir))
        if self.base.logdir:
            self.progress("analyze", "analyzing the baseline trace")
        self.baseline_analysis = analyze_run(self.base.logdir)
        traces = (self.baseline_analysis or {}).get("traces")
        self.analysis["baseline"] = traces[0] if traces else None

    def _diagnose(self, point: Point, analysis: Optional[dict]) -> list:
        facts = build_facts(analysis=analysis, device=self.caps, workload=self.workload.facts, config=point.config,
                            measurement=point.measurement)
        return diagnose(facts, analysis)

    def _final_accuracy(self, best: Point):
        return None  # a script has no evaluate(model) hook

    # ------------------------------------------------------------------ patch and plan
    def _patch(self, best: Point, expected: Optional[list[float]] = None) -> None:
        """patch.diff for the script itself; written only when the patched script, run as
        written, reproduces the kept configuration's losses (`expected`; by default those of
        the verification behind `best`)."""
        from autoopt.patching.editor import unified_diff
        from autoopt.patching.script_editor import patch_script

        ev = self.evaluator
        changes = script_changes(best.config, self.base_cfg)
        if ev.framework:
            self._framework_changes(changes, best.config)
        source = self.target.path.read_text(encoding="utf-8")
        res = patch_script(source, ev.sites, changes, self.given_path.name)
        self.notes += [f"patch: {n} could not be written into the script: {r}" for n, r in res.skipped]
        self.notes += [f"patch: {n}: {r}" for n, r in res.remarks]
        if not res.applied:
            self.patch_check = {"checked": False, "ok": False, "reason": "no change could be written into the script"}
            return
        if expected is None:
            want = self.search.verification_of(best) if self.search else None
            expected = list(want.losses_variant) if want is not None else []
        self.patch_check = self._check_patched(res.code, best, expected)
        if not self.patch_check["ok"]:
            self.notes.append(f"patch: none written: the patched script failed its check: {self.patch_check['reason']}")
            return
        if res.skipped:
            self.notes.append("patch: the patched script runs only part of the kept configuration (see the notes "
                              "above): its gain may be smaller than measured")
        self.patch_text = unified_diff(source, res.code, self.given_path.name)

    def _framework_changes(self, changes: dict[str, Any], cfg: ExecConfig) -> None:
        """A Trainer script: what the framework's own arguments apply goes into its Trainer /
        TrainingArguments call (the arguments the run set), not into generic edits."""
        from autoopt.scripting.frameworks import knob_exprs, plan

        site = (self.evaluator.sites or {}).get("framework") or {}
        p = plan(self.evaluator.framework, cfg, self.caps, optim=site.get("optim"))
        handled = set(p.fields) - set(site.get("dropped") or {})
        for fld in handled:
            key = _CHANGE_OF_FIELD.get(fld)
            if key is not None:
                changes[key] = False if key == "channels_last" else None
        changes["framework_kwargs"] = {"kwargs": knob_exprs(self.evaluator.framework, cfg, self.caps, site=site),
                                       "argv": list(self.target.args)}

    def _check_patched(self, code: str, best: Point, expected: list[float]) -> dict[str, Any]:
        """Run the patched script (beside nothing else: the baseline configuration, no hooks
        applying anything) for the verification steps and compare its losses with the kept
        configuration's."""
        from autoopt.run.verify import FP32_TOLERANCE

        self.progress("patch", "patch: running the patched script to check its losses")
        check_dir = self.out / "patched"
        check_dir.mkdir(exist_ok=True)
        patched = check_dir / self.target.path.name
        patched.write_text(code, encoding="utf-8")
        try:
            got = self.evaluator.run_patched(patched, self.base_cfg)
        except UserError as e:
            return {"checked": True, "ok": False, "reason": f"the patched script failed: {e.message}",
                    "path": str(patched)}
        self.patched_losses = got
        tol = max([self.evaluator.tolerance(c.transform.tolerance_for(c.params)) for c in best.chosen]
                  + [FP32_TOLERANCE])
        n = min(len(expected), len(got))
        if n == 0:
            return {"checked": True, "ok": False, "reason": "no losses to compare", "path": str(patched)}
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got[:n], expected[:n]))
        ok = worst <= tol
        reason = "" if ok else (f"its losses {[round(x, 6) for x in got[:n]]} differ from the kept configuration's "
                                f"{[round(x, 6) for x in expected[:n]]} by {worst:.2e} relative (tolerance {tol:.1e})")
        return {"checked": True, "ok": ok, "reason": reason, "max_rel_error": float(f"{worst:.6g}"),
                "tolerance": tol, "losses": got[:n], "expected": expected[:n], "path": str(patched)}

    def _patch_and_plan(self, best: Point) -> None:
        if best.chosen:
            self._patch(best)
        self.plan = {
            "plan_version": 1, "autoopt_version": __version__, "model": self.target.path.stem,
            "model_path": str(self.target.path), "device": self.caps.device_type,
            "mode": self.workload.mode if self.workload else "train",
            "baseline_batch_size": self.base_cfg.batch_size, "batch_size": self.base_cfg.batch_size,
            "transforms": [dict(c.transform_json(), code=c.code) for c in best.chosen],
            "codes": [c.code for c in best.chosen],
            "speedup": round(self.final.speedup, 4) if self.final else None,
            "script": {"path": str(self.target.path), "args": self.target.args},
        }

    # ------------------------------------------------------------------ the report
    def _model_path(self) -> Path:
        return self.target.path if self.target is not None else Path(self.settings.script_path or "train.py")

    def report(self, interrupted: bool = False, interruption: Optional[dict] = None):
        r = super().report(interrupted, interruption)
        ev = self.evaluator
        r.script = {
            "path": str(self._model_path()), "shown": self.settings.script_path,
            "args": list(self.settings.script_args),
            "cwd": str(self.target.cwd) if self.target else None,
            "framework": getattr(ev, "framework", None),
            "reproducible": getattr(ev, "reproducible", None), "seed_spread": getattr(ev, "seed_spread", None),
            "sites": getattr(ev, "sites", None) or {},
            "patched_losses": self.patched_losses,
            "advice_only": sorted(ADVICE_ONLY),
            "nproc": max(1, self.settings.distributed.nproc or 1),
        }
        return r

    def run(self) -> dict:
        try:
            return super().run()
        finally:
            if self.evaluator is not None:
                self.evaluator.close()


def run_script_optimize(settings: OptimizeSettings, decide: Decide, progress: Progress = _noop) -> dict:
    return ScriptOptimizeRun(settings, decide, progress).run()
