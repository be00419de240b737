"""The Workload of a training script, from the facts its baseline run showed
(autoopt.scripting.driver): what the transforms' check() / apply() and the rules decide on.

Nothing of the script is built in autoopt's process: every model.* / workload.* fact that
autoopt.workload.inspect.workload_facts would otherwise compute by building the model, its
optimizer or its loader is in the facts, and the ModelSpec's callables raise a clear error
should anything call them anyway.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from autoopt.scripting.target import ScriptTarget
from autoopt.types import Capabilities, ModelSpec, Workload

# facts workload_facts would build the model for, with the value a script without a model shows
_MODEL_DEFAULTS: dict[str, Any] = {
    "model.conv2d_count": 0, "model.conv_count": 0, "model.repeated_block_count": 0,
    "workload.channels_last": False, "workload.compiled": False, "workload.input_is_4d": False,
    "workload.autocast": False, "workload.static_shapes": True,
}


@dataclass
class ScriptSpec(ModelSpec):
    """A script's ModelSpec: `train` says its mode (a script's optimizer is never built here,
    so build_optimizer cannot say it)."""

    train: bool = True

    @property
    def mode(self) -> str:
        return "train" if self.train else "infer"


def _not_built(target: ScriptTarget, what: str):
    def fail(*_args, **_kwargs):
        raise RuntimeError(f"autoopt does not build {what} of the script {target.shown} in its own process: the "
                           "script runs in a child per configuration (autoopt.scripting.driver)")

    return fail


def script_workload(target: ScriptTarget, caps: Capabilities, facts: dict[str, Any], *, seed: int = 0) -> Workload:
    """The script's Workload: facts complete (the optimizer's torch.optim class resolved, the
    DataLoader's settings), mode from its optimizer, batch size as the script builds it."""
    facts = dict(facts)
    for k, v in _MODEL_DEFAULTS.items():
        facts.setdefault(k, v)
    train = facts.get("workload.mode", "train") == "train"
    facts.setdefault("workload.mode", "train" if train else "infer")
    name = facts.get("workload.optimizer") or ""
    if train and name and facts.get("_optimizer_module", "torch.optim").startswith("torch.optim"):
        import torch

        cls = getattr(torch.optim, name, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            facts["_optimizer_class"] = cls
    has_loader = bool(facts.get("workload.has_dataloader"))
    if has_loader and not facts.get("_dataloader"):
        facts["_dataloader"] = {"type": "DataLoader", "is_dataloader": True}
    module = types.ModuleType(target.path.stem)
    module.__file__ = str(target.path)
    spec = ScriptSpec(
        path=target.path, name=target.path.stem, module=module,
        build_model=_not_built(target, "the model"), make_batch=_not_built(target, "batches"),
        build_optimizer=None, build_dataloader=_not_built(target, "the DataLoader") if has_loader else None,
        default_batch_size=facts.get("workload.batch_size"), train=train)
    batch = facts.get("workload.batch_size")
    return Workload(spec=spec, caps=caps, batch_size=int(batch) if batch else 1, seed=seed, facts=facts)
