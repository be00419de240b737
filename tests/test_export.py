"""ONNX export (autoopt.pipelines.export): every example exports with a dynamic batch axis and
onnxruntime agrees with PyTorch at batch sizes it was not exported with; unsupported
operators are named; external data; plan transforms; pure JSON from the CLI.

The reference outputs here are computed independently of autoopt.pipelines.export: the test builds
the model itself (seeded), builds a batch of another size under another seed, feeds the
model's inputs by hand and compares with onnxruntime.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from autoopt.cli import main  # noqa: E402
from autoopt.errors import UserError  # noqa: E402
from autoopt.pipelines.export import ExportError, export_onnx, operator_from_error  # noqa: E402
from autoopt.plan import Plan  # noqa: E402
from autoopt.workload.load import load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# how each example's model is called on a make_batch() batch (written out here on purpose,
# so the test does not reuse the exporter's own call recording): {onnx input name: tensor}
MODEL_INPUTS = {
    "simplenet": lambda b: {"input_0": b[0]},  # forward(model, (images, labels)) calls model(images)
    "mlp": lambda b: {"input_0": b[0]},
    "resnet_infer": lambda b: {"input_0": b},
    "lstm_classifier": lambda b: {"tokens": b["tokens"], "mask": b["mask"]},  # model(**batch)
    "gpt": lambda b: {"input_0": b[:, :-1]},  # forward calls model(batch[:, :-1])
}
# a small export batch keeps the suite quick; the check batch is export batch + 3
EXPORT_BATCH = {"simplenet": 4, "mlp": 8, "resnet_infer": 4, "lstm_classifier": 4, "gpt": 2}


def _session(path) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _reference(name: str, batch_size: int, seed: int, model_seed: int = 0):
    spec = load_model_file(EXAMPLES / f"{name}.py")
    torch.manual_seed(model_seed)
    model = spec.build_model().eval()
    torch.manual_seed(seed)
    batch = spec.make_batch(batch_size)
    feeds = MODEL_INPUTS[name](batch)
    with torch.no_grad():
        out = model(**feeds) if name == "lstm_classifier" else model(*feeds.values())
    return {k: v.numpy() for k, v in feeds.items()}, out.numpy()


def _rel_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each example exported once per module (name -> result dict)."""
    out = tmp_path_factory.mktemp("onnx")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = export_onnx(EXAMPLES / f"{name}.py", out / f"{name}.onnx", batch_size=EXPORT_BATCH[name])
        return cache[name]

    return get


def _check_example(name: str, result: dict) -> None:
    path = Path(result["onnx_path"])
    assert path.is_file() and result["onnx_checker"] == "ok"
    onnx.checker.check_model(str(path), full_check=True)
    assert result["exporter"] == "torchscript" and result["exporter_fallback"] is None
    assert result["external_data"] is False and result["external_data_path"] is None
    assert result["check_batch_size"] == EXPORT_BATCH[name] + 3
    assert 0 <= result["max_abs_error"] < 1e-3 and 0 <= result["max_rel_error"] < 1e-4
    assert result["size_mb"] == pytest.approx(path.stat().st_size / 1e6, abs=1e-3)
    assert result["input_names"] == list(MODEL_INPUTS[name](load_model_file(EXAMPLES / f"{name}.py")
                                                            .make_batch(2)))
    assert result["output_names"] == ["output_0"]
    for input_name in result["input_names"]:
        assert result["dynamic_axes"][input_name] == {"0": "batch"}
    assert result["dynamic_axes"]["output_0"]["0"] == "batch"
    assert result["opset"] == max(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))

    # the batch axis really is dynamic: two sizes the export never saw, fresh batches, own reference
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == result["input_names"]
    assert sess.get_inputs()[0].shape[0] == "batch"
    for size, seed in ((1, 21), (EXPORT_BATCH[name] + 5, 22)):
        feeds, ref = _reference(name, size, seed)
        (got,) = sess.run(None, feeds)
        assert got.shape == ref.shape and got.shape[0] == size
        assert _rel_error(got, ref) < 1e-4, (name, size)


