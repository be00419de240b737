"""GPU kernels: top kernels, tensor-core use, matmul/convolution precision, layout
conversions, and kernel launch statistics as Holistic Trace Analysis defines them.

Tensor-core detection (`uses_tensor_cores`) extends torch-tb-profiler's name list
(Volta-era hmma/884/1688 kernels) with today's kernels: cuBLAS/cuDNN xmma and sm80/sm90
GEMMs, CUTLASS tensorop and wmma kernels, Hopper wgmma/gmma and nvjet kernels, flash
attention, cuDNN v8/v9 engines, and AMD matrix-core kernels (rocBLAS/Tensile `_MI..`,
MIOpen xdlops, CK xdl). cuBLAS, cuDNN and CUTLASS also ship plain SIMT (CUDA-core) fp32
kernels under the same families: `sm80_xmma_gemm_f32f32_f32f32_f32_..._ffma_...`,
`sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_..._ffma_...`, `cutlass_80_simt_sgemm_...`.
A name with `ffma`, `simt` or `sgemm` is a SIMT kernel and not tensor-core work, unless it
also carries a tensor-core instruction shape or precision (`tensorop`, `tensor16x8x8`,
`hmma`, `gmma`, `tf32`, `16816`, ...), which wins.

Two tensor-core ratios are reported:
- `tensor_core_kernel_ratio` (the metric the rules read): this module's detection.
- `tensor_core_kernel_ratio_tb`: torch-tb-profiler's own definition, its fixed substring
  list (tensor_core.py `TC_Allowlist`) on the same kernels, which is what TensorBoard's
  "Kernel Time using Tensor Cores" shows. That list is stale (it counts every `xmma_gemm`,
  SIMT fp32 ones included, and misses `sm80_xmma_fprop_...`, nvjet, flash attention, ...),
  so the two differ on Ampere/Hopper traces; on the Volta ResNet-50 traces with tb's
  expected outputs they agree (no kernel there is tensor-core work by either).

Matmul/convolution precision (`matmul_precision`): each matmul/conv kernel is
- "reduced": bf16/fp16/fp8/int8, from the name (`bf16`, `f16`, `h16816`, `s16816`, `_h_`,
  ...) or, when the name says nothing, from the launching operator's recorded input types;
- "tf32": a tensor-core kernel on fp32 data: `tf32`/`tfloat32` in the name, or any other
  tensor-core kernel whose name and inputs say neither reduced precision nor fp64
  (`cutlass_tensorop_s1688..._tf32`, `sm80_xmma_..._tf32f32_...` are named);
- "fp32": a SIMT kernel on float data (`f32f32_f32f32` + `ffma`, `sgemm`, `scudnn`,
  implicit_convolve_sgemm, ...): full IEEE fp32 math on CUDA cores;
- "other": fp64 inputs.
`fp32_matmul_fraction` is the "fp32" share of matmul/conv time: the fp32 matmuls that use
neither TF32 nor reduced precision, i.e. what AO103 (enable TF32) and AO101/AO102
(autocast) can speed up. TF32 time is not in it (TF32 already runs on tensor cores; the
registry defines the fact as "not tf32/bf16/fp16"); it is reported as
`matmul_precision["tf32"]`.
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
# SIMT (CUDA-core) kernels inside the xmma / cutlass_80 families: plain FFMA math, no tensor cores
_SIMT_SUB = ("ffma", "simt", "sgemm")
# tensor-core instruction shapes and precisions: a name with one of these is tensor-core work even when
# it also matches a SIMT marker
_TC_STRONG_SUB = ("tensorop", "hmma", "imma", "dmma", "gmma", "wmma", "mma_sm", "tf32", "tfloat32", "h884", "s884",
                  "h1688", "s1688", "i8816", "16816", "16832", "xdlops", "mfma")
_TC_STRONG_RE = re.compile(r"tensor\d+x\d+x\d+")
_TF32_SUB = ("tf32", "tfloat32")
_REDUCED_EXTRA_SUB = ("s16816", "h1688", "h884", "s884", "i8816", "imma", "e4m3", "e5m2")
_H16_RE = re.compile(r"(?<![a-z0-9])h16")  # h16816gemm, _h16_; not "batch16"
_LAYOUT_SUB = ("nchwtonhwc", "nhwctonchw", "nchw2nhwc", "nhwc2nchw", "nchw_to_nhwc", "nhwc_to_nchw")


def _has(name: str, subs: tuple) -> bool:
    low = name.lower()
    return any(p in low for p in subs)


def uses_tensor_cores(name: str) -> bool:
    """This module's detection: tensor-core families by name, SIMT kernels inside them excluded."""
    low = name.lower()
    if any(p in low for p in _TC_STRONG_SUB) or _TC_STRONG_RE.search(low):
        return True
    if any(p in low for p in _SIMT_SUB):
        return False
    return (any(p in name for p in _TB_TC) or any(p in low for p in _TC_SUB)
            or bool(_TC_RE.search(low)))


