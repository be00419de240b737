"""What autoopt and a script's driver (autoopt.scripting.driver) say to each other.

The parent writes a SPEC (JSON) and listens on a unix socket (multiprocessing.connection,
with an authentication key); the child connects and sends dict messages, each with an
"event"; the parent answers at the child's step boundaries with dicts, each with a "cmd":

child -> parent  {"event": "hello", "rank"}                     first, from every rank
                 {"event": "ready", "losses", "steps", "facts", "sites", "device", "batch_size",
                  "framework", "applied", "notes", "warmup_times_ms"}
                 {"event": "measured", "times_ms", "peak_memory_mb"}
                 {"event": "traced", "files"}
                 {"event": "ended", "steps", "times_ms", "losses"}   the script returned on its own
                 {"event": "error", "kind", "type", "message", "where", "traceback", "steps"}
parent -> child  {"cmd": "measure", "steps": N, "warmup": n}   n untimed steps first, then N timed
                 {"cmd": "trace", "dir", "worker", "warmup", "active", "record_shapes", "profile_memory",
                  "with_stack"}
                 {"cmd": "stop"}                                the child exits 0 at the boundary

With --nproc N the child is torch.distributed.run's launcher and every rank connects: commands
go to every rank, and the parent merges the ranks' replies (autoopt.scripting.worker.merge_ranks).

This module imports no torch: the parent checks a configuration against what a script can
take (`cannot_apply`) before it starts a child for it.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Iterable, Optional

from autoopt.types import ExecConfig
from autoopt.userfiles import is_user_file

# error kinds
SCRIPT = "script"  # the script's own code failed (or exited non-zero)
OOM = "oom"
TRANSFORM = "transform"  # the configuration cannot be applied to this script
SETUP = "setup"  # the driver itself could not start

EVENTS = ("ready", "measured", "traced", "ended", "error")
COMMANDS = ("measure", "trace", "stop")


def make_spec(*, script: Path, args: list[str], cwd: Path, cfg: ExecConfig, seed: int, address: str, authkey: bytes,
              verify_steps: int, warmup_steps: int, framework_knobs: bool = True, nproc: int = 1,
              sys_path0: Optional[str] = None) -> dict[str, Any]:
    """The SPEC the driver reads (JSON-able)."""
    return {
        "script": str(script), "args": [str(a) for a in args], "cwd": str(cwd),
        "sys_path0": sys_path0 or str(script.parent),
        "config": cfg.to_json(), "seed": int(seed), "address": address, "authkey": authkey.hex(),
        "verify_steps": int(verify_steps), "warmup_steps": int(warmup_steps),
        "framework_knobs": bool(framework_knobs), "nproc": int(nproc),
    }


# ExecConfig fields a script's driver cannot apply, and why (batch_size is the parent's check:
# it knows the batch the script builds)
_NOT_FOR_SCRIPTS = {
    "grad_accum_steps": "gradient accumulation changes the script's own loop (how many batches make a step)",
    "activation_checkpointing": "activation checkpointing changes the model's code (its repeated blocks' forward)",
    "cuda_graphs": "CUDA graphs need static input buffers that the script's own loop does not keep",
    "inference_mode": "inference mode applies to inference runs, and the script trains",
    "weights_dtype": "reduced-precision weights apply to inference runs, and the script trains",
    "ddp": "DistributedDataParallel settings apply to a --nproc job's DDP wrapper, which a script makes itself",
    "lr_scale": "the learning-rate rule goes with a changed batch size, which a script builds itself",
}


def cannot_apply(cfg: ExecConfig, handled: Iterable[str] = (), batch_size: Optional[int] = None) -> list[str]:
    """Why `cfg` cannot be applied to a script, one reason per field (empty: it can). `handled`:
    fields a framework applies itself; `batch_size`: the batch the script builds (None: unknown)."""
    done = set(handled)
    base = ExecConfig()
    out = []
    for name, why in _NOT_FOR_SCRIPTS.items():
        if name in done:
            continue
        value = getattr(cfg, name)
        if value is None or value is False or value == getattr(base, name) or (name == "lr_scale" and value == 1):
            continue
        out.append(f"{name}={value!r} cannot be applied to a script: {why}")
    if batch_size is not None and cfg.batch_size != batch_size and "batch_size" not in done:
        out.append(f"batch_size={cfg.batch_size} cannot be applied to a script: the script builds its own batches "
                   f"of {batch_size} (change its batch-size argument instead)")
    return out


def not_taken(cfg: ExecConfig, done: set[str]) -> list[str]:
    """Fields of `cfg` nothing in the script took (`done`: the fields applied): no model
    reached a torch.optim optimizer, no DataLoader was built. An error, never ignored."""
    wanted = {"amp_dtype": cfg.amp_dtype, "grad_scaler": cfg.grad_scaler, "channels_last": cfg.channels_last,
              "compile_mode": cfg.compile_call_mode, "optimizer_impl": cfg.optimizer_impl,
              "dataloader": cfg.dataloader}
    why = {"dataloader": "the script builds no torch DataLoader",
           "optimizer_impl": "the script builds no torch.optim optimizer"}
    return [f"{k} cannot be applied to a script: "
            + why.get(k, "no model whose parameters a torch.optim optimizer holds was found")
            for k, v in wanted.items() if v and k not in done]


def _in(path: str, fr: traceback.FrameSummary) -> bool:
    return os.path.abspath(fr.filename) == path




def where(exc: BaseException, script: str) -> Optional[str]:
    """'file:line (in fn)' of the innermost frame of the script in the exception's traceback,
    else of the user's code outside torch, installed packages and autoopt; None when neither."""
    tb = traceback.extract_tb(exc.__traceback__)
    path = os.path.abspath(script)
    fr = next((f for f in reversed(tb) if _in(path, f)), None)
    if fr is None:
        fr = next((f for f in reversed(tb) if is_user_file(f.filename)), None)
    return f"{fr.filename}:{fr.lineno} (in {fr.name})" if fr is not None else None


def log_tail(path: Optional[Path], chars: int = 2000) -> str:
    """The end of a child's log (empty when there is none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
