"""GPU kernels: top kernels, tensor-core use, matmul/convolution precision, layout
conversions, and kernel launch statistics as Holistic Trace Analysis defines them.

Tensor-core detection extends torch-tb-profiler's name list (Volta-era hmma/884/1688
kernels) with today's kernels: cuBLAS/cuDNN xmma and sm80/sm90 GEMMs, CUTLASS tensorop
and wmma kernels, Hopper wgmma/gmma and nvjet kernels, flash attention, cuDNN v8/v9
engines, and AMD matrix-core kernels (rocBLAS/Tensile `_MI..`, MIOpen xdlops, CK xdl).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from autoopt.analyze import trace as T
from autoopt.analyze.breakdown import is_comm_kernel_name

# torch-tb-profiler's list (tensor_core.py) ...
_TB_TC = ("h884", "s884", "h1688", "s1688", "hmma", "i8816", "16816", "dgrad_1x1_stride_2x2",
          "first_layer_wgrad_kernel", "conv1x1", "conv2d_c1_k1", "direct_group", "xmma_implicit_gemm",
          "xmma_sparse_conv", "xmma_warp_specialized_implicit_gemm", "xmma_gemm", "xmma_sparse_gemm", "c1688")
# ... and the kernels of Ampere, Hopper, Blackwell, cuDNN 8/9, CUTLASS 2/3, flash attention and ROCm
# (substring tests on the lower-cased name: kernel names are long, regex alternations are slow)
_TC_SUB = ("xmma", "tensorop", "wmma", "gmma", "nvjet", "hmma", "imma", "16816", "16832", "1688gemm", "884gemm",
           "tf32", "flash_fwd", "flash_bwd", "flash::", "fmha", "_mma_", "mma_sm", "cutlass_80", "cutlass3x_sm",
           "sm90_", "sm100_", "xdlops", "gtcx", "_xdl", "mfma")
_TC_RE = re.compile(r"sm(?:70|75|80|86|87|89|90a?|100a?|120)_(?:gemm|fprop|dgrad|wgrad|conv|mma|fmha|flash)|"
                    r"_mi\d+x\d+")
_MM_SUB = ("gemm", "gemv", "conv", "scudnn", "hcudnn", "wgrad", "dgrad", "fprop", "winograd", "cutlass", "nvjet",
           "xmma", "cijk_", "splitkreduce", "fmha", "flash_fwd", "flash_bwd", "flash::", "wmma", "xdlops",
           "dot_kernel", "matmul", "bmm_")
_NOT_MM_SUB = ("bn_fw", "bn_bw", "batch_norm", "batchnorm", "nchwtonhwc", "nhwctonchw", "layer_norm", "layernorm",
               "softmax")
_CONV_SUB = ("conv", "scudnn", "hcudnn", "wgrad", "dgrad", "fprop", "winograd", "nhwckrsc", "igemm_fwd",
             "igemm_bwd", "igemm_wrw", "miopen")
_HALF_SUB = ("hgemm", "hcudnn", "half", "bf16", "bfloat16", "fp16", "f16", "_h_", "_hh", "hss", "_bbs_", "_bss_",
             "_hs_", "int8", "e4m3", "e5m2", "fp8")
_LAYOUT_SUB = ("nchwtonhwc", "nhwctonchw", "nchw2nhwc", "nhwc2nchw", "nchw_to_nhwc", "nhwc_to_nchw")


def _has(name: str, subs: tuple) -> bool:
    low = name.lower()
    return any(p in low for p in subs)


def uses_tensor_cores(name: str) -> bool:
    low = name.lower()
    return (any(p in name for p in _TB_TC) or any(p in low for p in _TC_SUB)
            or bool(_TC_RE.search(low)))


def is_matmul_or_conv(name: str) -> bool:
    return _has(name, _MM_SUB) and not _has(name, _NOT_MM_SUB)


def is_conv(name: str) -> bool:
    return is_matmul_or_conv(name) and _has(name, _CONV_SUB)


def name_says_reduced_precision(name: str) -> bool:
    return _has(name, _HALF_SUB)


def is_layout_conversion(name: str) -> bool:
    return _has(name, _LAYOUT_SUB)


def _flag_lut(tr: T.Trace, pred, ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean lookup table over name ids (evaluated only for `ids` when given)."""
    lut = np.zeros(len(tr.names), dtype=bool)
    for i in (range(len(tr.names)) if ids is None else ids.tolist()):
        s = tr.names[i]
        if s and pred(s):
            lut[i] = True
    return lut


