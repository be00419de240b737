"""The shipped rule library: every rule loads, is documented, fires on its evidence and stays
silent on a near miss; alternatives never fire together; no false alarms on controls."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoopt.diagnosis import rules as R
from autoopt.diagnosis.explain import render_explain
from autoopt.diagnosis.facts_builder import from_analysis
from autoopt.facts import FACTS

RULES = R.load_rules()
BY_CODE = {r.code: r for r in RULES}

A100 = {"device.type": "cuda", "device.name": "NVIDIA A100-SXM4-40GB", "device.compute_capability": 8.0,
        "device.bf16": True, "device.fp16": True, "device.tf32": True, "device.tensor_cores": True}
V100 = {"device.type": "cuda", "device.name": "Tesla V100-SXM2-32GB", "device.compute_capability": 7.0,
        "device.bf16": False, "device.fp16": True, "device.tf32": False, "device.tensor_cores": True}
EPYC = {"device.type": "cpu", "device.name": "AMD EPYC", "device.bf16": False, "device.fp16": False,
        "device.tf32": False, "device.tensor_cores": False, "device.cpu_avx512_bf16": False, "device.cpu_amx": False}
SPR = {**EPYC, "device.name": "Intel Xeon Platinum 8480", "device.bf16": True, "device.cpu_avx512_bf16": True,
       "device.cpu_amx": True}

# code -> (facts that fire the rule, near misses: each a change to those facts that must keep it silent)
HEALTHY = {"health.steps": 4, "health.nonfinite_grads": 0, "health.grad_scaler": False, "health.fp16": False,
           "health.fp16_without_scaler": False, "health.vanishing_layer_count": 0, "health.exploding_layer_count": 0,
           "health.max_layer_grad_norm": 0.3, "health.layer_grad_spread": 0.4, "health.loss_first": 2.0,
           "health.loss_last": 1.9, "health.loss_growth": 0.95, "health.update_ratio": 2e-3,
           "health.update_ratio_decades": 0.3, "health.grad_norm_growth": 1.1, "health.lr": 1e-3}

CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "AO001": (
        {**HEALTHY, "health.vanishing_layer_count": 3, "health.vanishing_layers": "0, 2, 4",
         "health.layer_grad_spread": 1e-9},
        [{"health.vanishing_layer_count": 0}, {"health.nonfinite_grads": 12}, {"health.vanishing_layer_count": None}],
    ),
    "AO002": (
        {**HEALTHY, "health.exploding_layer_count": 2, "health.exploding_layers": "blocks.0 (2e+03), head (1e+03)",
         "health.max_layer_grad_norm": 2e3},
        [{"health.exploding_layer_count": 0}, {"health.exploding_layer_count": None}],
    ),
    "AO003": (
        {**HEALTHY, "health.nonfinite_grads": 40, "health.first_nonfinite_step": 3, "health.first_nonfinite_layer": "0"},
        [{"health.nonfinite_grads": 0}, {"health.grad_scaler": True},
         {"health.fp16": True, "health.fp16_without_scaler": True}],
    ),
    "AO004": (
        {**HEALTHY, "health.nonfinite_grads": 40, "health.first_nonfinite_step": 1, "health.first_nonfinite_layer": "fc",
         "health.fp16": True, "health.fp16_without_scaler": True},
        [{"health.nonfinite_grads": 0}, {"health.fp16_without_scaler": False, "health.grad_scaler": True},
         {"health.fp16": False, "health.fp16_without_scaler": False}],
    ),
    "AO005": (
        {**HEALTHY, "health.loss_first": 2.0, "health.loss_last": 9.0, "health.loss_growth": 4.5,
         "health.grad_norm_growth": 30.0},
        [{"health.loss_growth": 1.5}, {"health.loss_growth": None}, {"health.grad_norm_growth": 0.3}],
    ),
    "AO006": (
        {**HEALTHY, "health.update_ratio": 2e-8, "health.update_ratio_decades": 4.7, "health.lr": 1e-7},
        [{"health.update_ratio_decades": 1.5}, {"health.vanishing_layer_count": 2}, {"health.nonfinite_grads": 3},
         {"health.update_ratio_decades": None}],
    ),
    "AO007": (
        {**HEALTHY, "health.exploding_activation_count": 3, "health.first_activation_rms": 0.6,
         "health.exploding_activations": "blocks.5.lin (115), blocks.6.lin (265), head (610)",
         "health.max_activation_rms": 610.0},
        [{"health.exploding_activation_count": 0}, {"health.exploding_activation_count": None}],
    ),
    "AO101": (
        {**A100, "metrics.matmul_fraction": 0.6, "metrics.fp32_matmul_fraction": 0.9, "metrics.kernel_fraction": 0.8,
         "workload.autocast": False, "model.param_dtype": "float32"},
        [{"metrics.fp32_matmul_fraction": 0.29}, {"workload.autocast": True}, {"device.bf16": False},
         {"metrics.matmul_fraction": 0.1}, {"model.param_dtype": "bfloat16"}, {"device.type": "cpu"},
         {"metrics.fp32_matmul_fraction": None}, {"metrics.idle_fraction": 0.94}],
    ),
    "AO102": (
        {**V100, "metrics.matmul_fraction": 0.6, "metrics.fp32_matmul_fraction": 0.9, "metrics.kernel_fraction": 0.7},
        [{"device.bf16": True}, {"workload.autocast": True}, {"device.fp16": False},
         {"metrics.fp32_matmul_fraction": 0.2}, {"model.param_dtype": "float16"}, {"metrics.idle_fraction": 0.8}],
    ),
    "AO103": (
        {**A100, "metrics.matmul_fraction": 0.5, "metrics.fp32_matmul_fraction": 0.8, "metrics.kernel_fraction": 0.9,
         "env.matmul_precision": "highest"},
        [{"env.matmul_precision": "high"}, {"env.matmul_precision": "medium"}, {"device.tf32": False},
         {"metrics.fp32_matmul_fraction": 0.1}],
    ),
    "AO104": (
        {**SPR, "metrics.matmul_fraction": 0.5, "workload.autocast": False},
        [{"device.bf16": False}, {"workload.autocast": True}, {"metrics.fp32_matmul_fraction": 0.1},
         {"device.type": "cuda"}, {"model.param_dtype": "bfloat16"}, {"metrics.matmul_fraction": 0.2}],
    ),
    "AO105": (
        {**A100, "metrics.nan_or_inf": True, "workload.autocast": True},
        [{"metrics.nan_or_inf": False}, {"workload.autocast": False}, {"device.bf16": False}],
    ),
    "AO106": (
        {**V100, "metrics.nan_or_inf": True, "workload.autocast": True},
        [{"device.bf16": True}, {"metrics.nan_or_inf": False}, {"workload.autocast": None}],
    ),
    "AO201": (
        {**A100, "metrics.conv_fraction": 0.5, "metrics.kernel_fraction": 0.8, "model.conv2d_count": 20,
         "workload.input_is_4d": True, "workload.channels_last": False, "metrics.layout_conversion_fraction": 0.0},
        [{"model.conv2d_count": 0}, {"workload.channels_last": True}, {"metrics.conv_fraction": 0.05},
         {"device.tensor_cores": False}, {"metrics.layout_conversion_fraction": 0.1}, {"workload.input_is_4d": False}],
    ),
    "AO202": (
        {**EPYC, "model.conv2d_count": 2, "workload.input_is_4d": True, "workload.channels_last": False,
         "metrics.conv_fraction": 0.4},
        [{"model.conv2d_count": 0}, {"workload.channels_last": True}, {"metrics.conv_fraction": 0.01},
         {"workload.input_is_4d": False}, {"device.type": "cuda"}, {"model.conv2d_count": None}],
    ),
    "AO203": (
        {**A100, "metrics.layout_conversion_fraction": 0.12, "metrics.kernel_fraction": 0.8,
         "workload.channels_last": False, "model.conv2d_count": 10},
        [{"workload.channels_last": True}, {"metrics.layout_conversion_fraction": 0.02}, {"model.conv2d_count": 0}],
    ),
    "AO204": (
        {**A100, "workload.channels_last": True, "metrics.layout_conversion_fraction": 0.1, "metrics.kernel_fraction": 0.8},
        [{"workload.channels_last": False}, {"metrics.layout_conversion_fraction": 0.01}],
    ),
    "AO301": (
        {**A100, "metrics.kernels_per_step": 1500, "metrics.small_kernel_fraction": 0.7, "metrics.idle_fraction": 0.4,
         "metrics.median_kernel_us": 4.2, "metrics.dataloader_fraction": 0.0, "workload.compiled": False},
        [{"workload.compiled": True}, {"metrics.small_kernel_fraction": 0.4}, {"metrics.kernels_per_step": 150},
         {"device.type": "cpu"}],
    ),
    "AO302": (
        {**A100, "metrics.idle_fraction": 0.76, "metrics.host_wait_fraction": 0.75, "metrics.ops_per_step": 1064,
         "metrics.small_kernel_fraction": 0.43, "metrics.dataloader_fraction": 0.0, "metrics.sync_time_fraction": 0.0,
         "workload.compiled": False},
        [{"workload.compiled": True}, {"metrics.small_kernel_fraction": 0.6}, {"metrics.idle_fraction": 0.2},
         {"metrics.dataloader_fraction": 0.2}, {"metrics.sync_time_fraction": 0.15}, {"device.type": "cpu"}],
    ),
    "AO303": (
        {**EPYC, "metrics.ops_per_step": 450, "workload.compiled": False},
        [{"metrics.ops_per_step": 43}, {"workload.compiled": True}, {"device.type": "cuda"}],
    ),
    "AO304": (
        {**A100, "metrics.launch_bound": True, "workload.static_shapes": True, "metrics.data_dependent_ops_per_step": 0,
         "metrics.sync_time_fraction": 0.0, "metrics.host_wait_fraction": 0.3, "metrics.dataloader_fraction": 0.0,
         "metrics.optimizer_fraction": 0.1, "metrics.kernels_per_step": 400},
        [{"workload.static_shapes": False}, {"metrics.launch_bound": False},
         {"metrics.data_dependent_ops_per_step": 2}, {"metrics.sync_time_fraction": 0.1},
         {"metrics.dataloader_fraction": 0.2}],
    ),
    "AO305": ({"metrics.graph_breaks": 3}, [{"metrics.graph_breaks": 0}]),
    "AO306": ({"metrics.recompilations": 4}, [{"metrics.recompilations": 1}]),
    "AO401": (
        {**A100, "metrics.gpu_utilization": 0.35, "metrics.memory_fraction": 0.2, "metrics.dataloader_fraction": 0.05,
         "workload.batch_size": 16},
        [{"metrics.gpu_utilization": 0.8}, {"metrics.memory_fraction": 0.7}, {"metrics.dataloader_fraction": 0.4},
         {"device.type": "cpu"}],
    ),
    "AO402": (
        {**EPYC, "workload.batch_size": 8, "metrics.memory_fraction": 0.1, "metrics.mfu": 0.05},
        [{"workload.batch_size": 128}, {"metrics.mfu": 0.5},
         {"metrics.memory_fraction": 0.6}, {"device.type": "cuda"}],
    ),
    "AO403": (
        {**A100, "workload.mode": "train", "metrics.memory_fraction": 0.92, "model.repeated_block_count": 12},
        [{"workload.mode": "infer"}, {"metrics.memory_fraction": 0.7}, {"model.repeated_block_count": 1}],
    ),
    "AO404": (
        {**A100, "workload.mode": "train", "metrics.memory_fraction": 0.92, "workload.batch_size": 64,
         "model.repeated_block_count": 1},
        [{"model.repeated_block_count": 6}, {"metrics.memory_fraction": 0.5}, {"workload.batch_size": 1},
         {"workload.mode": "infer"}],
    ),
    "AO501": (
        {**V100, "metrics.dataloader_fraction": 0.45, "workload.has_dataloader": True,
         "workload.dataloader_workers": 0, "workload.cpu_count": 8},
        [{"workload.has_dataloader": False}, {"metrics.dataloader_fraction": 0.05},
         {"metrics.dataloader_fraction": None}],
    ),
    "AO502": (
        {**A100, "metrics.pageable_h2d_fraction": 1.0, "metrics.memcpy_fraction": 0.08,
         "metrics.h2d_copies_per_step": 2, "workload.pin_memory": False},
        [{"workload.pin_memory": True}, {"metrics.pageable_h2d_fraction": 0.2}, {"metrics.memcpy_fraction": 0.01},
         {"device.type": "cpu"}, {"workload.has_dataloader": False}, {"metrics.dataloader_fraction": 0.2}],
    ),
    "AO503": (
        {**A100, "workload.dataloader_workers": 4, "metrics.dataloader_init_per_step": 0.1,
         "workload.persistent_workers": False},
        [{"workload.persistent_workers": True}, {"workload.dataloader_workers": 0},
         {"metrics.dataloader_init_per_step": 0}, {"metrics.dataloader_fraction": 0.2},
         {"metrics.pageable_h2d_fraction": 0.9}],
    ),
    "AO601": (
        {**A100, "metrics.sync_count_per_step": 12, "metrics.sync_time_fraction": 0.2},
        [{"metrics.sync_time_fraction": 0.01}, {"metrics.sync_count_per_step": 0}, {"device.type": "cpu"}],
    ),
    "AO602": (
        {**A100, "metrics.data_dependent_ops_per_step": 3},
        [{"metrics.data_dependent_ops_per_step": 0}, {"device.type": "cpu"}],
    ),
    "AO701": (
        {**EPYC, "workload.optimizer": "AdamW", "workload.optimizer_impl": "for-loop",
         "metrics.optimizer_fraction": 0.2, "model.param_count": 1_000_000},
        [{"workload.optimizer_impl": "fused"}, {"workload.optimizer_impl": "foreach"},
         {"metrics.optimizer_fraction": 0.01}, {"workload.optimizer_impl": None}],
    ),
    "AO702": (
        {**A100, "metrics.optimizer_kernels_per_step": 600, "metrics.optimizer_fraction": 0.15},
        [{"workload.optimizer_impl": "for-loop"}, {"workload.optimizer_impl": "fused"},
         {"metrics.optimizer_kernels_per_step": 20}, {"device.type": "cpu"}],
    ),
    "AO801": ({"model.is_data_parallel": True}, [{"model.is_data_parallel": False}]),
    "AO802": ({"metrics.dataparallel_ops": 3}, [{"model.is_data_parallel": True}, {"metrics.dataparallel_ops": 0}]),
    "AO803": (
        {**A100, "metrics.communication_fraction": 0.3, "metrics.comm_overlap_fraction": 0.2, "metrics.rank_count": 2,
         "metrics.comm_backend": "nccl"},
        [{"metrics.comm_overlap_fraction": 0.8}, {"metrics.communication_fraction": 0.05},
         {"metrics.communication_fraction": None}],
    ),
    "AO804": (
        {**A100, "metrics.rank_count": 4, "metrics.rank_step_skew": 0.3},
        [{"metrics.rank_count": 1}, {"metrics.rank_step_skew": 0.05}],
    ),
    "AO805": (
        {**A100, "metrics.comm_backend": "gloo"},
        [{"metrics.comm_backend": "nccl"}, {"metrics.comm_backend": ""}, {"device.type": "cpu"}],
    ),
    "AO901": (
        {**A100, "env.cudnn_benchmark": False, "workload.static_shapes": True, "model.conv_count": 53,
         "metrics.kernel_fraction": 0.9, "metrics.conv_fraction": 0.6},
        [{"env.cudnn_benchmark": True}, {"workload.static_shapes": False}, {"model.conv_count": 0},
         {"device.type": "cpu"}],
    ),
    "AO902": (
        {**EPYC, "env.nvidia_gpu_present": True, "env.torch_cuda_build": False},
        [{"env.nvidia_gpu_present": False}, {"env.torch_cuda_build": True}],
    ),
    "AO903": ({**EPYC, "env.cuda_available": True}, [{"env.cuda_available": False}, {"device.type": "cuda"}]),
    "AO904": ({"env.anomaly_detection": True}, [{"env.anomaly_detection": False}]),
    "AO905": ({**A100, "env.deterministic": True}, [{"env.deterministic": False}, {"device.type": "cpu"}]),
    "AO906": (
        {**EPYC, "env.num_threads": 1, "workload.cpu_count": 8, "env.cpus_free": 8},
        [{"env.num_threads": 8}, {"workload.cpu_count": 1}, {"env.cpus_free": 1}],
    ),
    "AO907": (
        {**EPYC, "env.num_threads": 2, "workload.cpu_count": 2, "env.cpus_busy_other": 1.0, "env.cpus_free": 1,
         "env.threads_over_free": 1},
        [{"env.threads_over_free": 0}, {"env.num_threads": 1}, {"device.type": "cuda"},
         {"env.threads_over_free": None}],
    ),
}

STEP_MS = 100.0


def fire_facts(code: str) -> dict[str, Any]:
    facts = {"metrics.step_time_ms": STEP_MS, **CASES[code][0]}
    if code == "AO402":
        facts["metrics.step_time_ms"] = 4.0
    return facts


def codes(findings) -> list[str]:
    return [f.code for f in findings]


# --------------------------------------------------------------------------- the library


def test_library_size_and_families():
    assert len(RULES) >= 20
    families = {r.family for r in RULES}
    assert families == set(R.FAMILIES.values())  # all nine
    assert [r.code for r in RULES] == sorted(r.code for r in RULES)


def test_named_transforms_each_have_a_rule():
    transforms = {r.transform for r in RULES}
    # issue 2's four named transforms, and every transform the optimizer implements
    assert {"amp", "channels_last", "compile", "batch_size"} <= transforms
    assert set(R.TRANSFORMS) <= transforms


def test_every_rule_has_a_case():
    assert set(CASES) == set(BY_CODE)


def test_rules_json():
    out = {"rules": [r.to_json() for r in RULES]}
    text = json.dumps(out)
    for item in json.loads(text)["rules"]:
        assert {"code", "name", "title", "transform", "safety"} <= set(item)
        assert item["safety"] in ("safe", "unsafe", "manual")


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.code)
def test_rule_documented(rule):
    assert rule.path.name == f"{rule.code}-{rule.name}.md"
    text = render_explain(rule)
    pos = [text.index(s) for s in R.SECTIONS]
    assert pos == sorted(pos)
    # examples are code
    ex = text[text.index("## Example"):text.index("## Use instead")]
    use = text[text.index("## Use instead"):text.index("## Fix safety")]
    assert "```" in ex and "```" in use
    # the thresholds the conditions use are stated in the documentation
    doc = " ".join(rule.doc.split())
    for c in rule.conditions + rule.unless:
        if isinstance(c.value, bool) or not isinstance(c.value, (int, float)) or abs(c.value) <= 2:
            if not (isinstance(c.value, float) and 0 < c.value < 1):
                continue
        v = c.value
        forms = {f"{v:g}", f"{v * 100:g} %", f"{v * 100:g}%"} if isinstance(v, float) and 0 < v < 1 else {f"{v:g}"}
        assert any(f in doc for f in forms), (rule.code, str(c), forms)
    # the gain's assumption is stated
    if rule.gain:
        assert "Predicted gain" in doc, rule.code
        r = rule.gain.get("removable")
        if r is not None and r < 1:
            assert f"{r:g}" in doc, (rule.code, r)
    else:
        assert "none estimated" in doc or "Predicted gain" not in doc
    # advice-only rules say there is no automatic fix
    if rule.transform is None:
        assert "No automatic fix" in doc, rule.code


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires_with_evidence(code):
    rule = BY_CODE[code]
    facts = fire_facts(code)
    found = {f.code: f for f in R.evaluate(RULES, facts)}
    assert code in found, f"{code} did not fire on {facts}"
    f = found[code]
    for c in rule.conditions:
        assert f.evidence[c.field] == facts[c.field]
    for c in rule.unless:
        if facts.get(c.field) is not None:
            assert f.evidence[c.field] == facts[c.field]
    assert set(f.evidence) <= set(FACTS) | set(R.LOCATION_FACTS)
    assert "unknown" not in f.message and "{" not in f.message, f.message
    assert f.safety == rule.safety and f.transform == rule.transform and f.family == rule.family
    if rule.gain:
        assert f.expected_speedup is not None and f.expected_speedup >= 1.0
        assert f.predicted_step_time_ms is not None and 0 < f.predicted_step_time_ms <= facts["metrics.step_time_ms"]
    else:
        assert f.expected_speedup is None and f.predicted_step_time_ms is None
    json.dumps(f.to_json())


@pytest.mark.parametrize(
    "code, i", [(code, i) for code in sorted(CASES) for i in range(len(CASES[code][1]))],
    ids=lambda x: str(x),
)
def test_rule_near_miss_is_silent(code, i):
    change = CASES[code][1][i]
    facts = {**fire_facts(code), **change}
    assert code not in codes(R.evaluate(RULES, facts)), f"{code} fired on near miss {change}"


@pytest.mark.parametrize("code", sorted(CASES))
def test_alternatives_never_fire_together(code):
    fired = [f for f in R.evaluate(RULES, fire_facts(code)) if f.transform]
    for i, a in enumerate(fired):
        for b in fired[i + 1:]:
            if a.transform == b.transform:
                assert a.params and b.params and not (set(a.params) & set(b.params)), (a.code, b.code)


# --------------------------------------------------------------------------- scenarios


def simple_cnn_cpu(**over) -> dict[str, Any]:
    """A LeNet-style CNN trained with SGD+momentum on this project's CI CPU (AVX2, no bf16)."""
    return {
        **EPYC,
        "model.param_count": 62006, "model.conv_count": 2, "model.conv2d_count": 2, "model.linear_count": 3,
        "model.rnn_count": 0, "model.attention_count": 0, "model.param_dtype": "float32",
        "model.repeated_block_count": 1, "model.is_data_parallel": False,
        "workload.mode": "train", "workload.batch_size": 32, "workload.has_dataloader": False,
        "workload.input_is_4d": True, "workload.static_shapes": True, "workload.optimizer": "SGD",
        "workload.optimizer_impl": "for-loop", "workload.autocast": False, "workload.channels_last": False,
        "workload.compiled": False, "workload.cpu_count": 2,
        "env.cudnn_benchmark": False, "env.matmul_precision": "highest", "env.anomaly_detection": False,
        "env.deterministic": False, "env.cuda_available": False, "env.torch_cuda_build": False,
        "env.nvidia_gpu_present": False, "env.num_threads": 2,
        "metrics.step_time_ms": 6.0, "metrics.peak_memory_mb": 400.0, "metrics.matmul_fraction": 0.7,
        "metrics.conv_fraction": 0.5, "metrics.fp32_matmul_fraction": 1.0, "metrics.ops_per_step": 43,
        "metrics.optimizer_fraction": 0.08, "metrics.dataloader_fraction": 0.0, "metrics.nan_or_inf": False,
        **over,
    }


