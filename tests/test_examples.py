"""The bundled examples and the model files in other styles: each loads, builds a workload
with the right facts, and (where it trains) actually learns."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autoopt.env import detect_capabilities
from autoopt.workload.build import build_workload
from autoopt.workload.contract import call_forward, extract_loss, output_tensors
from autoopt.workload.load import load_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ROOT / "tests" / "models"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# facts each file must produce (a subset; the rest is checked generically)
EXPECTED = {
    EXAMPLES / "simplenet.py": {
        "workload.mode": "train", "workload.batch_size": 32, "model.conv_count": 3, "model.conv2d_count": 3,
        "model.linear_count": 2, "model.rnn_count": 0, "model.attention_count": 0, "model.repeated_block_count": 1,
        "workload.input_is_4d": True, "workload.optimizer": "SGD", "workload.has_dataloader": False,
        "workload.static_shapes": True, "workload.autocast": False, "workload.channels_last": False,
    },
    EXAMPLES / "mlp.py": {
        "workload.mode": "train", "model.linear_count": 4, "model.conv_count": 0, "workload.optimizer": "Adam",
        "workload.has_dataloader": True, "workload.dataloader_workers": 0, "workload.pin_memory": False,
        "workload.persistent_workers": False, "workload.input_is_4d": False, "workload.static_shapes": True,
    },
    EXAMPLES / "gpt.py": {
        "workload.mode": "train", "model.attention_count": 2, "model.repeated_block_count": 2,
        "workload.optimizer": "AdamW", "workload.input_is_4d": False, "workload.static_shapes": True,
    },
    EXAMPLES / "lstm_classifier.py": {
        "workload.mode": "infer", "model.rnn_count": 1, "workload.optimizer": "", "workload.optimizer_impl": None,
        "workload.static_shapes": True, "model.linear_count": 1,
    },
    EXAMPLES / "resnet_infer.py": {
        "workload.mode": "infer", "model.conv2d_count": 16, "model.repeated_block_count": 2,
        "workload.input_is_4d": True, "model.linear_count": 1,
    },
    MODELS / "style_nanogpt.py": {
        "workload.mode": "train", "model.attention_count": 0, "model.repeated_block_count": 2,
        "workload.optimizer": "AdamW", "workload.batch_size": 12,
    },
    MODELS / "style_lstm_infer.py": {
        "workload.mode": "infer", "model.rnn_count": 1, "workload.static_shapes": True, "workload.batch_size": 24,
    },
    MODELS / "style_fp16_overflow.py": {
        "workload.mode": "train", "model.linear_count": 3, "workload.optimizer": "SGD",
    },
}


def _caps(device):
    return detect_capabilities(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: p.name)
def test_file_builds_a_workload_with_its_facts(path, device):
    spec = load_model_file(path)
    w = build_workload(spec, _caps(device))
    f = w.facts
    for key, value in EXPECTED[path].items():
        assert f[key] == value, (key, f[key], value)
    torch.manual_seed(0)
    model = spec.build_model()
    assert f["model.param_count"] == sum(p.numel() for p in model.parameters())
    assert f["model.param_dtype"] == "float32"
    assert f["workload.cpu_count"] == len(os.sched_getaffinity(0))
    assert f["workload.compiled"] is False and f["model.is_data_parallel"] is False
    if spec.build_optimizer is not None:
        # torch's default implementation for parameters on this device
        assert f["workload.optimizer_impl"] == ("foreach" if device == "cuda" else "for-loop")
    assert w.mode == f["workload.mode"] and w.device == device


def _train(spec, steps, batch_size=None):
    torch.manual_seed(0)
    model = spec.build_model()
    opt = spec.build_optimizer(model)
    torch.manual_seed(0)
    batch = spec.make_batch(batch_size or spec.default_batch_size)
    losses = []
    for _ in range(steps):
        loss = extract_loss(call_forward(spec, model, batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "path,steps",
    [(EXAMPLES / "simplenet.py", 12), (EXAMPLES / "mlp.py", 15), (EXAMPLES / "gpt.py", 8), (MODELS / "style_nanogpt.py", 8)],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_training_examples_learn(path, steps):
    losses = _train(load_model_file(path), steps)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses


def test_simplenet_is_written_correctly():
    spec = load_model_file(EXAMPLES / "simplenet.py")
    model = spec.build_model()
    assert not any(isinstance(m, (torch.nn.Softmax, torch.nn.LogSoftmax)) for m in model.modules())
    torch.manual_seed(0)
    images, labels = spec.make_batch(8)
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long
    logits = model(images)
    assert logits.shape == (8, 10)
    assert not torch.allclose(logits.softmax(-1).sum(-1), logits.sum(-1))  # raw logits, not probabilities
    assert isinstance(spec.build_optimizer(model), torch.optim.SGD)
    assert spec.build_optimizer(model).defaults["momentum"] > 0
    # deterministic under torch.manual_seed, different under another seed
    torch.manual_seed(3)
    a = spec.make_batch(4)
    torch.manual_seed(3)
    b = spec.make_batch(4)
    torch.manual_seed(4)
    c = spec.make_batch(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflow_model_breaks_only_in_fp16(device):
    spec = load_model_file(MODELS / "style_fp16_overflow.py")
    torch.manual_seed(0)
    model = spec.build_model().to(device)
    torch.manual_seed(0)
    x, y = (t.to(device) for t in spec.make_batch(spec.default_batch_size))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = model(x).float()
        with torch.autocast(device, dtype=torch.float16):
            fp16 = model(x).float()
    assert torch.isfinite(ref).all() and torch.isfinite(bf16).all()
    rel = ((bf16 - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, rel  # bf16 rounding only
    assert not torch.isfinite(fp16).all()
    with torch.autocast(device, dtype=torch.float16):
        assert not torch.isfinite(spec.forward(model, (x, y)))


def test_lstm_style_is_sequence_first_and_inference_only():
    spec = load_model_file(MODELS / "style_lstm_infer.py")
    assert spec.mode == "infer" and spec.build_optimizer is None
    torch.manual_seed(0)
    text, lengths = spec.make_batch(5)
    assert text.shape == (40, 5) and lengths.shape == (5,)
    model = spec.build_model().eval()
    with torch.no_grad():
        out = call_forward(spec, model, (text, lengths))
    assert out.shape == (5, 3)
    assert len(output_tensors(out)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_hugging_face_model_with_dict_batches(device):
    spec = load_model_file(MODELS / "style_hf_bert.py")
    w = build_workload(spec, _caps(device))
    f = w.facts
    assert f["workload.mode"] == "train" and f["workload.batch_size"] == 16
    assert f["model.repeated_block_count"] == 2  # encoder.layer: two BertLayers
    assert f["model.attention_count"] == 2  # each BertSelfAttention calls scaled_dot_product_attention
    assert f["workload.optimizer"] == "AdamW"
    assert f["workload.static_shapes"] is True and f["workload.input_is_4d"] is False
    torch.manual_seed(0)
    batch = spec.make_batch(4)
    assert isinstance(batch, dict) and set(batch) >= {"input_ids", "attention_mask", "labels"}
    torch.manual_seed(0)
    model = spec.build_model()
    out = call_forward(spec, model, batch)  # default forward: model(**batch)
    loss = extract_loss(out)
    assert loss.dim() == 0 and loss.requires_grad
    losses = _train(spec, 10)
    assert losses[-1] < losses[0], losses
