"""Which of a plan's transforms an ONNX export applies (inference_mode, batch_size) and
why it ignores the others; see the package docs."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

_IGNORED_REASONS = {
    "amp": "autocast is PyTorch's run-time mixed-precision policy, not part of the graph; the graph keeps the "
    "weights' dtype and ONNX runtimes choose reduced precision with their own tools (e.g. onnxruntime's float16 "
    "converter, TensorRT's fp16/bf16 flags)",
    "channels_last": "memory layout only: ONNX tensors have no memory format and runtimes choose their own "
    "layouts, so the graph is the same",
    "compile": "torch.compile changes how PyTorch executes the graph, not the graph; the exporter traces the "
    "eager module and the ONNX runtime optimises the graph itself",
    "cuda_graphs": "CUDA graph replay is a PyTorch run-time mechanism; ONNX runtimes have their own "
    "(e.g. onnxruntime's enable_cuda_graph)",
    "tf32": "a process-wide PyTorch math mode on Ampere+ GPUs; ONNX runtimes set their own (e.g. TensorRT's TF32 "
    "flag)",
    "cudnn_benchmark": "cuDNN algorithm search at run time; it does not change the graph",
    "fused_optimizer": "training only: the optimizer is not part of the inference graph",
    "grad_accumulation": "training only: gradient accumulation does not change the forward",
    "activation_checkpointing": "training only: checkpointing recomputes activations in backward; the forward "
    "graph is the same",
    "dataloader": "input pipeline: the data loader is outside the model graph",
}


def _classify_plan(plan, batch_size_given: bool) -> tuple[list[dict], list[dict], Optional[str], Optional[int]]:
    """(applied, ignored, weights dtype to cast to, batch size from the plan)."""
    applied: list[dict] = []
    ignored: list[dict] = []
    weights_dtype: Optional[str] = None
    plan_bs: Optional[int] = None
    for item in plan.transforms:
        name = item["name"]
        params = dict(item.get("params") or {})
        if name == "inference_mode":
            wd = params.get("weights_dtype")
            wd = str(wd).replace("torch.", "") if wd else None
            how = ("exported in eval mode without autograd (torch.no_grad); an ONNX graph is inference-only, "
                   "so there is no autograd state to drop")
            if wd == "float16":
                weights_dtype = "float16"
                how += "; weights, buffers and floating-point inputs cast to float16"
            elif wd:
                ignored.append({
                    "name": name,
                    "params": {"weights_dtype": wd},
                    "reason": f"{wd} weights are not exported: the standard ONNX Conv, Gemm and LSTM operators "
                    f"admit no {wd} tensors (onnx.checker's full check fails) and onnxruntime's CPU provider has "
                    f"no {wd} kernels; the graph is exported in float32 — convert it at deployment with the "
                    "runtime's own precision options",
                })
                how += f"; weights kept in float32 ({wd} not exportable, see plan_transforms_ignored)"
            applied.append({"name": name, "params": params, "how": how})
        elif name == "batch_size":
            if batch_size_given:
                ignored.append({"name": name, "params": params,
                                "reason": "an explicit batch size was given; the ONNX batch axis is dynamic anyway"})
            else:
                plan_bs = int(plan.batch_size)
                applied.append({"name": name, "params": params,
                                "how": f"batch of {plan_bs} used for tracing; the ONNX batch axis stays dynamic"})
        elif name in _IGNORED_REASONS:
            ignored.append({"name": name, "params": params, "reason": _IGNORED_REASONS[name]})
        elif name.startswith("ddp"):
            ignored.append({"name": name, "params": params,
                            "reason": "distributed training (DistributedDataParallel settings); not part of the "
                            "inference graph"})
        else:
            ignored.append({"name": name, "params": params,
                            "reason": "not an inference transform the exporter knows; the model's forward is "
                            "exported unchanged"})
    return applied, ignored, weights_dtype, plan_bs


class PlanChoices(NamedTuple):
    """What a plan changes in the export (all empty without a plan)."""

    applied: list[dict]
    ignored: list[dict]
    weights_dtype: Optional[str]
    batch_size: Optional[int]
    info: Optional[dict]


def read_plan(plan_path, batch_size_given: bool) -> PlanChoices:
    """Load the plan at plan_path (when given) and decide on each of its transforms."""
    if plan_path is None:
        return PlanChoices([], [], None, None, None)
    from autoopt.plan import Plan

    plan = Plan.load(plan_path)
    applied, ignored, weights_dtype, plan_bs = _classify_plan(plan, batch_size_given)
    info = {"path": str(Path(plan_path).resolve()), "model": plan.model, "codes": list(plan.codes)}
    return PlanChoices(applied, ignored, weights_dtype, plan_bs, info)