def test_cpu_cnn_on_avx2():
    found = codes(R.evaluate(RULES, simple_cnn_cpu()))
    assert "AO202" in found  # channels_last: the measurement decides
    assert "AO104" not in found  # no bf16 on an AVX2 CPU
    assert "AO303" not in found  # 43 operators: not overhead-bound
    assert not [c for c in found if c.startswith("AO5")]  # no loader
    assert not [c for c in found if c[2] in "689"]  # no sync, distributed or environment alarms


def test_cpu_cnn_on_amx():
    found = codes(R.evaluate(RULES, simple_cnn_cpu(**SPR)))
    assert "AO104" in found and "AO202" in found


def test_cpu_tiny_ops_model_fires_compile():
    facts = simple_cnn_cpu(**{"model.conv2d_count": 0, "model.conv_count": 0, "workload.input_is_4d": False,
                              "metrics.conv_fraction": 0.0, "metrics.ops_per_step": 3000})
    found = codes(R.evaluate(RULES, facts))
    assert "AO303" in found
    assert not [c for c in found if c.startswith("AO2")]  # no convolutions: no layout advice


AMP_CODES = tuple(r.code for r in RULES if r.transform == "amp" and r.params.get("dtype") != "bfloat16"
                  or r.code in ("AO101", "AO104"))


