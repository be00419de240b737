"""The per-rank entry point of `autoopt profile/optimize MODEL --nproc N`.

autoopt.distributed.launch launches this module through torch.distributed.run (torchrun's
engine): `python -m torch.distributed.run --nproc-per-node N ... --module
autoopt.distributed.worker CONFIG.json`. Every rank reads the JSON config, joins the process
group (NCCL on GPUs, gloo on CPUs), builds the model file's workload (autoopt.workload.load),
wraps the model in DistributedDataParallel and then

- task "profile": measures fixed-count steps and traces warm-up + profiled steps with
  the same torch.profiler settings as autoopt.run.trace, into the shared run directory,
  with the rank in the worker name (`rank<R>.<ts>.pt.trace.json.gz`);
- task "optimize": records a verification run (same seed, same per-rank batches),
  measures the baseline and every DDP transform side by side, combines the verified
  ones greedily, re-measures baseline and final back to back, and only then traces both
  (a profiler that has run with CUDA activity slows later launches in the process). Every
  decision is made from numbers gathered from all ranks, so all ranks take it alike.

Each rank writes `<out_dir>/rank<R>.json`: what it measured, or the error that stopped it
(kind "user" for a model-file error, "oom", "exception", or "peer" when a collective
failed because another rank died). The parent (autoopt.distributed.launch) reads them; this
module never prints for the user.

Step counts are fixed (never "until N seconds"): ranks that stop at different steps would
leave the others waiting in a collective.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional


class _Terminated(BaseException):
    """The launcher asked this rank to stop (SIGTERM) because another rank failed."""


_STATE: dict[str, Any] = {"terminated": False}


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    # Never raise here: the rank may be writing its trace after a peer died. The next step
    # boundary (DDPSession.step) stops the rank; the launcher kills it after its grace period.
    _STATE["terminated"] = True


# ---------------------------------------------------------------------------- batches
def rank_batch(workload, batch_size: int, rank: int, index: int):
    """The index-th batch of a rank: make_batch under a seed derived from the run's seed and
    the rank, so every rank trains on its own data and the baseline and each variant see
    exactly the same per-rank batches. Rank 0's batches are the single-process ones."""
    import torch

    torch.manual_seed(workload.seed + 1000 + index + 7919 * rank)
    return workload.spec.make_batch(batch_size)


def split_batch(batch, k: int) -> list:
    """k equal micro-batches of a batch (tensors split along dim 0)."""
    from autoopt.workload import contract

    n = contract.batch_len(batch)
    if k <= 1 or n is None:
        return [batch]
    m = n // k

    def part(j):
        return contract.map_tensors(batch, lambda t: t[j * m:(j + 1) * m] if t.dim() > 0 and t.shape[0] == n else t)

    return [part(j) for j in range(k)]


# ---------------------------------------------------------------------------- session
def _ddp_session_class():
    import torch

    from autoopt.workload import contract
    from autoopt.run.session import Session

    class DDPSession(Session):
        """A runner Session whose model is wrapped in DistributedDataParallel, with per-rank
        batches and no_sync gradient accumulation."""

        def __init__(self, workload, cfg, ddp_settings: dict, *, rank: int, device_ids=None):
            self.ddp_settings = dict(ddp_settings)
            self.rank = rank
            self.device_ids = device_ids
            self.ddp = None
            super().__init__(workload, cfg)

        def _build(self, build_loader: bool) -> None:
            super()._build(build_loader)
            if not self.train:
                return  # data-parallel inference: no gradients to synchronise
            from torch.nn.parallel import DistributedDataParallel

            from autoopt.transforms.ddp import ddp_kwargs

            self.ddp = DistributedDataParallel(self.eager_model, device_ids=self.device_ids,
                                               **ddp_kwargs(self.ddp_settings))
            if self.compiled:
                mode = "reduce-overhead" if self.cfg.cuda_graphs else self.cfg.compile_mode
                mode = None if mode == "default" else mode
                self.model = torch.compile(self.ddp, mode=mode, backend=self.cfg.compile_backend)
            else:
                self.model = self.ddp

        def _next_batch(self):
            if self._loader is not None:
                return super()._next_batch()
            if not self._fixed:
                self._fixed = [self.prepare(rank_batch(self.workload, self.cfg.batch_size, self.rank, i))
                               for i in range(2)]
                self._fixed_i = 0
            b = self._fixed[self._fixed_i % len(self._fixed)]
            self._fixed_i += 1
            return b

        def micro_batch_context(self, index: int, count: int):
            # gradient accumulation with no_sync: all-reduce only on the last micro-batch
            if self.ddp is not None and self.ddp_settings.get("no_sync") and index < count - 1:
                return self.ddp.no_sync()
            return contextlib.nullcontext()

        def step(self):
            if _STATE["terminated"]:
                raise _Terminated()
            return super().step()

    return DDPSession