def tb_uses_tensor_cores(name: str) -> bool:
    """torch-tb-profiler 0.4's definition (TC_Allowlist): a case-sensitive substring of its list."""
    return any(p in name for p in _TB_TC)


def name_says_tf32(name: str) -> bool:
    return _has(name, _TF32_SUB)


def is_matmul_or_conv(name: str) -> bool:
    return _has(name, _MM_SUB) and not _has(name, _NOT_MM_SUB)


def is_conv(name: str) -> bool:
    return is_matmul_or_conv(name) and _has(name, _CONV_SUB)


def name_says_reduced_precision(name: str) -> bool:
    """bf16/fp16/fp8/int8 named (tf32 is not reduced precision here: it has its own class)."""
    if name_says_tf32(name):
        return False
    return _has(name, _HALF_SUB) or _has(name, _REDUCED_EXTRA_SUB) or bool(_H16_RE.search(name.lower()))


def kernel_precision(name: str, input_float: Optional[str] = None) -> str:
    """Math precision of one matmul/conv kernel: "reduced", "tf32", "fp32" or "other" (fp64).
    `input_float` is the launching op's first floating input type ("float", "half", "bfloat16",
    "double", "fp8") when the trace recorded it; the name wins where it says something."""
    if name_says_tf32(name):
        return "tf32"
    if name_says_reduced_precision(name) or input_float in ("half", "bfloat16", "fp8"):
        return "reduced"
    if input_float == "double":
        return "other"
    return "tf32" if uses_tensor_cores(name) else "fp32"


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
                 "tensor_core_kernel_ratio_tb": None, "conv_fraction": None, "fp32_matmul_fraction": None,
                 "matmul_precision": None, "layout_conversion_fraction": None,
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
    out["tensor_core_kernel_ratio_tb"] = float(din[_flag_lut(tr, tb_uses_tensor_cores, kid)[nin]].sum() / total)
    if mm.any():
        prec = _precision_classes(tr, kin[mm], tc_lut, kid)
        dmm = din[mm]
        mm_time = float(dmm.sum())
        if mm_time > 0:
            shares = {c: float(dmm[prec == j].sum() / mm_time) for j, c in enumerate(PRECISIONS)}
            out["matmul_precision"] = shares
            out["fp32_matmul_fraction"] = shares["fp32"]
    return out


PRECISIONS = ("fp32", "tf32", "reduced", "other")  # codes 0..3 of _precision_classes


def _precision_classes(tr: T.Trace, kidx: np.ndarray, tc_lut: np.ndarray, kid: np.ndarray) -> np.ndarray:
    """kernel_precision of each matmul/conv kernel in `kidx`, as an index into PRECISIONS. The
    name decides where it names a precision; otherwise the launching op's recorded input types
    (where the trace has them) and then tensor-core use (tensor cores on float data: TF32)."""
    names = tr.name[kidx]
    tf32_lut = _flag_lut(tr, name_says_tf32, kid)
    half_lut = _flag_lut(tr, name_says_reduced_precision, kid)
    out = np.where(tc_lut[names], 1, 0).astype(np.int8)
    named = tf32_lut[names] | half_lut[names]
    out[half_lut[names]] = 2
    out[tf32_lut[names]] = 1
    if tr.input_types:
        ops = tr.launching_op(kidx)
        for j in np.flatnonzero(~named & (ops >= 0)):
            dt = first_float_type(tr.input_types.get(int(ops[j])))
            if dt in ("half", "bfloat16", "fp8"):
                out[j] = 2
            elif dt == "double":
                out[j] = 3
    return out


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
