"""The Keras backend on Keras' JAX engine (KERAS_BACKEND=jax).

Keras picks its engine once per process, so the tests below split in two:
- subprocess tests (run in every pass): a JAX process never imports TensorFlow, and a
  checkpoint written there is read by torch and by this process's Keras;
- engine tests (run when this process is on JAX: `make test`'s second pass,
  KERAS_BACKEND=jax pytest tests/test_keras_jax.py): fp64 parity of the loss and every
  gradient against torch, training parity, one trace per trainable set and batch size, and a
  clear error for what is not ported yet. The whole parity suite on JAX:
  KERAS_BACKEND=jax pytest tests/test_parity.py -k float64.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import errors, parity, registry, zoo

HAS_JAX = importlib.util.find_spec("jax") is not None
needs_jax = pytest.mark.skipif(not HAS_JAX, reason='needs jax (pip install "tlbridge[jax]")')
on_jax = pytest.mark.skipif(registry.keras_engine() != "jax",
                            reason="runs on Keras' JAX engine: KERAS_BACKEND=jax (make test's second pass)")
not_on_jax = pytest.mark.skipif(registry.keras_engine() == "jax", reason="the TensorFlow pass runs it")

SMALL = {"widths": (8, 16), "batch_norm": True}


def _run_jax(code: str, tmp_path) -> dict:
    """`code` in a fresh process on Keras' JAX engine; it prints one JSON line last."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TLBRIDGE_BACKEND": "keras"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_jax
@not_on_jax
def test_jax_engine_builds_fine_tunes_saves_and_loads_without_tensorflow(tmp_path):
    r = _run_jax("""
        import json, sys
        import numpy as np
        import tlbridge as tl
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(12, 32, 32, 3)).astype("float32"), (rng.random((12, 2)) > .5) * 1.
        m = tl.replace_head(tl.load_backbone("seed_vgg", input_shape=(32, 32, 3), seed=0,
                                             widths=(8, 16), batch_norm=True), 2)
        h = tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, feature_cache=False)
        tl.save(m, "m")
        back = tl.load("m")
        same = bool(np.array_equal(tl.predict(back, x), tl.predict(m, x)))
        import keras
        print(json.dumps({"tf": "tensorflow" in sys.modules, "engine": keras.backend.backend(),
                          "same": same, "loss": float(h["loss"][-1])}))
    """, tmp_path)
    assert r["engine"] == "jax" and r["same"] and np.isfinite(r["loss"])
    assert not r["tf"], "TensorFlow was imported on Keras' JAX engine"


def _vgg(backend):
    return tl.replace_head(tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), seed=0,
                                            dtype="float64", widths=(8, 16), batch_norm=True), 2, seed=1)


RESUME = dict(batch_size=8, seed=3, progress=False, feature_cache=False)


@needs_jax
@both_backends
@not_on_jax
def test_a_model_and_checkpoint_written_on_jax_are_read_by_torch_and_keras_on_tensorflow(tmp_path):
    """One epoch on JAX with a checkpoint, resumed for a second epoch here on torch and on
    Keras-TensorFlow, equals two epochs on torch (Adam: its state is in the checkpoint)."""
    _run_jax("""
        import json
        import numpy as np
        import tlbridge as tl
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 32, 32, 3)), (rng.random((16, 2)) > .5) * 1.
        m = tl.replace_head(tl.load_backbone("seed_vgg", input_shape=(32, 32, 3), seed=0,
                            dtype="float64", widths=(8, 16), batch_norm=True), 2, seed=1)
        tl.fine_tune(m, (x, y), epochs=1, checkpoint="ckpt", optimizer=tl.optim.Adam(3e-3),
                     batch_size=8, seed=3, progress=False, feature_cache=False)
        tl.save(m, "part")
        np.save("part.npy", tl.predict(m, x))
        print(json.dumps({"ok": True}))
    """, tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 32, 32, 3)), (rng.random((16, 2)) > .5) * 1.
    whole = _vgg("torch")
    tl.fine_tune(whole, (x, y), epochs=2, optimizer=tl.optim.Adam(3e-3), **RESUME)
    for backend in ("torch", "keras"):
        loaded = tl.load(tmp_path / "part", backend=backend)
        np.testing.assert_allclose(tl.predict(loaded, x), np.load(tmp_path / "part.npy"), rtol=0, atol=1e-12)
        m = _vgg(backend)
        tl.fine_tune(m, (x, y), epochs=2, optimizer=tl.optim.Adam(3e-3),
                     checkpoint=tl.Checkpoint(tmp_path / "ckpt", resume=True), **RESUME)
        np.testing.assert_allclose(tl.predict(m, x), tl.predict(whole, x), rtol=1e-9, atol=1e-12,
                                   err_msg=f"resumed on {backend}")