@pytest.mark.parametrize(
    "control, silent_family",
    [
        ({"workload.autocast": True}, AMP_CODES),  # fp32 share still high: no autocast proposal again
        ({"workload.autocast": True, "metrics.fp32_matmul_fraction": 0.05}, "AO1"),
        ({"model.param_dtype": "bfloat16", "metrics.fp32_matmul_fraction": 0.0}, "AO1"),
        ({"model.conv2d_count": 0, "model.conv_count": 0, "workload.input_is_4d": False, "metrics.conv_fraction": 0.0}, "AO2"),
        ({"workload.channels_last": True}, "AO2"),
        ({"workload.compiled": True, "metrics.ops_per_step": 3000}, "AO3"),
        ({"workload.has_dataloader": False, "metrics.dataloader_fraction": None}, "AO5"),
        ({"workload.mode": "infer", "workload.optimizer": "", "workload.optimizer_impl": None,
          "metrics.optimizer_fraction": None}, "AO7"),
    ],
)
def test_controls_keep_family_silent(control, silent_family):
    for device in (SPR, A100):
        gpu_metrics = {"metrics.kernel_fraction": 0.9, "metrics.kernels_per_step": 5000,
                       "metrics.small_kernel_fraction": 0.8, "metrics.idle_fraction": 0.5,
                       "metrics.kernel_wait_fraction": 0.3} if device is A100 else {}
        facts = simple_cnn_cpu(**device, **gpu_metrics, **control)
        found = [c for c in codes(R.evaluate(RULES, facts)) if c.startswith(silent_family)]
        assert found == [], (device["device.name"], control, found)


