"""The per-rank entry point of `autoopt profile/optimize MODEL --nproc N`.

autoopt.pipelines.distributed launches this module through torch.distributed.run (torchrun's
engine): `python -m torch.distributed.run --nproc-per-node N ... --module
autoopt.distributed.worker CONFIG.json`. Every rank reads the JSON config (the task, where to
write, and the run's settings as plain data: autoopt.settings.OptimizeSettings), joins the
process group (NCCL on GPUs, gloo on CPUs), builds the model file's workload and then

- task "profile": measures fixed-count steps and traces warm-up + profiled steps with the
  same torch.profiler settings as a single process, into the shared run directory, with the
  rank in the worker name (`rank<R>.<ts>.pt.trace.json.gz`);
- task "optimize": runs the search engine (autoopt.search) with the distributed evaluator
  (autoopt.distributed.evaluator) over the DDP transforms: the same strategies and the same
  side-by-side keep decisions as a single process, every decision from numbers gathered
  from all ranks.

Each rank writes `<out_dir>/rank<R>.json`: what it measured, or the error that stopped it
(kind "user" for a model-file error, "oom", "exception", "terminated", or "peer" when a
collective failed because another rank died). The parent reads them; this module never
prints for the user.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from autoopt.userfiles import is_user_file

_STATE: dict[str, Any] = {"terminated": False}


class _Terminated(BaseException):
    """The launcher asked this rank to stop (SIGTERM) because another rank failed."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    # Never raise here: the rank may be writing its trace after a peer died. The next step
    # boundary stops the rank; the launcher kills it after its grace period.
    _STATE["terminated"] = True


def _stop_if_terminated() -> None:
    if _STATE["terminated"]:
        raise _Terminated()


# ---------------------------------------------------------------------------- errors
_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "gloo/transport", "broken pipe",
                 "nccl communicator was aborted", "ncclremoteerror", "ncclsystemerror", "socket timeout",
                 "connection refused")


def _kind(exc: BaseException, message: str) -> str:
    from autoopt.errors import UserError
    from autoopt.run.session import is_oom

    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, _Terminated):
        return "terminated"
    if is_oom(exc):
        return "oom"
    dist_error = type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError")
    return "peer" if dist_error or any(m in message.lower() for m in _PEER_MARKERS) else "exception"


def _where(exc: BaseException, model_path: Optional[str]) -> Optional[str]:
    """The innermost frame in the model file, else the innermost frame outside torch and autoopt."""
    tb = traceback.extract_tb(exc.__traceback__)
    mp = str(Path(model_path).resolve()) if model_path else None
    user = next((fr for fr in reversed(tb) if mp and os.path.abspath(fr.filename) == mp), None)
    if user is None:
        user = next((fr for fr in reversed(tb) if is_user_file(fr.filename)), None)
    return f"{user.filename}:{user.lineno} (in {user.name})" if user is not None else None


def describe_error(exc: BaseException, model_path: Optional[str]) -> dict:
    from autoopt.errors import UserError
    from autoopt.workload.load import model_file_error

    message = exc.message if isinstance(exc, UserError) else " ".join(str(exc).split())[:1500]
    kind = _kind(exc, message)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]
    user = model_file_error(exc) if kind == "exception" else None  # the model file's code failed on this rank
    if user is not None:
        exc, message, kind = user, user.message, "user"
    info: dict[str, Any] = {"type": type(exc).__name__, "message": message, "time": time.time(), "where": None,
                            "traceback": tb, "kind": kind}
    if info["kind"] not in ("user", "terminated"):
        info["where"] = _where(exc, model_path)
    return info


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


