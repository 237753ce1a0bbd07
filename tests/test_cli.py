"""The `tlbridge` command line, driven in a subprocess as a user would: fine-tune from an image
folder on each backend, predict, export; bad usage gives exit status 2 and one line naming what
was wrong. The runs are shared per backend (module scope): each costs a framework start-up."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import BACKENDS

import tlbridge as tl

SIZE = 32


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tlbridge", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def _errors(out) -> list[str]:
    """The error lines on stderr (TensorFlow may log other lines before them)."""
    return [line for line in out.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 6 PNGs, 40x40 (resized to 32 by the command), a bright left half for "dog"."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(6):
            a = (rng.random((40, 40, 3)) * 255).astype("uint8")
            if c == "dog":
                a[:, :20] = 255
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


_RUNS: dict = {}


@pytest.fixture
def run(backend, folder, tmp_path_factory):
    """One fine-tune per backend, shared by the tests of this module (and test_export.py's)."""
    if backend not in _RUNS:
        out = tmp_path_factory.mktemp(f"run_{backend}") / "model.safetensors"
        recipe = out.parent / "recipe.yaml"
        recipe.write_text("backbone: seed_vgg\nepochs: 3\nbatch_size: 4\nlr: 0.01\n")
        done = cli("fine-tune", "-c", recipe, "--epochs", 1, "--data", folder, "--image-size", SIZE,
                   "--backend", backend, "--out", out, "--no-progress", "--checkpoint", out.parent / "ck")
        assert done.returncode == 0, done.stderr[-3000:]
        _RUNS[backend] = out
    return _RUNS[backend]


def test_fine_tune_writes_model_history_loss_curve_and_the_resolved_recipe(run, backend):
    stem = str(run)[:-len(".safetensors")]
    recipe = json.loads(open(stem + ".recipe.json").read())
    assert recipe["epochs"] == 1 and recipe["batch_size"] == 4 and recipe["lr"] == 0.01   # flag > file
    assert recipe["backend"] == backend and recipe["classes"] == ["cat", "dog"]
    assert len(json.loads(open(stem + ".history.json").read())) == 1
    assert open(stem + ".loss.png", "rb").read(4) == b"\x89PNG"
    m = tl.load(run)
    assert m.backend == backend and m.num_outputs == 1 and m.inputs[0].shape == (SIZE, SIZE, 3)


def test_resume_continues_the_run_and_refuses_another_recipe(run, backend, folder, tmp_path):
    if backend != "torch":
        pytest.skip("one backend is enough here: resume itself is tested on both (test_fine_tune.py)")
    base = ["fine-tune", "-c", run.parent / "recipe.yaml", "--data", folder, "--image-size", SIZE,
            "--checkpoint", run.parent / "ck", "--resume", "--epochs", 2, "--no-progress"]
    done = cli(*base, "--out", tmp_path / "m.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "m.history.json").read_text())
    assert [e["epoch"] for e in history] == [0, 1]
    first = json.loads(open(str(run)[:-len(".safetensors")] + ".history.json").read())
    assert history[0]["loss"] == first[0]["loss"]          # epoch 0 is the checkpoint's, not retrained
    done = cli(*base, "--lr", 0.5, "--out", tmp_path / "other.safetensors")
    assert done.returncode == 2 and "lr 0.01 -> 0.5" in _errors(done)[0]


def images(folder, m):
    from tlbridge.data import _decode
    files = sorted(folder.rglob("*.png"))
    return tl.preprocess(m, np.stack([_decode(f, (SIZE, SIZE)) for f in files])), files


def test_predict_writes_tl_predicts_probabilities(run, folder, tmp_path):
    done = cli("predict", run, folder, "--out", tmp_path / "p.csv")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["sample", "p_dog"] and rows[1][0] == os.path.join("cat", "0.png")
    m = tl.load(run)
    x, _ = images(folder, m)
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], tl.predict(m, x)[:, 0], atol=1e-6)


def test_evaluate_prints_the_scores(run, backend, folder):
    if backend != "torch":
        pytest.skip("the same tl.evaluate call on both backends; one subprocess is enough")
    done = cli("evaluate", run, folder)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(scores) == {"loss", "accuracy", "auc"}
    m = tl.load(run)
    x, files = images(folder, m)
    y = np.array([[f.parent.name == "dog"] for f in files], float)
    assert scores["loss"] == pytest.approx(tl.evaluate(m, (x, y))["loss"], abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None or "keras" not in BACKENDS,
                    reason='needs jax and keras (pip install "tlbridge[jax]")')