def trace_only(device: dict[str, Any], **metrics) -> dict[str, Any]:
    """What `autoopt analyze` knows from a trace: device properties and trace metrics only."""
    return {**device, "metrics.steps": 5, "metrics.step_time_ms": 190.0, **metrics}


def test_v100_fp32_trace_recommends_fp16_not_bf16():
    facts = trace_only(V100, **{"metrics.matmul_fraction": 0.55, "metrics.fp32_matmul_fraction": 0.95,
                                "metrics.kernel_fraction": 0.55, "metrics.dataloader_fraction": 0.35,
                                "metrics.gpu_utilization": 0.55, "metrics.conv_fraction": 0.45})
    found = {f.code: f for f in R.evaluate(RULES, facts)}
    assert "AO102" in found and "AO101" not in found and "AO103" not in found
    assert found["AO102"].params == {"dtype": "float16"}  # the amp transform adds the GradScaler in training
    assert "AO501" in found  # the DataLoader wait
    assert found["AO501"].expected_speedup == pytest.approx(1 / (1 - 0.35))
    assert found["AO501"].predicted_step_time_ms == pytest.approx(190.0 * 0.65)


def test_a100_fp32_trace_recommends_bf16_and_tf32():
    facts = trace_only(A100, **{"metrics.matmul_fraction": 0.7, "metrics.fp32_matmul_fraction": 0.9,
                                "metrics.kernel_fraction": 0.9})
    found = codes(R.evaluate(RULES, facts))
    assert "AO101" in found and "AO103" in found and "AO102" not in found


