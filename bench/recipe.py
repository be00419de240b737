"""The hand-tuned recipe beside autoopt's result, for bench/gpu_check.py.

What an expert applies to a model by hand on a modern GPU: bf16 autocast, channels_last for a
convolutional network, `torch.compile`, and the fused optimizer (attention through SDPA where
the model has it: the zoo's GPT-2 uses transformers' SDPA attention already). `compare`
measures autoopt's final configuration and that recipe side by side, in alternating rounds in
one process (autoopt.run.measure.measure_side_by_side), at the batch size autoopt started from
— so a batch-size change autoopt made shows as such — and returns their throughputs, the ratio
and each one's MFU against the device's peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class RecipeComparison:
    autoopt_samples_s: float
    recipe_samples_s: float
    autoopt_mfu: Optional[float]
    recipe_mfu: Optional[float]
    recipe: str
    autoopt_batch: int
    recipe_batch: int

    @property
    def percent(self) -> float:
        """autoopt's throughput as a percentage of the recipe's."""
        return 100.0 * self.autoopt_samples_s / self.recipe_samples_s


def recipe_transforms(workload, device_type: str) -> list[tuple[str, dict[str, Any]]]:
    """The hand-tuned recipe for this workload, as autoopt transforms."""
    from autoopt.workload.inspect import workload_facts

    facts = workload_facts(workload)
    items: list[tuple[str, dict[str, Any]]] = [("amp", {"dtype": "bfloat16", "grad_scaler": False})]
    if (facts.get("model.conv2d_count") or 0) > 0 and facts.get("workload.input_is_4d"):
        items.append(("channels_last", {}))
    if workload.mode == "train" and workload.spec.build_optimizer is not None:
        items.append(("fused_optimizer", {"impl": "fused" if device_type == "cuda" else "foreach"}))
    items.append(("compile", {"mode": "default"}))
    return items


def final_config(report: dict):
    """The ExecConfig of the report's final variant (the baseline's when nothing was kept)."""
    from autoopt.types import ExecConfig

    for name in ("final", "baseline"):
        for v in report.get("variants", []):
            if v.get("name") == name and v.get("config"):
                return ExecConfig.from_json(v["config"])
    raise ValueError("the report has no final or baseline configuration")


def compare(model_path: str, report: dict, device: str, measure_settings, batch_size: Optional[int] = None,
            seed: int = 0) -> RecipeComparison:
    """autoopt's final configuration of `report` beside the hand-tuned recipe, side by side."""
    from autoopt.env import detect_capabilities
    from autoopt.run.measure import count_flops, measure_side_by_side
    from autoopt.run.session import Session
    from autoopt.transforms import apply_transforms
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    caps = detect_capabilities(device)
    wl = build_workload(load_model_file(model_path), caps, batch_size=batch_size, seed=seed)
    items = recipe_transforms(wl, caps.device_type)
    recipe = apply_transforms(wl.base_config(), items, wl)
    ours = final_config(report)
    with Session(wl, ours) as a, Session(wl, recipe) as b:
        fa, fb = count_flops(a), count_flops(b)
        ma, mb = measure_side_by_side(a, b, caps, measure_settings, flops_a=fa, flops_b=fb)
    text = " + ".join(n if not p else f"{n}({','.join(f'{k}={v}' for k, v in p.items())})" for n, p in items)
    return RecipeComparison(ma.throughput_per_s, mb.throughput_per_s, ma.mfu, mb.mfu, text,
                            ours.batch_size, recipe.batch_size)


def table(rows: list[tuple[str, Optional[RecipeComparison], str]]) -> list[str]:
    """Markdown lines: autoopt's configuration beside the hand-tuned recipe."""
    out = ["| model | autoopt samples/s (batch) | recipe samples/s (batch) | autoopt / recipe | MFU autoopt | "
           "MFU recipe | recipe |", "|---|---|---|---|---|---|---|"]
    for name, c, note in rows:
        if c is None:
            out.append(f"| {name} | {note} | | | | | |")
            continue
        mfu = [f"{x:.1%}" if x else "n/a" for x in (c.autoopt_mfu, c.recipe_mfu)]
        out.append(f"| {name} | {c.autoopt_samples_s:,.1f} ({c.autoopt_batch}) | {c.recipe_samples_s:,.1f} "
                   f"({c.recipe_batch}) | {c.percent:.0f} % | {mfu[0]} | {mfu[1]} | {c.recipe} |")
    return out
