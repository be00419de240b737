"""`batch_size`: the batch size that gives the most samples per second, found by
measurement (autoopt.search.batch), not "the largest that fits".

Changing the batch size changes training: the gradient noise and the number of steps
per epoch change, so the learning rate must follow. The transform carries the rule
(`lr_rule`): with k = new/old, linear scaling (lr x k, Goyal et al. 2017) for SGD-like
optimizers (SGD, ASGD), square-root scaling (lr x sqrt(k), Malladi et al. 2022) for the
Adam family and the other adaptive optimizers; a linear warm-up of WARMUP_PER_K x k steps
(at most MAX_WARMUP) where SGD's step grows by k >= 8. It is `manual`: measured and
reported, never applied without the user's explicit acceptance. Inference models have
no learning rate; there only the latency per request changes.

Params: `batch_size` (the chosen size; required by `apply`). `previous` (the batch size
it replaces). `optimizer` and `lr` (the class name and first group's learning rate that
build_optimizer returns, read when resolved; lr None when not a number). `lr_rule` (the
rule, computed by `lr_rule` from the others when absent).

Config: `ExecConfig.batch_size`, `lr_scale` and `lr_warmup_steps` (the applier scales
every group's lr, autoopt.run.apply.scale_lr). Patch: the module-level `BATCH_SIZE = n`
constant (set, or added after the imports), which autoopt and the file's own code read,
and `lr=<lr_after>` on the optimizer call in build_optimizer (when the lr was read; the
warm-up, when any, is a comment there: the model file owns its loop).

Safety: manual. Tolerance 1e-3 relative — per-sample outputs of the same inputs agree to
fp32 rounding at another batch size (batched kernels tile differently); the loss of a
different batch is not comparable, so verification compares the shared samples.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from autoopt.patching.editor import PatchError
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts

SGD_LIKE = ("SGD", "ASGD")  # linear scaling; every other torch.optim class: square root
WARMUP_FROM_K = 8  # SGD at k >= 8 gets a linear warm-up
WARMUP_PER_K = 5
MAX_WARMUP = 100
_OPTIMIZERS = {"SGD", "ASGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad",
               "Adadelta", "RMSprop", "Rprop"}


def lr_rule(params: dict) -> Optional[dict[str, Any]]:
    """The learning-rate rule for a batch change: {"rule": "linear"|"sqrt", "factor",
    "lr_before", "lr_after", "warmup_steps"}; None when there is no change of batch or no
    optimizer autoopt knows (params: previous, batch_size, optimizer, lr)."""
    if params.get("lr_rule"):
        return dict(params["lr_rule"])
    old, new, opt = params.get("previous"), params.get("batch_size"), params.get("optimizer") or ""
    if not old or not new or old == new or opt not in _OPTIMIZERS:
        return None
    k = new / old
    linear = opt in SGD_LIKE
    factor = k if linear else math.sqrt(k)
    warmup = min(MAX_WARMUP, int(math.ceil(WARMUP_PER_K * k))) if linear and k >= WARMUP_FROM_K else 0
    lr = params.get("lr")
    return {"rule": "linear" if linear else "sqrt", "factor": round(factor, 6), "lr_before": lr,
            "lr_after": None if lr is None else float(f"{lr * factor:.6g}"), "warmup_steps": warmup}


def lr_caveat(old: Optional[int], new: Optional[int], mode: str = "train", rule: Optional[dict] = None) -> str:
    if mode != "train":
        return "a larger batch raises throughput but also the latency of each batch"
    if rule:
        lr = (f" ({rule['lr_before']:g} -> {rule['lr_after']:g})" if rule.get("lr_before") is not None
              and rule.get("lr_after") is not None else "")
        warm = f", with a linear warm-up over {rule['warmup_steps']} steps" if rule.get("warmup_steps") else ""
        name = "linear scaling" if rule["rule"] == "linear" else "square-root scaling"
        return (f"changing the batch size from {old} to {new} changes training: the learning rate is scaled "
                f"x{rule['factor']:g} with it{lr}, {name}{warm} — or keep the effective batch with "
                "grad_accumulation")
    ratio = f" (x{new / old:g})" if old and new else ""
    return (
        f"changing the batch size from {old} to {new} changes training: scale the learning rate with it"
        f"{ratio}, the linear scaling rule, with a few epochs of warm-up — or keep the effective batch "
        "with grad_accumulation"
    )


class BatchSize(Transform):
    name = "batch_size"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        b = params.get("batch_size")
        if b is not None and (not isinstance(b, int) or b < 1):
            return f"batch_size must be a positive integer, not {b!r}"
        if b is not None and b == workload.batch_size:
            return f"the batch size is already {b}"
        return None

    def resolve_params(self, workload: Workload, caps: Capabilities, params: dict) -> dict:
        out: dict[str, Any] = {"previous": workload.batch_size}
        if workload.mode == "train":
            facts = workload_facts(workload)
            out["optimizer"] = facts.get("workload.optimizer") or ""
            out["lr"] = facts.get("_optimizer_lr")
        if params.get("batch_size") is not None:
            out["batch_size"] = int(params["batch_size"])
        return out

    def caveat(self, params: dict, mode: str = "train") -> str:
        return lr_caveat(params.get("previous"), params.get("batch_size"), mode, lr_rule(params))

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            raise ValueError("batch_size needs a chosen 'batch_size' param (run search_batch_size first)")
        rule = lr_rule(dict(params, batch_size=b))
        if rule is None:
            return cfg.with_(batch_size=b)
        return cfg.with_(batch_size=b, lr_scale=rule["factor"], lr_warmup_steps=rule["warmup_steps"])

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        b = params.get("batch_size")
        if not isinstance(b, int) or b < 1:
            raise PatchError("no batch size was chosen")
        editor.set_constant(
            "BATCH_SIZE", str(b),
            comment=f"autoopt (batch_size): {self.caveat(params, workload.mode if workload else 'train')}",
        )
        rule = lr_rule(params)
        if rule is None or rule.get("lr_after") is None or not _lr_keyword_settable(editor.code, params["optimizer"]):
            return  # the caveat above names the rule and the numbers for the user to carry over
        try:
            editor.add_call_kwargs("build_optimizer", {params["optimizer"]}, {"lr": repr(rule["lr_after"])})
        except PatchError:
            return


def _lr_keyword_settable(code: str, optimizer: str) -> bool:
    """True when build_optimizer() in `code` is a top-level def whose optimizer calls pass
    the lr by keyword or not at all (a positional lr cannot take a keyword beside it)."""
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_optimizer"]
    if not fns:
        return False
    for node in ast.walk(fns[0]):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name == optimizer and len(node.args) >= 2:
                return False
    return True