# ---------------------------------------------------------------------------- the run
class Worker:
    def __init__(self, cfg: dict, rank: int, world: int, local_rank: int, rec: dict):
        from autoopt.settings import OptimizeSettings

        self.cfg = cfg
        self.settings = OptimizeSettings.from_dict(cfg["settings"])
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.rec = rec

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        from autoopt.env import detect_capabilities

        s = self.settings
        device = (s.device or "auto").lower()
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.caps = detect_capabilities(f"cuda:{self.local_rank}")
            self.device_ids: Optional[list[int]] = [self.local_rank]
        else:
            self.caps = detect_capabilities("cpu")
            self.device_ids = None
        backend = s.distributed.backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(s.distributed.collective_timeout_s)))
        self.rec["backend"] = backend
        self._workload()

    def _workload(self) -> None:
        from autoopt.env import env_facts
        from autoopt.errors import ModelFileError
        from autoopt.transforms.ddp import default_settings
        from autoopt.workload.build import build_workload
        from autoopt.workload.load import load_model_file

        s = self.settings
        self.spec = load_model_file(s.model_path)
        self.wl = build_workload(self.spec, self.caps, batch_size=s.batch_size, seed=s.seed)
        try:
            ddp = default_settings(self.spec.module)
        except ValueError as e:
            raise ModelFileError(f"{self.spec.path}: {e}. Fix: set DDP_BUCKET_CAP_MB to a positive number and the "
                                 "DDP_* switches to True or False.") from e
        accum = int(getattr(self.spec.module, "GRAD_ACCUM_STEPS", 1) or 1)
        self.base_cfg = self.wl.base_config().with_(grad_accum_steps=accum, ddp=ddp)
        facts = _json_safe({**self.caps.facts(), **env_facts(), **self.wl.facts})
        # the ranks on a node share its cores: each rank's share is what its threads can use
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        if isinstance(facts.get("workload.cpu_count"), int) and local_world > 1:
            facts["workload.cpu_count"] = max(1, facts["workload.cpu_count"] // local_world)
        self.rec.update({"device": self.caps.to_json(), "mode": self.wl.mode, "batch_size": self.wl.batch_size,
                         "grad_accum_steps": accum, "ddp": ddp, "facts": facts})
        if self.spec.build_dataloader is not None:
            self.rec.setdefault("notes", []).append(
                "build_dataloader: every rank iterates the model file's loader as written; unless it uses a "
                "DistributedSampler, the ranks see the same data (timing is representative)")

    def evaluator(self, tb_dir: Optional[Path]):
        from autoopt.distributed.evaluator import DistributedEvaluator

        s = self.settings
        return DistributedEvaluator(self.wl, self.caps, rank=self.rank, measure_settings=s.measure,
                                    profile_settings=s.profile, search_settings=s.search, tb_dir=tb_dir,
                                    device_ids=self.device_ids, before_step=_stop_if_terminated)

    # ------------------------------------------------------------------ profile
    def profile(self) -> None:
        from autoopt.distributed.evaluator import gather, job_measurement
        from autoopt.run.measure import count_flops, measure
        from autoopt.types import Measurement

        ev = self.evaluator(Path(self.cfg["run_dir"]).parent)
        with ev.session(self.base_cfg) as s:
            flops = count_flops(s, self.rec.setdefault("notes", []))
            m = measure(s, self.caps, ev.measure_settings, flops_per_step=flops)
            self.rec["measurement"] = dict(m.to_json(), rank=self.rank)
            ev.trace(s, Path(self.cfg["run_dir"]).name)
        self.rec["traces"] = ev.traces
        rows = gather(self.rec["measurement"])
        self.rec["job_measurement"] = job_measurement([Measurement.from_json(r) for r in rows],
                                                      [r["rank"] for r in rows]).to_json()

    # ------------------------------------------------------------------ optimize
    def optimize(self) -> None:
        from autoopt.distributed.candidates import ddp_candidates
        from autoopt.errors import UserError
        from autoopt.search.engine import Search
        from autoopt.search.strategies import strategy

        if self.wl.mode != "train":
            raise UserError(f"{self.spec.path}: the DDP transforms change how gradients are synchronised, and this "
                            "model file has no build_optimizer (inference). Fix: profile it with autoopt profile "
                            "--nproc N, or add build_optimizer(model) to optimize its training step.")
        ev = self.evaluator(Path(self.cfg["tb_dir"]))
        base = ev.baseline(self.base_cfg)
        variants = [_baseline_variant(base)]
        candidates, grad_mb = ddp_candidates(self.wl, self.caps, self.base_cfg, self.settings.consent, variants)
        self.rec["gradient_mb"] = round(grad_mb, 4)
        # the time budget counts from the parent's start (launch and set-up included)
        run_started = time.perf_counter() - max(0.0, time.time() - float(self.cfg.get("started_at") or time.time()))
        search = Search(ev, self.settings.search, variants=variants, run_started=run_started)
        best = search.run(strategy(self.settings.search.strategy), candidates, base)
        final = self._final(ev, search, base, best, variants)
        self.rec.update({
            "measurement": next(r for r in ev.baseline_per_rank if r["rank"] == self.rank),
            "baseline_per_rank": ev.baseline_per_rank, "baseline": base.measurement.to_json(),
            "job_measurement": base.measurement.to_json(), "traces": ev.traces,
            "variants": [v.wire_json() for v in variants], "final": final,
            "chosen": [c.transform_json() for c in best.chosen], "codes": best.codes,
            "search": search.summary().to_json(),
            "search_notes": search.notes,
        })
        if self.rank == 0 and best.chosen:
            self.rec["patch"] = self._patch(best)

    def _final(self, ev, search, base, best, variants) -> dict:
        """The final configuration re-measured beside the baseline (or the baseline, when no
        DDP transform was kept); its JSON with the measurement for the parent."""
        from autoopt.results import FinalResult, Variant
        from autoopt.run.measure import speedup
        from autoopt.search.engine import Search
        from autoopt.search.fixed import set_fixed_batch
        from autoopt.types import Status

        if not best.chosen:
            f = FinalResult([], [], 1.0, 1.0, 1.0, base.measurement, ddp=self.base_cfg.ddp,
                            note="no DDP transform was verified and faster than the baseline; the DDP set-up is "
                                 "best as is")
        else:
            fm = ev.final(self.base_cfg, best)
            mid, low, high = speedup(fm.baseline, fm.final)
            transforms = [c.transform_json() for c in best.chosen]
            variants.append(Variant(name="final", codes=best.codes, transforms=transforms, accepted=True,
                                    status=Status.KEPT, reason="re-measured side by side with the baseline",
                                    config=best.config, measurement=fm.final, speedup=mid, logdir=fm.logdir,
                                    safety=Search.safety(best.chosen), verification=search.verification_of(best)))
            f = FinalResult(best.codes, transforms, mid, low, high, fm.final, baseline_remeasured=fm.baseline,
                            ddp=best.config.ddp)
        set_fixed_batch(f, list(best.chosen), variants, self.base_cfg.batch_size)
        return dict(f.to_json(), measurement=f.measurement.to_json())

    def _patch(self, best) -> dict:
        from autoopt.transforms.ddp import snippet_for
        from autoopt.transforms.patch import build_patch

        res = build_patch(self.spec.path, [(c.transform, c.params) for c in best.chosen], self.wl,
                          name=os.path.basename(self.settings.model_path))
        return {"diff": res.diff, "skipped": [{"name": n, "reason": r} for n, r in res.skipped],
                "check": res.check_json(),
                "snippet": snippet_for([(c.transform.name, c.params) for c in best.chosen])}


def _baseline_variant(base):
    from autoopt.results import Variant
    from autoopt.types import Status

    return Variant(name="baseline", codes=[], transforms=[], accepted=True, status=Status.KEPT,
                   reason="the model file as written, under DDP", config=base.config, measurement=base.measurement,
                   speedup=1.0, logdir=base.logdir, safety="safe")


# ---------------------------------------------------------------------------- main
def _write(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, default=str))
    os.replace(tmp, path)


def _leave_group(ok: bool) -> None:
    """Leave the process group together (a barrier first: a rank that exits while another is
    still in a collective aborts it), or alone after a failure."""
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving is best effort; the record is written
        pass


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
    worker = None
    code = 0
    try:
        worker = Worker(cfg, rank, world, local_rank, rec)
        worker.setup()
        worker.optimize() if cfg.get("task") == "optimize" else worker.profile()
        rec["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        rec["error"] = describe_error(e, (cfg.get("settings") or {}).get("model_path"))
        code = 1
    finally:
        rec["finished"] = time.time()
        where = cfg.get("run_dir") or cfg.get("tb_dir")
        mine = Path(where).rglob(f"rank{rank}.*.pt.trace.json*") if where else []
        rec["traces_on_disk"] = sorted(str(p) for p in mine)
        _write(out, rec)
        _leave_group(code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