def test_ddp_trace_reports_communication():
    facts = trace_only(A100, **{"metrics.communication_fraction": 0.25, "metrics.comm_overlap_fraction": 0.1,
                                "metrics.rank_count": 1, "metrics.comm_backend": "nccl"})
    found = {f.code: f for f in R.evaluate(RULES, facts)}
    assert "AO803" in found and "AO805" not in found
    assert found["AO803"].evidence["metrics.communication_fraction"] == 0.25


def test_empty_facts_fire_nothing():
    assert R.evaluate(RULES, {}) == []
    assert R.evaluate(RULES, {k: None for k in FACTS}) == []


def test_explain_every_rule_by_code():
    for r in RULES:
        text = render_explain(R.get_rule(r.code))
        assert text.startswith(f"# {r.name} ({r.code})")
        for s in R.SECTIONS:
            assert s in text


# --------------------------------------------------------------------------- facts from an analysis


def test_facts_from_analysis_prefixes_and_sites():
    analysis = {
        "device_facts": {"device.type": "cuda", "device.name": "NVIDIA A100", "device.bf16": True},
        "metrics": {"gpu_utilization": 0.4, "sync_count_per_step": 3.0, "sync_time_fraction": 0.2,
                    "not_a_fact": 1, "data_dependent_ops_per_step": 1.0},
        "traces": [{"syncs": {"sites": [
            {"name": "aten::item", "source": "train.py:42 (step)", "count": 5},
            {"name": "aten::nonzero", "source": "model.py:7 (forward)", "count": 5},
            {"name": "cudaDeviceSynchronize", "source": None, "count": 1},
        ]}}],
    }
    facts = from_analysis(analysis)
    assert facts["device.name"] == "NVIDIA A100" and facts["metrics.gpu_utilization"] == 0.4
    assert "not_a_fact" not in facts and "metrics.not_a_fact" not in facts
    assert facts["metrics.sync_sites"] == ["train.py:42 (step) aten::item", "model.py:7 (forward) aten::nonzero"]
    assert facts["metrics.data_dependent_sites"] == ["model.py:7 (forward) aten::nonzero"]
    found = {f.code: f for f in R.evaluate(RULES, facts)}
    assert "train.py:42 (step) aten::item" in found["AO601"].message
    assert found["AO601"].evidence["metrics.sync_sites"][0] == "train.py:42 (step) aten::item"
    assert "model.py:7 (forward) aten::nonzero" in found["AO602"].message
    assert from_analysis({}) == {}


