"""tl.export: the artifact takes tl.logits' input and returns its logits (one named output per
task), LoRA exports merged, and every export is checked when written: an export over the
float32 bar is refused. The command-line round trip (fine-tune -> export -> onnxruntime /
TensorFlow against tl.predict) is in test_cli.py."""
from __future__ import annotations

import numpy as np
import pytest

import tlbridge as tl
from tlbridge import errors, exporting

FORMAT = {"torch": "onnx", "keras": "saved_model"}     # the cheapest export of each backend
SHAPE = (32, 32, 3)


def _run(path, fmt, x) -> dict:
    """The artifact run outside tlbridge: onnxruntime, or TensorFlow's saved_model.load."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": x})))
    tl.registry.load("keras")
    import tensorflow as tf
    loaded = tf.saved_model.load(str(path))
    return {k: v.numpy() for k, v in loaded.serve(tf.constant(x)).items()}


def _out(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    return tmp_path / ("m.onnx" if fmt == "onnx" else "m_saved")


def test_task_heads_export_one_named_output_each(backend, tmp_path):
    m = tl.replace_heads(tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, seed=0),
                         {"spam": ("bce", 1), "topic": ("ce", 3)}, seed=0)
    fmt = FORMAT[backend]
    meta = tl.export(m, _out(tmp_path, fmt), fmt, verbose=False)
    assert set(meta["check"]["worst"]) == {"spam", "topic"}
    assert max(meta["check"]["worst"].values()) <= exporting.BAR
    x = np.random.default_rng(3).normal(size=(4, *SHAPE)).astype("float32")
    got, z = _run(_out(tmp_path, fmt), fmt, x), tl.logits(m, x)
    assert sorted(got) == ["spam", "topic"]
    np.testing.assert_allclose(got["spam"], z[:, :1], atol=1e-5)
    np.testing.assert_allclose(got["topic"], z[:, 1:], atol=1e-5)
    assert exporting.read_metadata(_out(tmp_path, fmt))["outputs"][1] == {"name": "topic", "columns": [1, 4]}


def test_lora_model_exports_merged_and_keeps_its_adapters(tmp_path):
    pytest.importorskip("onnx")
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE, seed=0), 2, seed=0)
    tl.add_lora(m, rank=2, seed=0)
    w = tl.get_weights(m)
    rng = np.random.default_rng(0)
    tl.set_weights(m, {k: (rng.normal(size=v.shape) * 0.1).astype(v.dtype) if "lora_B" in k else v
                       for k, v in w.items()})     # B starts at zero: make the adapters count
    tl.export(m, tmp_path / "m.onnx", "onnx", verbose=False)
    import onnx
    names = [t.name for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    assert names and not [n for n in names if "lora" in n]
    assert any("lora_A" in k for k in tl.get_weights(m))          # the model itself is unchanged
    x = rng.normal(size=(3, *SHAPE)).astype("float32")
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", "onnx", x)["logits"], tl.logits(m, x), atol=1e-5)


def test_an_export_over_the_bar_is_refused(tmp_path, monkeypatch):
    """The check is real: with a bar below float32 rounding, the same export fails."""
    pytest.importorskip("onnx")
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE, seed=0), 1)
    monkeypatch.setattr(exporting, "BAR", 1e-12)
    with pytest.raises(errors.ExportError, match="must not be served"):
        tl.export(m, tmp_path / "m.onnx", "onnx", verbose=False)


def test_refusals_name_what_is_accepted(backend, tmp_path):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, seed=0)
    with pytest.raises(errors.NoHeadError):
        tl.export(m, tmp_path / "m.onnx")
    m = tl.replace_head(m, 1)
    with pytest.raises(errors.ArgumentTypeError, match=r"format one of \['onnx', 'saved_model'\]"):
        tl.export(m, tmp_path / "m.tflite", "tflite")
    if backend == "torch":
        with pytest.raises(errors.ExportError, match="tl.convert\\(m, 'keras'\\)"):
            tl.export(m, tmp_path / "m_saved", "saved_model")