# ---------------------------------------------------------------------------- verification
VERIFY_STEPS = 4


def record_ddp(s, steps: int = VERIFY_STEPS) -> dict:
    """Train a fresh session `steps` optimizer steps on this rank's verification batches
    (the effective batch split into the session's micro-batches); record the losses and
    the parameters reached."""
    import torch

    wl = s.workload
    k = s.accum
    eff = s.cfg.batch_size * k
    losses = []
    for i in range(steps):
        full = rank_batch(wl, eff, s.rank, i)
        loss = s.train_on([s.prepare(b) for b in split_batch(full, k)])
        losses.append(float(loss.detach().float().cpu()))
    params = [p.detach().float().cpu().clone() for p in s.eager_model.parameters()]
    if s.device == "cuda":
        torch.cuda.synchronize()
    return {"losses": losses, "params": params, "checksum": s.initial_checksum}


def compare_ddp(base: dict, var: dict, tolerance: float) -> dict:
    """Losses step by step (relative, widening by half the tolerance per step) and the
    parameters after the last step (max |diff| / max |baseline| per tensor)."""
    from autoopt.run.verify import FP32_TOLERANCE

    tol = max(tolerance, FP32_TOLERANCE)
    out = {"ok": False, "max_abs_error": None, "max_rel_error": None, "tolerance": tol, "reason": ""}
    if base["checksum"] != var["checksum"]:
        out["reason"] = "the variant did not start from the baseline's weights"
        return out
    if any(not math.isfinite(x) for x in var["losses"]) or any(
            not bool(p.isfinite().all()) for p in var["params"]):
        out["reason"] = "produced inf/NaN"
        return out
    if len(base["params"]) != len(var["params"]):
        out["reason"] = "the variant has a different number of parameters"
        return out
    max_abs = max_rel = 0.0
    for a, b in zip(var["params"], base["params"]):
        if a.shape != b.shape or a.numel() == 0:
            continue
        d = float((a - b).abs().max())
        sc = float(b.abs().max())
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / sc if sc > 0 else (0.0 if d == 0 else math.inf))
    loss_rel = [abs(v - b) / max(abs(b), 1e-12) for b, v in zip(base["losses"], var["losses"])]
    out["max_abs_error"] = float(f"{max_abs:.6g}")
    out["max_rel_error"] = float(f"{max(max_rel, max(loss_rel, default=0.0)):.6g}")
    n = len(base["losses"])
    for i, r in enumerate(loss_rel):
        allowed = tol * (1 + 0.5 * i)
        if r > allowed:
            out["reason"] = (f"training loss diverged from the baseline at step {i + 1}: {var['losses'][i]:.6g} vs "
                             f"{base['losses'][i]:.6g} ({r:.2e} relative, allowed {allowed:.1e})")
            return out
    allowed = tol * (1 + 0.5 * max(n - 1, 0))
    if max_rel > allowed:
        out["reason"] = (f"parameters after {n} steps differ from the baseline's by {max_rel:.2e} relative "
                         f"(allowed {allowed:.1e})")
        return out
    out["ok"] = True
    return out


# ---------------------------------------------------------------------------- errors
_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "gloo/transport", "broken pipe",
                 "nccl communicator was aborted", "ncclremoteerror", "ncclsystemerror", "socket timeout",
                 "connection refused")


