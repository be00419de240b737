"""The model zoo (examples/zoo/): each real architecture loads through autoopt's model-file
contract, builds a workload on the CPU, trains two steps in autoopt's own Session with
finite losses, and has the shape of the published model (parameter counts within 1 %).
Images and sequences are shrunk through AUTOOPT_ZOO_IMAGE_SIZE / AUTOOPT_ZOO_SEQ_LEN, which
the files read when imported (load_model_file executes the file fresh each time)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from autoopt.run.session import Session
from autoopt.types import Capabilities
from autoopt.workload.build import build_workload
from autoopt.workload.load import load_model_file

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples" / "zoo"
CPU = Capabilities("cpu")

# about 25 s on 2 cores: the full-size models (up to 124 M parameters) are built twice each
pytestmark = pytest.mark.slow

# name -> (published parameter count, facts the workload must have)
ZOO_MODELS = {
    "resnet": (25.6e6, {"model.conv2d_count": 53, "model.attention_count": 0, "workload.optimizer": "SGD",
                        "workload.input_is_4d": True}),
    "resnet18": (11.7e6, {"model.conv2d_count": 20, "model.attention_count": 0, "workload.optimizer": "SGD",
                          "workload.input_is_4d": True}),
    "vit": (86.6e6, {"model.attention_count": 12, "model.repeated_block_count": 12, "workload.optimizer": "AdamW"}),
    "bert": (109e6, {"model.attention_count": 12, "model.repeated_block_count": 12, "workload.optimizer": "AdamW"}),
    "gpt2": (124e6, {"model.attention_count": 12, "model.repeated_block_count": 12, "workload.optimizer": "AdamW"}),
    "text_gru": (None, {"model.rnn_count": 1, "workload.has_dataloader": True, "workload.dataloader_workers": 0,
                        "workload.optimizer": "Adam"}),
}
NEEDS_TRANSFORMERS = {"bert", "gpt2"}


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setenv("AUTOOPT_ZOO_IMAGE_SIZE", "64")
    monkeypatch.setenv("AUTOOPT_ZOO_SEQ_LEN", "16")


@pytest.mark.parametrize("name", list(ZOO_MODELS))
def test_zoo_model_trains_two_steps_through_autoopt(name, small_sizes):
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    spec = load_model_file(ZOO / f"{name}.py")
    assert spec.build_optimizer is not None and spec.forward is not None
    w = build_workload(spec, CPU, batch_size=2)
    assert w.mode == "train" and w.batch_size == 2
    params, facts = ZOO_MODELS[name]
    for key, value in facts.items():
        assert w.facts[key] == value, (key, w.facts[key], value)
    if params is not None:
        n = w.facts["model.param_count"]
        assert abs(n - params) <= 0.01 * params, (name, n, params)
    with Session(w, w.base_config()) as s:
        losses = [float(s.step()) for _ in range(2)]
    assert all(math.isfinite(v) for v in losses), losses


def test_zoo_batches_follow_the_size_settings_and_seed(small_sizes):
    spec = load_model_file(ZOO / "resnet18.py")
    torch.manual_seed(3)
    images, labels = spec.make_batch(4)
    assert images.shape == (4, 3, 64, 64) and labels.dtype == torch.long and int(labels.max()) < 1000
    torch.manual_seed(3)
    again = spec.make_batch(4)
    torch.manual_seed(4)
    other = spec.make_batch(4)
    assert torch.equal(images, again[0]) and not torch.equal(images, other[0])
    vit = load_model_file(ZOO / "vit.py")
    assert vit.module.IMAGE_SIZE == 64


def test_text_pipeline_tokenizes_per_sample_and_matches_make_batch(small_sizes):
    spec = load_model_file(ZOO / "text_gru.py")
    m = spec.module
    assert m.SEQ_LEN == 16
    loader = spec.build_dataloader(8)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 0 and loader.drop_last
    tokens, labels = next(iter(loader))
    torch.manual_seed(0)
    direct = spec.make_batch(8)
    for a, b in zip((tokens, labels), direct):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert tokens.shape == (8, 16) and int(tokens.max()) < m.VOCAB and int(tokens.min()) >= 0
    # hashing is stable: the same word always gets the same id, case and punctuation aside
    assert torch.equal(m.tokenize("Kalo mi, kalo", 4), m.tokenize("kalo Mi kalo!", 4))
    assert m.tokenize("kalo", 4).tolist()[1:] == [0, 0, 0]
    # the loader's order is seeded: two loaders yield the same first batch
    assert torch.equal(next(iter(spec.build_dataloader(8)))[0], tokens)