# -- on the JAX engine ----------------------------------------------------------------------
TINY_BERT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 32, "max_position_embeddings": 32}
# the cheap ones here; every portable backbone: KERAS_BACKEND=jax pytest tests/test_parity.py -k float64
PARITY = {"seed_vgg_bn": ("seed_vgg", {"batch_norm": True}), "resnet18": ("resnet18", {}),
          "token_bag": ("token_bag", {}), "bert_tiny": ("bert", TINY_BERT)}


@on_jax
@both_backends
@pytest.mark.parametrize("case", sorted(PARITY))
def test_float64_loss_every_gradient_and_bn_statistics_match_torch_on_jax(case):
    name, options = PARITY[case]
    cfg = parity.config(name, **options)
    mt, mk = parity.pair(name, dtype="float64", num_outputs=3, input_shape=cfg.shape, calibrate=1, **options)
    x, y = parity.batch(zoo.signature(name, cfg.shape, options), cfg.batch64, 3, seed=parity.SEED_BATCH)
    r = parity.compare(mt, mk, x, y, training=True)      # train-mode BatchNorm: its custom gradient
    assert r.n_grads == len(tl.trainable_names(mt)) > 0
    assert r.loss <= parity.TOL["float64"], f"loss differs by {r.loss:.3g}"
    assert r.grads <= parity.TOL["float64"], f"gradient {r.grads_at} differs by {r.grads:.3g}"
    assert r.zeros == parity.expected_zero_grads(mt, True), "structural zeros differ"
    assert r.stats <= parity.TOL["float64"], f"BatchNorm statistics differ by {r.stats:.3g}"


def _data(n=20, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32, 32, 3)), (rng.random((n, k)) > 0.5).astype(float)


@on_jax
@both_backends
@pytest.mark.parametrize("optimizer,batch_norm", [
    (tl.optim.SGD(0.05, nesterov=True, weight_decay=1e-2, schedule="cosine"), True),
    # no BatchNorm under Adam: the conv bias before one has an exactly-zero gradient, whose
    # rounding noise Adam turns into updates (tests/test_training_parity.py)
    (tl.optim.AdamW(3e-3, weight_decay=1e-1, schedule="cosine"), False)], ids=["sgd-nesterov-wd-bn", "adamw"])
def test_two_epochs_of_fine_tune_match_torch_on_jax(optimizer, batch_norm):
    mt, mk = parity.pair("seed_vgg", dtype="float64", num_outputs=2, input_shape=(32, 32, 3), seed=0,
                         widths=(8, 16), batch_norm=batch_norm)
    x, y = _data()
    hist = {m.backend: tl.fine_tune(m, (x, y), epochs=2, batch_size=8, seed=5, progress=False,
                                    feature_cache=False, optimizer=optimizer) for m in (mt, mk)}
    diff, at = parity.worst(tl.get_weights(mt), tl.get_weights(mk), floor_rel=1e-6)
    assert diff <= 1e-9, f"{at} differs by {diff:.3g}"
    np.testing.assert_allclose(hist["torch"]["loss"], hist["keras"]["loss"], rtol=1e-10)