def describe_error(exc: BaseException, model_path: Optional[str]) -> dict:
    from autoopt.errors import UserError
    from autoopt.run.session import is_oom

    info: dict[str, Any] = {"type": type(exc).__name__, "message": " ".join(str(exc).split())[:1500],
                            "time": time.time(), "where": None,
                            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}
    if isinstance(exc, UserError):
        info["kind"] = "user"
        info["message"] = exc.message
        return info
    if isinstance(exc, _Terminated):
        info["kind"] = "terminated"
        return info
    if is_oom(exc):
        info["kind"] = "oom"
    else:
        low = info["message"].lower()
        dist_error = type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError")
        info["kind"] = "peer" if dist_error or any(m in low for m in _PEER_MARKERS) else "exception"
    # the innermost frame in the model file, else the innermost frame outside torch and autoopt
    tb = traceback.extract_tb(exc.__traceback__)
    user = None
    mp = str(Path(model_path).resolve()) if model_path else None
    for fr in reversed(tb):
        if mp and os.path.abspath(fr.filename) == mp:
            user = fr
            break
    if user is None:
        for fr in reversed(tb):
            f = fr.filename.replace("\\", "/")
            if "/torch/" not in f and "/autoopt/" not in f and "site-packages" not in f and "<" not in f:
                user = fr
                break
    if user is not None:
        info["where"] = f"{user.filename}:{user.lineno} (in {user.name})"
    return info