def test_export_mlp_dynamic_batch(exported):
    _check_example("mlp", exported("mlp"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simplenet", "resnet_infer", "lstm_classifier", "gpt"])
def test_export_examples_dynamic_batch(exported, name):
    _check_example(name, exported(name))


@pytest.mark.slow
def test_integer_inputs_stay_integer(exported):
    lstm = {i["name"]: i["type"] for i in exported("lstm_classifier")["inputs"]}
    assert lstm == {"tokens": "tensor(int64)", "mask": "tensor(bool)"}
    gpt = exported("gpt")
    assert [i["type"] for i in gpt["inputs"]] == ["tensor(int64)"]
    # a training file's loss is not exported: the graph returns the logits, per token
    assert gpt["outputs"][0]["shape"] == ["batch", 64, 512]


@pytest.mark.slow
def test_training_file_exports_the_model_not_the_loss(exported):
    r = exported("simplenet")
    assert r["input_names"] == ["input_0"]  # the images; the labels only feed the loss
    assert r["outputs"][0]["shape"] == ["batch", 10]


def test_seed_decides_the_weights(tmp_path):
    r = export_onnx(EXAMPLES / "mlp.py", tmp_path / "mlp.onnx", seed=3, batch_size=8)
    feeds, ref3 = _reference("mlp", 5, seed=30, model_seed=3)
    _, ref0 = _reference("mlp", 5, seed=30, model_seed=0)
    (got,) = _session(r["onnx_path"]).run(None, feeds)
    assert _rel_error(got, ref3) < 1e-4
    assert _rel_error(got, ref0) > 1e-2  # another seed builds other weights
    assert r["seed"] == 3


def test_external_data_below_a_lowered_threshold(tmp_path):
    dest = tmp_path / "sub" / "mlp.onnx"
    r = export_onnx(EXAMPLES / "mlp.py", dest, batch_size=8, external_data_threshold_bytes=1024)
    data = Path(r["external_data_path"])
    assert r["external_data"] is True and data == dest.with_name("mlp.onnx.data") and data.is_file()
    assert data.stat().st_mode & 0o777 == dest.stat().st_mode & 0o777
    # the weights live in the data file; the graph file is small
    weights = sum(p.numel() * 4 for p in load_model_file(EXAMPLES / "mlp.py").build_model().parameters())
    assert data.stat().st_size >= 0.9 * weights
    assert dest.stat().st_size < 0.1 * weights
    assert r["size_mb"] == pytest.approx((dest.stat().st_size + data.stat().st_size) / 1e6, abs=1e-3)
    model = onnx.load(str(dest), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(str(dest), full_check=True)
    feeds, ref = _reference("mlp", 3, seed=5)
    (got,) = _session(dest).run(None, feeds)
    assert _rel_error(got, ref) < 1e-4

    # exporting again to the same place rewrites the data file rather than appending to it
    size = data.stat().st_size
    export_onnx(EXAMPLES / "mlp.py", dest, batch_size=8, external_data_threshold_bytes=1024)
    assert data.stat().st_size == size

    # above the threshold nothing goes external
    r2 = export_onnx(EXAMPLES / "mlp.py", tmp_path / "inline.onnx", batch_size=8)
    assert r2["external_data"] is False and not (tmp_path / "inline.onnx.data").exists()


UNSUPPORTED = textwrap.dedent(
    """\
    import torch

    BATCH_SIZE = 4


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.lgamma(self.fc(x).abs() + 1.0)


    def build_model():
        return Net()


    def make_batch(batch_size):
        return torch.randn(batch_size, 8)
    """
)


def test_unsupported_operator_is_named(tmp_path):
    path = tmp_path / "lgamma_net.py"
    path.write_text(UNSUPPORTED)
    with pytest.raises(ExportError) as info:
        export_onnx(path, tmp_path / "out.onnx", exporter="torchscript")
    msg = info.value.message
    assert "aten::lgamma" in msg and "torch.lgamma" in msg
    assert "lgamma_net.py, line 12" in msg  # the line that calls it
    assert "the torchscript ONNX exporter cannot convert" in msg
    assert "Fix:" in msg and "\n" not in msg
    assert isinstance(info.value, UserError)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_cli_unsupported_operator_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "lgamma_net.py"
    path.write_text(UNSUPPORTED)
    rc = main(["export", str(path), "--onnx", str(tmp_path / "out.onnx"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    text = " ".join(err.split())
    assert "aten::lgamma" in text and "Traceback" not in text
    assert "neither the torchscript nor the dynamo ONNX exporter can convert" in text


@pytest.mark.slow
def test_falls_back_to_the_dynamo_exporter(tmp_path):
    """aten::rms_norm has no TorchScript-exporter translation; the dynamo exporter has one."""
    path = tmp_path / "rms_net.py"
    path.write_text(textwrap.dedent(
        """\
        import torch
        import torch.nn.functional as F

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(16, 16)
                self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

            def forward(self, x):
                return F.rms_norm(self.fc(x), (16,), self.w)

        def build_model():
            return Net()

        def make_batch(batch_size):
            return torch.randn(batch_size, 16)
        """
    ))
    r = export_onnx(path, tmp_path / "rms.onnx", batch_size=4)
    assert r["exporter"] == "dynamo"
    assert "aten::rms_norm" in r["exporter_fallback"]
    assert r["input_names"] == ["input_0"] and r["output_names"] == ["output_0"]
    assert r["max_rel_error"] < 1e-4
    spec = load_model_file(path)
    torch.manual_seed(0)
    model = spec.build_model().eval()
    x = torch.randn(9, 16)
    (got,) = _session(r["onnx_path"]).run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        assert _rel_error(got, model(x).numpy()) < 1e-4


def test_batch_size_baked_into_the_graph_is_caught(tmp_path):
    path = tmp_path / "baked.py"
    path.write_text(textwrap.dedent(
        """\
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)

            def forward(self, x):
                h = torch.zeros(int(x.shape[0]), 8)  # int() freezes the batch size in a trace
                return self.fc(x) + h

        def build_model():
            return Net()

        def make_batch(batch_size):
            return torch.randn(batch_size, 8)
        """
    ))
    with pytest.raises(ExportError, match="baked into the graph"):
        export_onnx(path, tmp_path / "baked.onnx", batch_size=4, exporter="torchscript")


def test_forward_that_never_calls_the_model(tmp_path):
    path = tmp_path / "side.py"
    path.write_text(textwrap.dedent(
        """\
        import torch

        def build_model():
            return torch.nn.Sequential(torch.nn.Linear(8, 8))

        def make_batch(batch_size):
            return torch.randn(batch_size, 8)

        def forward(model, batch):
            return model[0](batch)
        """
    ))
    with pytest.raises(ExportError, match="never calls model"):
        export_onnx(path, tmp_path / "side.onnx", exporter="torchscript")


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        export_onnx(EXAMPLES / "mlp.py", tmp_path)
    with pytest.raises(UserError, match="positive integer"):
        export_onnx(EXAMPLES / "mlp.py", tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(UserError, match="no such file"):
        export_onnx(tmp_path / "missing.py", tmp_path / "m.onnx")
    with pytest.raises(UserError, match="does not exist"):
        export_onnx(EXAMPLES / "mlp.py", tmp_path / "m.onnx", plan_path=tmp_path / "plan.json")


def _plan(tmp_path, items, **kw) -> Path:
    return Plan.from_transforms(items, **kw).save(tmp_path / "plan.json")


@pytest.mark.slow
def test_plan_float16_weights_and_ignored_transforms(tmp_path):
    plan = _plan(tmp_path, [
        ("inference_mode", {"weights_dtype": "float16"}),
        ("channels_last", {}),
        ("compile", {"mode": "default"}),
        ("tf32", {}),
    ], model="resnet_infer", mode="infer", baseline_batch_size=32)
    r = export_onnx(EXAMPLES / "resnet_infer.py", tmp_path / "r16.onnx", plan_path=plan, batch_size=4)
    assert [a["name"] for a in r["plan_transforms_applied"]] == ["inference_mode"]
    assert "float16" in r["plan_transforms_applied"][0]["how"]
    assert {i["name"] for i in r["plan_transforms_ignored"]} == {"channels_last", "compile", "tf32"}
    assert all(i["reason"] for i in r["plan_transforms_ignored"])
    assert r["weights_dtype"] == "float16" and r["inputs"][0]["type"] == "tensor(float16)"
    assert r["tolerance"] == 1e-2 and r["max_rel_error"] < 1e-2
    # float16 graph against the float32 PyTorch model: close, to half precision
    feeds, ref = _reference("resnet_infer", 3, seed=8)
    (got,) = _session(r["onnx_path"]).run(None, {"input_0": feeds["input_0"].astype(np.float16)})
    assert got.dtype == np.float16 and _rel_error(got.astype(np.float32), ref) < 2e-2


def test_plan_bfloat16_weights_are_ignored_and_batch_size_used(tmp_path):
    plan = _plan(tmp_path, [
        ("inference_mode", {"weights_dtype": "bfloat16"}),
        ("batch_size", {"batch_size": 16, "previous": 256}),
    ], model="mlp", mode="infer", baseline_batch_size=256)
    r = export_onnx(EXAMPLES / "mlp.py", tmp_path / "m.onnx", plan_path=plan)
    assert r["batch_size"] == 16 and r["check_batch_size"] == 19
    assert r["weights_dtype"] == "float32" and r["inputs"][0]["type"] == "tensor(float)"
    assert {a["name"] for a in r["plan_transforms_applied"]} == {"inference_mode", "batch_size"}
    (bf16,) = r["plan_transforms_ignored"]
    assert bf16["name"] == "inference_mode" and "bfloat16" in bf16["reason"]
    assert r["plan"]["model"] == "mlp"
    # an explicit batch size wins over the plan's
    r2 = export_onnx(EXAMPLES / "mlp.py", tmp_path / "m2.onnx", plan_path=plan, batch_size=6)
    assert r2["batch_size"] == 6
    assert "batch_size" in {i["name"] for i in r2["plan_transforms_ignored"]}


def test_cli_json_prints_only_json(tmp_path, capsys):
    dest = tmp_path / "mlp.onnx"
    rc = main(["export", str(EXAMPLES / "mlp.py"), "--onnx", str(dest), "--batch-size", "8", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(out)
    for key in ("model", "model_path", "onnx_path", "opset", "exporter", "input_names", "output_names",
                "dynamic_axes", "check_batch_size", "max_abs_error", "max_rel_error", "onnx_checker",
                "external_data", "size_mb", "plan_transforms_applied", "plan_transforms_ignored"):
        assert key in data, key
    assert data["model"] == "mlp" and Path(data["onnx_path"]) == dest.resolve() and dest.is_file()
    assert isinstance(data["max_abs_error"], float) and data["onnx_checker"] == "ok"

    # the file exists now: replacing it takes --force
    rc = main(["export", str(EXAMPLES / "mlp.py"), "--onnx", str(dest), "--batch-size", "8", "--force"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "max abs error" in out and "mlp.onnx" in out


@pytest.mark.slow
def test_stdout_stays_clean_at_the_file_descriptor_level(tmp_path):
    """The TorchScript exporter writes its IR dump to fd 1 from C++ when it fails; a real
    process shows that what reaches stdout is only the JSON (or nothing, on an error)."""
    path = tmp_path / "lgamma_net.py"
    path.write_text(UNSUPPORTED)
    bad = subprocess.run([sys.executable, "-m", "autoopt", "export", str(path), "--onnx", str(tmp_path / "x.onnx"),
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "aten::lgamma" in bad.stderr and "Torch IR graph" not in bad.stderr
    good = subprocess.run([sys.executable, "-m", "autoopt", "export", str(EXAMPLES / "mlp.py"), "--onnx",
                           str(tmp_path / "m.onnx"), "--batch-size", "8", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["onnx_checker"] == "ok"


def test_operator_names_parsed_from_exporter_errors():
    ts = RuntimeError("Exporting the operator 'aten::histc' to ONNX opset version 20 is not supported")
    assert operator_from_error(ts) == "aten::histc"
    inner = RuntimeError("No ONNX function found for <OpOverload(op='aten._linalg_svd', overload='default')>. ")
    outer = RuntimeError("Failed to convert the exported program to an ONNX model.")
    outer.__cause__ = inner
    assert operator_from_error(outer) == "aten::_linalg_svd"
    node = RuntimeError("Error when translating node %histc : [num_users=1] = "
                        "call_function[target=torch.ops.aten.histc.default](args = (%linear, 4), kwargs = {}).")
    assert operator_from_error(node) == "aten::histc"
    ort_err = RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for Gemm(13) node with name '/0/Gemm'")
    assert operator_from_error(ort_err) == "Gemm"
    assert operator_from_error(RuntimeError("something else")) is None