def test_engine_jax_fine_tunes_on_keras_jax_engine_and_the_model_loads_here(folder, tmp_path):
    out = tmp_path / "model.safetensors"
    done = cli("fine-tune", "--backbone", "seed_vgg", "--epochs", 1, "--batch-size", 4, "--data", folder,
               "--image-size", SIZE, "--engine", "jax", "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((tmp_path / "model.recipe.json").read_text())
    assert (recipe["backend"], recipe["engine"]) == ("keras", "jax")   # the engine that ran
    m = tl.load(out, backend=BACKENDS[0])
    assert m.num_outputs == 1 and np.isfinite(tl.predict(m, np.zeros((2, SIZE, SIZE, 3), "float32"))).all()


def test_print_config_resolves_defaults_file_and_flags(tmp_path):
    (tmp_path / "r.json").write_text('{"backbone": "resnet18", "epochs": 5, "image-size": 64}')
    done = cli("fine-tune", "-c", tmp_path / "r.json", "--epochs", 2, "--print-config")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert (r["backbone"], r["epochs"], r["image_size"], r["optimizer"]) == ("resnet18", 2, 64, "sgd")


@pytest.mark.parametrize("args, says", [
    (["fine-tune", "--backbone", "resnet1", "--data", "{folder}"], "Unknown backbone 'resnet1'"),
    (["fine-tune", "--backbone", "resnet18", "--data", "{missing}"], "does not exist; expected an image folder"),
    (["fine-tune", "--backbone", "resnet18", "--epocs", "2"], "unrecognized arguments: --epocs"),
    (["fine-tune", "-c", "{bad_key}", "--data", "{folder}"], "unknown config key(s) ['epochz']"),
    (["fine-tune", "--backbone", "resnet18", "--data", "{folder}", "--backend", "keras",
      "--engine", "torch"], "engine 'torch' is not accepted; expected one of ['tensorflow', 'jax']"),
    (["export", "{missing}", "--out", "x.onnx"], "model file"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
], ids=["backbone", "data", "flag", "config-key", "engine", "model-file", "command"])
def test_bad_usage_exits_2_with_one_line(args, says, folder, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: resnet18\nepochz: 2\n")
    fill = {"folder": folder, "missing": tmp_path / "nope", "bad_key": bad}
    done = cli(*[a.format(**fill) for a in args], cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = _errors(done)
    assert len(lines) == 1 and says in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    done = cli("--debug", "fine-tune", "--backbone", "resnet18", "--data", tmp_path / "nope")
    assert done.returncode == 2 and "Traceback" in done.stderr


def test_every_command_has_help():
    for command in ("backbones", "fine-tune", "evaluate", "predict", "convert", "export",
                    "parity", "speed"):
        from tlbridge.cli import main
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_convert_moves_a_model_file_to_the_other_backend(tmp_path):
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=(SIZE, SIZE, 3),
                                         seed=0), 1)
    tl.save(m, tmp_path / "t.safetensors")
    done = cli("convert", tmp_path / "t.safetensors", tmp_path / "k.safetensors", "--to", "keras")
    assert done.returncode == 0, done.stderr[-2000:]
    k = tl.load(tmp_path / "k.safetensors")
    assert k.backend == "keras"
    x = np.random.default_rng(0).normal(size=(3, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(tl.predict(k, x), tl.predict(m, x), atol=1e-5)


def _served(path, fmt, x):
    """The exported model's logits, run outside tlbridge (onnxruntime / TensorFlow)."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"images": x})[0]
    tl.registry.load("keras")
    import tensorflow as tf
    loaded = tf.saved_model.load(str(path))         # kept: its variables live with it
    return loaded.serve(tf.constant(x))["logits"].numpy()


@pytest.mark.parametrize("fmt", ["onnx", "saved_model"])
def test_exported_model_gives_tl_predicts_probabilities(run, backend, fmt, folder, tmp_path):
    """fine-tune -> export -> the artifact in ONNX Runtime / TensorFlow: tl.predict's numbers,
    and the check the export ran is stored with it."""
    if fmt == "saved_model" and backend == "torch":
        pytest.skip("a torch model's SavedModel is the Keras one's after convert (covered on keras)")
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m_saved")
    done = cli("export", run, "--format", fmt, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worst difference" in done.stdout
    m = tl.load(run)
    x, _ = images(folder, m)
    z = _served(out, fmt, x)
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), tl.predict(m, x), atol=1e-5)
    from tlbridge.exporting import read_metadata
    meta = read_metadata(out)
    assert meta["classes"] == ["cat", "dog"] and meta["layout"] == "NHWC"
    assert 0 <= meta["check"]["worst"]["logits"] <= meta["check"]["bar"]
    assert meta["check"]["batch_sizes"] == [1, 5] and meta["preprocessing"]["mean"]