# ---------------------------------------------------------------------------- helpers
def _json_safe(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def _fixed_settings(cfg: dict):
    from autoopt.run.measure import MeasureSettings

    n = int(cfg.get("measure_steps", 10))
    return MeasureSettings(warmup_steps=int(cfg.get("warmup_steps", 3)), warmup_min_s=0.0, min_steps=n, max_steps=n,
                           min_time_s=0.0, max_time_s=1e9)


def _gather(obj) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def job_measurement(per_rank: list[dict]) -> dict:
    """A synchronous job runs at its slowest rank's pace: the job's step time is the slowest
    rank's (by median); throughput is the global samples per second."""
    slow = max(per_rank, key=lambda m: m["step_time_ms"]["median"])
    samples = sum(m["samples_per_step"] for m in per_rank)
    peak = [m["peak_memory_mb"] for m in per_rank if m.get("peak_memory_mb") is not None]
    mfus = [m["mfu"] for m in per_rank if m.get("mfu") is not None]
    return {
        "step_time_ms": slow["step_time_ms"],
        "batch_size": slow["batch_size"],
        "samples_per_step": samples,
        "throughput_per_s": round(samples / (slow["step_time_ms"]["median"] / 1000.0), 3),
        "peak_memory_mb": max(peak) if peak else None,
        "mfu": round(min(mfus), 5) if mfus else None,
        "flops_per_step": slow.get("flops_per_step"),
        "slowest_rank": slow.get("rank"),
    }


def _speedup(base: dict, new: dict) -> tuple[float, float, float]:
    b, n = base["step_time_ms"], new["step_time_ms"]
    kb, kn = 1.0 / base["samples_per_step"], 1.0 / new["samples_per_step"]
    mid = (b["median"] * kb) / (n["median"] * kn)
    low = (b["p25"] * kb) / (n["p75"] * kn) if n["p75"] > 0 else mid
    high = (b["p75"] * kb) / (n["p25"] * kn) if n["p25"] > 0 else mid
    return mid, low, high


def _rel_spread(m: dict) -> float:
    st = m["step_time_ms"]
    return (st["p75"] - st["p25"]) / st["median"] if st["median"] > 0 else 0.0


# ---------------------------------------------------------------------------- the run
class Worker:
    def __init__(self, cfg: dict, rank: int, world: int, local_rank: int, rec: dict):
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.rec = rec

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        from autoopt.env import detect_capabilities, env_facts
        from autoopt.workload.build import build_workload
        from autoopt.workload.load import load_model_file
        from autoopt.transforms.ddp import default_settings

        cfg = self.cfg
        device = (cfg.get("device") or "auto").lower()
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.caps = detect_capabilities(f"cuda:{self.local_rank}")
            self.backend = cfg.get("backend") or "nccl"
            self.device_ids = [self.local_rank]
        else:
            self.caps = detect_capabilities("cpu")
            self.backend = cfg.get("backend") or "gloo"
            self.device_ids = None
        dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=float(cfg.get("collective_timeout_s", 300))))
        self.rec["backend"] = self.backend
        self.spec = load_model_file(cfg["model_path"])
        self.wl = build_workload(self.spec, self.caps, batch_size=cfg.get("batch_size"), seed=int(cfg.get("seed", 0)))
        try:
            self.ddp_base = default_settings(self.spec.module)
        except ValueError as e:
            from autoopt.errors import ModelFileError

            raise ModelFileError(f"{self.spec.path}: {e}. Fix: set DDP_BUCKET_CAP_MB to a positive number and the "
                                 "DDP_* switches to True or False.") from e
        self.ddp_base.update(cfg.get("ddp") or {})
        accum = int(getattr(self.spec.module, "GRAD_ACCUM_STEPS", 1) or 1)
        self.base_cfg = self.wl.base_config().with_(grad_accum_steps=accum)
        self.rec.update({
            "device": self.caps.to_json(),
            "mode": self.wl.mode,
            "batch_size": self.wl.batch_size,
            "grad_accum_steps": accum,
            "ddp": self.ddp_base,
            "facts": _json_safe({**self.caps.facts(), **env_facts(), **self.wl.facts}),
        })
        # the ranks on a node share its cores: each rank's share is what its threads can use
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        cpus = self.rec["facts"].get("workload.cpu_count")
        if isinstance(cpus, int) and local_world > 1:
            self.rec["facts"]["workload.cpu_count"] = max(1, cpus // local_world)
        if self.spec.build_dataloader is not None:
            self.rec.setdefault("notes", []).append(
                "build_dataloader: every rank iterates the model file's loader as written; unless it uses a "
                "DistributedSampler, the ranks see the same data (timing is representative)")
        DDPSession = _ddp_session_class()
        self.Session = DDPSession

    def session(self, cfg, ddp_settings):
        return self.Session(self.wl, cfg, ddp_settings, rank=self.rank, device_ids=self.device_ids)

    def measure(self, s, flops=None) -> dict:
        from autoopt.run.measure import measure

        m = measure(s, self.caps, _fixed_settings(self.cfg), flops_per_step=flops).to_json()
        m["rank"] = self.rank
        return m

    def trace(self, s, run_dir: str, steps: int) -> list[str]:
        from autoopt.run.trace import ProfileSettings, trace_session

        run = trace_session(s, Path(run_dir),
                            ProfileSettings(active=steps, with_stack=bool(self.cfg.get("with_stack"))),
                            worker_name=f"rank{self.rank}")
        return [str(p) for p in run.trace_files if p.name.startswith(f"rank{self.rank}.")]

    # ------------------------------------------------------------------ profile
    def profile(self) -> None:
        from autoopt.run.measure import count_flops

        with self.session(self.base_cfg, self.ddp_base) as s:
            flops = count_flops(s)
            m = self.measure(s, flops)
            self.rec["measurement"] = m
            self.rec["traces"] = self.trace(s, self.cfg["run_dir"], int(self.cfg.get("steps", 3)))
        self.rec["job_measurement"] = job_measurement(_gather(m))

    # ------------------------------------------------------------------ optimize
    def candidates(self) -> list[dict]:
        """The DDP transforms worth measuring for this workload, or skipped with a reason."""
        from autoopt.transforms.ddp import DEFAULT_BUCKET_CAP_MB, DDP_TRANSFORMS

        reject = set(self.cfg.get("reject") or [])
        only = self.cfg.get("transforms")
        accum = self.base_cfg.grad_accum_steps
        facts = self.wl.facts
        params_n = facts.get("model.param_count") or 0
        dtype_bytes = {"float16": 2, "bfloat16": 2, "float64": 8}.get(facts.get("model.param_dtype") or "", 4)
        grad_mb = params_n * dtype_bytes / 2**20
        base = self.ddp_base
        out: list[dict] = []

        def add(name: str, params: dict, *, skip: str = "") -> None:
            t = DDP_TRANSFORMS[name]
            if not skip and (name in reject or (only is not None and name not in only)):
                skip = "not selected (rejected or not in the requested transforms)"
            if not skip:
                skip = t.check(self.wl, self.caps, params) or ""
            if not skip:
                params = t.resolve_params(self.wl, self.caps, params)
                if t.safety_for(params) == "manual" and not self.cfg.get("accept_manual"):
                    skip = ("changes training semantics (introduces gradient accumulation: the per-rank batch is "
                            "split into micro-batches); pass accept_manual / --yes to measure it")
            out.append({"name": name, "params": params, "skip": skip, "safety": t.safety_for(params),
                        "tolerance": t.tolerance_for(params), "setting": t.setting})

        cur = float(base["bucket_cap_mb"])
        smaller = round(max(min(cur, grad_mb) / 4, 0.01), 3)
        add("ddp_bucket_size", {"bucket_cap_mb": smaller})
        if grad_mb > cur:
            add("ddp_bucket_size", {"bucket_cap_mb": max(4 * cur, 100.0)})
        if base.get("gradient_as_bucket_view"):
            add("ddp_gradient_as_bucket_view", {}, skip="the model file already sets DDP_GRADIENT_AS_BUCKET_VIEW")
        else:
            add("ddp_gradient_as_bucket_view", {})
        if base.get("static_graph"):
            add("ddp_static_graph", {}, skip="the model file already sets DDP_STATIC_GRAPH")
        else:
            add("ddp_static_graph", {})
        if base.get("no_sync"):
            add("ddp_no_sync", {}, skip="the model file already sets DDP_NO_SYNC")
        else:
            add("ddp_no_sync", {"steps": accum if accum >= 2 else 2})
        self.rec["gradient_mb"] = round(grad_mb, 4)
        return out

    def _evaluate(self, name: str, items: list[dict], reference: dict, best: dict, trace_dir: Optional[str]) -> dict:
        """Build, verify, measure one combination; every rank returns the same verdict."""
        from autoopt.transforms.ddp import apply_all, get_ddp_transform

        settings = apply_all(self.ddp_base, [(c["name"], c["params"]) for c in items])
        cfg = self.base_cfg
        for c in items:
            cfg = get_ddp_transform(c["name"]).apply(cfg, c["params"], self.wl)
        tol = max(c["tolerance"] for c in items)
        v: dict[str, Any] = {"name": name, "codes": [], "transforms": [{"name": c["name"], "params": c["params"]}
                                                                         for c in items],
                             "accepted": True, "status": "failed", "reason": "", "ddp": settings,
                             "safety": "manual" if any(c["safety"] == "manual" for c in items) else "safe"}
        local: dict[str, Any] = {"error": None}
        m = None
        try:
            with self.session(cfg, settings) as s:
                rec = record_ddp(s)
                local["verification"] = compare_ddp(reference, rec, tol)
        except _Terminated:
            raise
        except Exception as e:  # a failing transform is a value: every rank reports it
            local["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            local["verification"] = None
        all_local = _gather(local)
        errors = [f"rank {r}: {x['error']}" for r, x in enumerate(all_local) if x["error"]]
        if errors:
            v["reason"] = "; ".join(errors)
            return v
        vers = [x["verification"] for x in all_local]
        worst = max(vers, key=lambda x: (not x["ok"], x["max_rel_error"] or 0.0))
        v.update({"max_abs_error": worst["max_abs_error"], "max_rel_error": worst["max_rel_error"],
                  "tolerance": worst["tolerance"]})
        if not all(x["ok"] for x in vers):
            bad = next(r for r, x in enumerate(vers) if not x["ok"])
            v["status"] = "rejected"
            v["reason"] = f"rank {bad}: {vers[bad]['reason']}"
            return v
        with self.session(cfg, settings) as s:
            m = self.measure(s)
            if trace_dir:
                self.trace(s, trace_dir, int(self.cfg.get("steps", 3)))
        job = job_measurement(_gather(m))
        v["measurement"] = job
        v["speedup"] = round(_speedup(self.base_m, job)[0], 4)
        ratio = _speedup(best, job)[0]
        from autoopt.pipelines.optimize import MIN_GAIN

        noise = max(MIN_GAIN, (_rel_spread(best) + _rel_spread(job)) / 2)
        better = ratio > 1 + noise
        v["status"] = "kept" if better else "rejected"
        v["reason"] = (f"verified on every rank; {ratio:.2f}x the current best (noise {noise:.0%})" if better else
                       f"verified on every rank but not faster beyond noise: {ratio:.2f}x the current best "
                       f"(noise {noise:.0%})")
        return v

    def optimize(self) -> None:
        from autoopt.errors import UserError

        if self.wl.mode != "train":
            raise UserError(f"{self.spec.path}: the DDP transforms change how gradients are synchronised, and this "
                            "model file has no build_optimizer (inference). Fix: profile it with autoopt profile "
                            "--nproc N, or add build_optimizer(model) to optimize its training step.")
        tb = self.cfg["tb_dir"]
        # baseline: reference run, measurement, trace
        with self.session(self.base_cfg, self.ddp_base) as s:
            reference = record_ddp(s)
        from autoopt.run.measure import count_flops

        with self.session(self.base_cfg, self.ddp_base) as s:
            flops = count_flops(s)
            m = self.measure(s, flops)
        base_ranks = _gather(m)
        self.base_m = job_measurement(base_ranks)
        self.rec["measurement"] = m
        self.rec["baseline_per_rank"] = base_ranks
        variants: list[dict] = [{"name": "baseline", "codes": [], "transforms": [], "accepted": True,
                                 "status": "kept", "reason": "the model file as written, under DDP",
                                 "measurement": self.base_m, "speedup": 1.0, "ddp": self.ddp_base,
                                 "max_abs_error": 0.0, "max_rel_error": 0.0, "tolerance": None}]
        cands = self.candidates()
        solos: list[tuple[dict, dict]] = []
        for c in cands:
            label = c["name"] if c["name"] != "ddp_bucket_size" else f"ddp_bucket_size={c['params']['bucket_cap_mb']:g}"
            if c["skip"]:
                variants.append({"name": label, "codes": [], "transforms": [{"name": c["name"], "params": c["params"]}],
                                 "accepted": False, "status": "skipped", "reason": c["skip"], "ddp": None})
                continue
            v = self._evaluate(label, [c], reference, self.base_m, None)
            variants.append(v)
            solos.append((c, v))
        # greedy: the best verified single transform first, then the others by solo speedup,
        # each kept only when verified and faster than the current best beyond the noise
        usable = sorted([(c, v) for c, v in solos if v["status"] == "kept"], key=lambda t: -(t[1]["speedup"] or 0))
        chosen: list[dict] = []
        best = self.base_m
        best_v = None
        for c, v in usable:
            if any(x["setting"] == c["setting"] for x in chosen):
                continue  # an alternative value of a setting already chosen
            if not chosen:
                chosen, best, best_v = [c], v["measurement"], v
                continue
            trial = self._evaluate("+".join(_label(x) for x in chosen + [c]), chosen + [c], reference, best, None)
            variants.append(trial)
            if trial["status"] == "kept":
                chosen, best, best_v = chosen + [c], trial["measurement"], trial
        for v in variants:
            if v["status"] == "kept" and v["name"] != "baseline" and v is not best_v:
                v["reason"] += "; superseded in the search"
        final = None
        if chosen:
            # re-measure baseline and final back to back, so drift during the search does not count
            from autoopt.transforms.ddp import apply_all, get_ddp_transform

            settings = apply_all(self.ddp_base, [(c["name"], c["params"]) for c in chosen])
            cfg = self.base_cfg
            for c in chosen:
                cfg = get_ddp_transform(c["name"]).apply(cfg, c["params"], self.wl)
            with self.session(self.base_cfg, self.ddp_base) as s:
                b2 = job_measurement(_gather(self.measure(s)))
            with self.session(cfg, settings) as s:
                f_m = self.measure(s)
            fin = job_measurement(_gather(f_m))
            mid, low, high = _speedup(b2, fin)
            final = {"codes": [], "transforms": [{"name": c["name"], "params": c["params"]} for c in chosen],
                     "speedup": round(mid, 4), "speedup_low": round(low, 4), "speedup_high": round(high, 4),
                     "step_time_ms": fin["step_time_ms"], "throughput_per_s": fin["throughput_per_s"],
                     "peak_memory_mb": fin["peak_memory_mb"], "batch_size": cfg.batch_size, "mfu": fin["mfu"],
                     "ddp": settings, "baseline_remeasured": b2}
            variants.append({"name": "final", "codes": [], "transforms": final["transforms"], "accepted": True,
                             "status": "kept", "reason": "re-measured side by side with the baseline",
                             "measurement": fin, "speedup": round(mid, 4), "ddp": settings,
                             "max_abs_error": best_v.get("max_abs_error") if best_v else None,
                             "max_rel_error": best_v.get("max_rel_error") if best_v else None,
                             "tolerance": best_v.get("tolerance") if best_v else None})
            if self.rank == 0:
                self.rec["patch"] = self._patch(chosen)
        # Traces last: once the profiler has run with CUDA activity, CUPTI stays attached and slows
        # kernel launches for the rest of the process, which would bias every later measurement.
        steps = int(self.cfg.get("steps", 3))
        with self.session(self.base_cfg, self.ddp_base) as s:
            self.trace(s, os.path.join(tb, "baseline"), steps)
        if chosen:
            with self.session(cfg, settings) as s:
                self.trace(s, os.path.join(tb, "final"), steps)
        self.rec["variants"] = variants
        self.rec["final"] = final
        self.rec["chosen"] = [{"name": c["name"], "params": c["params"]} for c in chosen]
        self.rec["job_measurement"] = self.base_m

    def _patch(self, chosen: list[dict]) -> dict:
        from autoopt.patching.editor import PatchError, SourceEditor, unified_diff
        from autoopt.transforms.ddp import get_ddp_transform, snippet_for

        path = Path(self.spec.path)
        original = path.read_text(encoding="utf-8")
        editor = SourceEditor(original, path.name)
        skipped = []
        for c in chosen:
            try:
                get_ddp_transform(c["name"]).patch(editor, c["params"], self.wl)
            except PatchError as e:
                skipped.append({"name": c["name"], "reason": e.reason})
        return {"diff": unified_diff(original, editor.code, path.name), "skipped": skipped,
                "snippet": snippet_for([(c["name"], c["params"]) for c in chosen])}


def _label(c: dict) -> str:
    return c["name"] if c["name"] != "ddp_bucket_size" else f"ddp_bucket_size={c['params']['bucket_cap_mb']:g}"


# ---------------------------------------------------------------------------- main
def _write(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, default=str))
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        sys.stderr.write("usage: python -m torch.distributed.run ... --module autoopt.distributed.worker CONFIG.json\n")
        return 2
    cfg = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    out = Path(cfg["out_dir"]) / f"rank{rank}.json"
    rec: dict[str, Any] = {"rank": rank, "local_rank": local_rank, "world_size": world,
                           "host": socket.gethostname(), "pid": os.getpid(), "ok": False, "started": time.time()}
    signal.signal(signal.SIGTERM, _on_sigterm)
    worker = Worker(cfg, rank, world, local_rank, rec)
    code = 0
    try:
        worker.setup()
        if cfg.get("task") == "optimize":
            worker.optimize()
        else:
            worker.profile()
        rec["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        rec["error"] = describe_error(e, cfg.get("model_path"))
        code = 1
    finally:
        rec["finished"] = time.time()
        rec["traces_on_disk"] = sorted(str(p) for p in Path(cfg.get("run_dir") or cfg.get("tb_dir") or ".").rglob(
            f"rank{rank}.*.pt.trace.json*")) if (cfg.get("run_dir") or cfg.get("tb_dir")) else []
        _write(out, rec)
        try:
            import torch.distributed as dist

            if code == 0 and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
