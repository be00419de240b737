"""`channels_last`: NHWC memory format for the model's 4-D weights and the 4-D inputs.

cuDNN / oneDNN convolutions run natively in NHWC (tensor cores on GPU want it; NCHW
weights or inputs cost transposes on every call). Only where there are Conv2d modules.

Params: none. Config: `ExecConfig.channels_last` (the applier converts the model after
`.to(device)` and 4-D float inputs in autoopt.workload.contract.to_device).

Patch: `build_model` returns `<model>.to(memory_format=torch.channels_last)`, and
`forward` starts with `batch = _autoopt_channels_last(batch)` (a plain-PyTorch helper
added to the file).

Safety: safe. Tolerance 1e-3 relative: the same math in fp32, but the convolution
algorithms for NHWC sum in another order, so results differ at fp32 rounding (~1e-6 per
op), growing over layers and training steps; 1e-3 stays far below any real error.
"""
from __future__ import annotations

import inspect
from typing import Optional

from autoopt.torch_helpers import _autoopt_channels_last
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, ExecConfig, Workload
from autoopt.workload.inspect import workload_facts


class ChannelsLast(Transform):
    name = "channels_last"

    def check(self, workload: Workload, caps: Capabilities, params: dict) -> Optional[str]:
        reason = super().check(workload, caps, params)
        if reason:
            return reason
        facts = workload_facts(workload)
        if not facts.get("model.conv2d_count"):
            return "the model has no Conv2d layers; channels_last only changes convolutions"
        if facts.get("workload.channels_last"):
            return "the model's convolution weights are already channels_last"
        return None

    def apply(self, cfg: ExecConfig, params: dict, workload: Optional[Workload] = None) -> ExecConfig:
        return cfg.with_(channels_last=True)

    def explain_failure(self, message: str) -> str:
        # A convolution's output keeps its input's NHWC strides, and Tensor.view needs strides
        # compatible with the new shape: the common `x.view(-1, C * H * W)` before a Linear
        # layer raises where x.reshape(...) or torch.flatten(x, 1) would copy.
        if "view size is not compatible with input tensor's size and stride" in message:
            return ("; channels_last leaves the activations in NHWC order, and the model flattens one with "
                    ".view(): .reshape(...) or torch.flatten(x, 1) at that line would let channels_last apply")
        return ""

    def patch(self, editor, params: dict, workload: Optional[Workload]) -> None:
        editor.ensure_import("torch")
        editor.wrap_return("build_model", "{}.to(memory_format=torch.channels_last)")
        editor.add_function(inspect.getsource(_autoopt_channels_last))
        _, batch = editor.forward_params()
        editor.prepend("forward", f"{batch} = _autoopt_channels_last({batch})\n")