@on_jax
def test_jit_traces_once_per_trainable_set_and_batch_size_across_epochs_and_calls():
    from tlbridge.backends.keras.engine_jax import traced_steps
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(32, 32, 3), seed=0, **SMALL), 2)
    x, y = _data(n=20)                  # batches of 8, 8 and a ragged 4
    run = dict(batch_size=8, progress=False, feature_cache=False)
    tl.fine_tune(m, (x, y), epochs=3, **run)
    assert traced_steps(m) == 2         # one trace for 8 rows, one for 4: not one per epoch
    tl.fine_tune(m, (x, y), epochs=1, **run)
    assert traced_steps(m) == 2         # a second call reuses them
    tl.freeze(m, "backbone")
    tl.fine_tune(m, (x, y), epochs=1, **run)
    assert traced_steps(m) == 4         # another trainable set: its own two


@on_jax
def test_what_jax_does_not_run_yet_is_refused_with_the_engine_to_use(tmp_path):
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(32, 32, 3), seed=0, **SMALL), 2)
    x, y = _data(n=8)
    before = tl.get_weights(m)
    for kwargs, what in [(dict(precision="bf16"), "precision='bf16'"),
                         (dict(parallel=tl.Parallel(replicas=2)), "data-parallel")]:
        with pytest.raises(errors.EngineFeatureError, match="KERAS_BACKEND=tensorflow") as info:
            tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, **kwargs)
        assert what in str(info.value) and "JAX engine" in str(info.value)
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(errors.EngineFeatureError, match="KERAS_BACKEND=tensorflow") as info:
        tl.export(m, tmp_path / "m.onnx", "onnx", verbose=False)
    assert "tl.export" in str(info.value) and not (tmp_path / "m.onnx").exists()


@on_jax
@both_backends
def test_a_parameter_the_loss_does_not_reach_gets_no_update_as_on_torch():
    """A multi-task head without uncertainty weighting never reads its log-variances: torch
    gives them no .grad (TensorFlow's tape: None), so weight decay and momentum leave them; JAX
    differentiates to zeros, and the step must skip them all the same."""
    tasks = {"a": ("bce", 1), "b": ("mse", 2)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 16, 16, 3))
    y = {"a": (rng.random(12) > 0.5).astype(float), "b": rng.normal(size=(12, 2))}
    out = {}
    for backend in ("torch", "keras"):
        m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), dtype="float64",
                             seed=0, widths=(4, 8), batch_norm=False)
        m = tl.replace_heads(m, tasks, seed=1)
        tl.set_weights(m, {**tl.get_weights(m), "task_log_vars": np.array([0.5, -0.25])})
        tl.fine_tune(m, (x, y), epochs=1, batch_size=6, progress=False, feature_cache=False,
                     optimizer=tl.optim.SGD(0.05, momentum=0.9, weight_decay=0.1))
        out[backend] = tl.get_weights(m)
    np.testing.assert_array_equal(out["torch"]["task_log_vars"], [0.5, -0.25])
    np.testing.assert_array_equal(out["keras"]["task_log_vars"], [0.5, -0.25])
    assert parity.worst(out["torch"], out["keras"], floor_rel=1e-6)[0] <= 1e-9


@on_jax
@both_backends
def test_batchnorm_statistics_recomputed_with_changing_momenta_match_torch_on_jax():
    """recompute_batchnorm (model soups) changes BatchNorm's momentum between passes (1/k):
    the jitted pass must read it each time, not keep the first trace's."""
    from tlbridge.soup import recompute_batchnorm
    mt, mk = parity.pair("seed_vgg", dtype="float64", num_outputs=2, input_shape=(32, 32, 3), seed=0, **SMALL)
    x, _ = _data(n=24, seed=6)
    for m in (mt, mk):
        recompute_batchnorm(m, x, batch_size=8)
    diff, at = parity.worst(tl.get_weights(mt), tl.get_weights(mk))
    assert diff <= 1e-10, f"{diff:.2e} at {at}"


@on_jax
def test_this_jax_process_never_imported_tensorflow():
    """Last in this file: the parity, training and trace tests above ran on JAX without it."""
    assert "tensorflow" not in sys.modules