# --------------------------------------------------------------------------- real GPU traces

TRACES = Path(__file__).resolve().parent / "data" / "traces" / "real"


def _trace_findings(rel: str):
    analyze = pytest.importorskip("autoopt.analyze")
    path = TRACES / rel
    if not path.exists():
        pytest.skip(f"{path} is not available")
    facts = from_analysis(analyze.analyze_paths([path]))
    return facts, {f.code: f for f in R.evaluate(RULES, facts)}


@pytest.mark.slow
def test_trace_resnet50_v100_no_workers():
    facts, found = _trace_findings("kineto/resnet50_v100_num_workers_0.pt.trace.json.gz")
    assert "AO501" in found  # data-loading bound
    assert found["AO501"].evidence["metrics.dataloader_fraction"] >= 0.1
    assert found["AO501"].expected_speedup > 1.0
    assert "AO102" in found and "AO101" not in found  # Volta: fp16 + GradScaler, not bf16
    assert found["AO102"].params["dtype"] == "float16"
    assert "AO401" not in found  # low utilization comes from the loader, not the batch


def test_trace_v100_gpu_bound():
    facts, found = _trace_findings("hta/v100_gpu_bound_ns_resolution_2024.pt.trace.json.gz")
    assert "AO102" in found and "AO101" not in found and "AO103" not in found
    assert not [c for c in found if c[:3] in ("AO3", "AO5", "AO6")]  # GPU-bound: no idle, loader or sync alarms


def test_trace_a100_ddp():
    facts, found = _trace_findings("hta/a100_ddp_rank0_2024.json.gz")
    assert facts["metrics.comm_backend"] == "nccl" and facts["metrics.communication_fraction"] > 0
    assert "AO805" not in found  # NCCL is the right backend
    assert "AO101" not in found  # the matmuls already run in low precision
    assert "AO302" in found  # the GPU waits for the host most of the step


def test_trace_cpu_only_gloo():
    facts, found = _trace_findings("hta/cpu_only.pt.trace.json.gz")
    assert facts["device.type"] == "cpu"
    assert "AO803" in found and "AO805" not in found  # gloo on a CPU job is fine; its exposed time is not