def kernel_stats(tr: T.Trace, lo: float, hi: float, top_n: int) -> dict:
    k = tr.idx(T.KERNEL)
    out: dict = {"top_kernels": [], "tensor_core_kernel_ratio": None, "matmul_fraction": None,
                 "conv_fraction": None, "fp32_matmul_fraction": None, "layout_conversion_fraction": None,
                 "kernel_count": int(k.size), "median_kernel_us": None, "small_kernel_fraction": None}
    if k.size == 0:
        return out
    names = tr.name[k]
    kid = np.unique(names)
    comm = _flag_lut(tr, is_comm_kernel_name, kid)
    dur = tr.dur[k]
    # top kernels over the whole trace (as torch-tb-profiler's kernel table)
    tc_lut = _flag_lut(tr, uses_tensor_cores, kid)
    calls = np.bincount(names, minlength=len(tr.names))
    tot = np.bincount(names, weights=dur, minlength=len(tr.names))
    order = np.argsort(-tot, kind="stable")
    for nid in order[:top_n]:
        if calls[nid] == 0:
            break
        out["top_kernels"].append({
            "name": tr.names[nid], "calls": int(calls[nid]), "total_ms": round(float(tot[nid]) / 1e3, 4),
            "mean_us": round(float(tot[nid] / calls[nid]), 3), "tensor_cores": bool(tc_lut[nid]),
        })
    # the rest: compute kernels inside the steps
    ins = (tr.ts[k] >= lo) & (tr.end[k] <= hi) & ~comm[names]
    kin = k[ins]
    nin = tr.name[kin]
    din = tr.dur[kin]
    total = float(din.sum())
    if kin.size:
        out["median_kernel_us"] = float(np.median(din))
        out["small_kernel_fraction"] = float(np.mean(din < 10.0))
    if total <= 0:
        return out
    out["tensor_core_kernel_ratio"] = float(din[tc_lut[nin]].sum() / total)
    mm_lut = _flag_lut(tr, is_matmul_or_conv, kid)
    conv_lut = _flag_lut(tr, is_conv, kid)
    mm = mm_lut[nin]
    out["matmul_fraction"] = float(din[mm].sum() / total)
    out["conv_fraction"] = float(din[conv_lut[nin]].sum() / total)
    out["layout_conversion_fraction"] = float(din[_flag_lut(tr, is_layout_conversion, kid)[nin]].sum()
                                              / total)
    if mm.any():
        fp32 = _fp32_mask(tr, kin[mm], tc_lut, kid)
        mm_time = float(din[mm].sum())
        out["fp32_matmul_fraction"] = float(din[mm][fp32].sum() / mm_time) if mm_time > 0 else None
    return out


def _fp32_mask(tr: T.Trace, kidx: np.ndarray, tc_lut: np.ndarray, kid: np.ndarray) -> np.ndarray:
    """fp32 (not tf32/bf16/fp16) matmul/conv kernels: not tensor-core kernels, no reduced precision
    in the name, and, when the launching op recorded its input types, float inputs."""
    names = tr.name[kidx]
    half_lut = _flag_lut(tr, name_says_reduced_precision, kid)
    fp32 = ~tc_lut[names] & ~half_lut[names]
    if tr.input_types:
        ops = tr.launching_op(kidx)
        for j in np.flatnonzero(fp32 & (ops >= 0)):
            types = tr.input_types.get(int(ops[j]))
            dt = first_float_type(types)
            if dt is not None and dt != "float":
                fp32[j] = False
    return fp32


_FLOAT_TYPES = {"float": "float", "double": "double", "c10::Half": "half", "c10::BFloat16": "bfloat16",
                "c10::Float8_e4m3fn": "fp8", "c10::Float8_e5m2": "fp8", "Half": "half", "BFloat16": "bfloat16",
                "Float": "float", "Double": "double"}


def first_float_type(types) -> Optional[str]:
    if not isinstance(types, list):
        return None
    for t in types:
        if isinstance(t, str) and t in _FLOAT_TYPES:
            return _FLOAT_TYPES[t]
    return None


def launch_stats(tr: T.Trace, lo: float, hi: float, runtime_cutoff_us: float = 50.0,
                 launch_delay_cutoff_us: float = 100.0) -> Optional[dict]:
    """HTA's CUDA kernel launch statistics: per launched GPU event, the runtime call's CPU duration,
    the GPU duration and the launch delay (GPU start - runtime end, clipped at 0)."""
    g = tr.idx(*T.GPU_KINDS)
    if g.size == 0:
        return None
    rt = tr.runtime_of(g)
    ok = (rt >= 0) & (tr.ts[g] >= lo) & (tr.ts[g] <= hi)
    if not ok.any():
        return None
    g, rt = g[ok], rt[ok]
    cpu = tr.dur[rt]
    gpu = tr.dur[g]
    delay = np.clip(tr.ts[g] - tr.end[rt], 0, None)
    short = gpu < cpu
    return {
        "launches": int(g.size),
        "cpu_duration_us": _describe(cpu),
        "gpu_duration_us": _describe(gpu),
        "launch_delay_us": _describe(delay),
        "short_kernel_fraction": float(short.mean()),  # GPU time shorter than its launch call
        "runtime_outliers": int(np.sum(cpu > runtime_cutoff_us)),
        "launch_delay_outliers": int(np.sum(delay > launch_delay_cutoff_us)),
        "launch_bound": bool(short.mean() > 0.5),
    }


def _describe(x: np.ndarray) -> dict:
    return {"mean": round(float(x.mean()), 3), "median": round(float(np.median(x)), 3),
            "p90": round(float(np.percentile(x, 90)), 3), "max": round(float(x.max()), 3)}
