"""What autoopt can change, as data: every transform's name, safety, verification tolerance,
the workloads it applies to, its place in the canonical order and a one-line summary.

This is the one list of transforms. It imports nothing (no torch), so the rule engine can
check a rule file's `transform = "..."` against it, and `autoopt rules` can run without
torch. The implementations (autoopt.transforms, one module per transform) take their
metadata from here.

- `safety`: "safe" (same results to fp32 tolerance), "unsafe" (changes numerics), "manual"
  (changes training semantics); some transforms refine it per parameter (`safety_for`).
- `tolerance`: the relative error allowed on outputs and loss when a variant is verified.
- `order`: the order in which transforms apply to a configuration and edit a patch (batch
  size before accumulation, layout before compile, compile last).
- `rules`: a rule file may propose it (`--try` reaches every transform).
- `distributed`: it changes the DistributedDataParallel wrapper, so it exists only in a
  `--nproc` job.
- `changes_training`: it changes training semantics; a rule proposing it must say
  safety = "manual".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformInfo:
    name: str
    safety: str
    tolerance: float
    order: int
    summary: str
    modes: tuple[str, ...] = ("train", "infer")
    rules: bool = True
    distributed: bool = False
    changes_training: bool = False


_ENTRIES = (
    TransformInfo("batch_size", "manual", 1e-3, 10,
                  "Use the batch size with the best measured samples/s (changes training: scale the learning "
                  "rate with it — linear scaling rule with warm-up — or keep the effective batch with "
                  "grad_accumulation)", changes_training=True),
    TransformInfo("grad_accumulation", "manual", 1e-3, 20,
                  "Accumulate gradients over k micro-batches to keep the effective batch in less memory",
                  modes=("train",), changes_training=True),
    TransformInfo("inference_mode", "safe", 1e-5, 25,
                  "Run inference under torch.inference_mode(), optionally with bf16/fp16 weights",
                  modes=("infer",), rules=False),
    TransformInfo("amp", "unsafe", 5e-2, 30,
                  "Run forward and loss under torch.autocast (bf16, or fp16 with a GradScaler in training)"),
    TransformInfo("channels_last", "safe", 1e-3, 40,
                  "Store conv weights and 4-D inputs in channels_last (NHWC) memory format"),
    TransformInfo("activation_checkpointing", "safe", 1e-4, 45,
                  "Recompute repeated blocks' activations in backward (less memory, more time) to fit a larger batch",
                  modes=("train",)),
    TransformInfo("fused_optimizer", "safe", 1e-4, 50,
                  "Use the optimizer's fused (single-kernel) or foreach (multi-tensor) implementation",
                  modes=("train",)),
    TransformInfo("tf32", "unsafe", 1e-2, 55,
                  "Allow TF32 tensor-core math for fp32 matmuls and convolutions (Ampere+)"),
    TransformInfo("cudnn_benchmark", "safe", 1e-3, 56,
                  "Let cuDNN benchmark convolution algorithms per input shape (static shapes)"),
    TransformInfo("dataloader", "safe", 1e-4, 60,
                  "Budget DataLoader workers and intra-op threads over the cores; pinned memory, persistent workers"),
    TransformInfo("threads", "safe", 1e-4, 62,
                  "Set the intra-op thread count to the cores free of other work (torch.set_num_threads)"),
    TransformInfo("compile", "safe", 1e-3, 80,
                  "torch.compile the model (fused kernels, less Python overhead); compile time reported apart"),
    TransformInfo("cuda_graphs", "safe", 1e-3, 85,
                  "Capture the step in CUDA graphs (torch.compile mode='reduce-overhead') to cut launch overhead"),
    TransformInfo("ddp_bucket_size", "safe", 1e-4, 90,
                  "Change DDP's gradient bucket size (bucket_cap_mb) to overlap all-reduce with backward better",
                  modes=("train",), rules=False, distributed=True),
    TransformInfo("ddp_gradient_as_bucket_view", "safe", 1e-5, 90,
                  "Let DDP's gradients be views into its all-reduce buckets (one copy and one gradient's memory less)",
                  modes=("train",), rules=False, distributed=True),
    TransformInfo("ddp_static_graph", "safe", 1e-4, 90,
                  "Declare DDP's graph static (no per-step unused-parameter search; buckets reordered after step 1)",
                  modes=("train",), rules=False, distributed=True),
    TransformInfo("ddp_no_sync", "safe", 1e-4, 90,
                  "All-reduce gradients once per optimizer step: no_sync() around all but the last micro-batch",
                  modes=("train",), rules=False, distributed=True),
)

CATALOG: dict[str, TransformInfo] = {e.name: e for e in _ENTRIES}


def info(name: str) -> TransformInfo:
    """The entry for `name`; KeyError naming the known transforms otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown transform {name!r}; known: {', '.join(sorted(CATALOG))}") from None


def single_process_names() -> tuple[str, ...]:
    """Transforms of one process (what `--try` and a plan may name)."""
    return tuple(n for n, e in CATALOG.items() if not e.distributed)


def rule_transform_names() -> tuple[str, ...]:
    """Transforms a rule file may propose."""
    return tuple(n for n, e in CATALOG.items() if e.rules)


def distributed_names() -> tuple[str, ...]:
    return tuple(n for n, e in CATALOG.items() if e.distributed)


# ---------------------------------------------------------------- parameters
# What `--try NAME:KEY=VALUE,...` may set, per transform (autoopt.validate checks a request
# against this before any work starts). A spec is ("choice", values), ("int", minimum),
# ("bool",) or ("name",) (a non-empty identifier, e.g. a torch.compile backend). The
# transforms' own docstrings describe what each parameter does; a test keeps the two in step.
_DTYPE_NAMES = ("bfloat16", "float16", "bf16", "fp16", "half")

PARAMS: dict[str, dict[str, tuple]] = {
    "batch_size": {"batch_size": ("int", 1), "previous": ("int", 1)},
    "grad_accumulation": {"steps": ("int", 2), "effective_batch_size": ("int", 1)},
    "inference_mode": {"weights_dtype": ("choice", _DTYPE_NAMES)},
    "amp": {"dtype": ("choice", _DTYPE_NAMES), "grad_scaler": ("bool",)},
    "channels_last": {},
    "activation_checkpointing": {},
    "fused_optimizer": {"impl": ("choice", ("fused", "foreach"))},
    "tf32": {"precision": ("choice", ("high", "medium"))},
    "cudnn_benchmark": {},
    "dataloader": {"num_workers": ("int", 0), "pin_memory": ("bool",), "persistent_workers": ("bool",),
                   "prefetch_factor": ("int", 1), "intra_op_threads": ("int", 1), "non_blocking": ("bool",)},
    "threads": {"num_threads": ("int", 1)},
    "compile": {"mode": ("choice", ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")),
                "backend": ("name",)},
    "cuda_graphs": {"backend": ("name",)},
}
