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


def _run_jax(code: str, tmp_path, **extra_env) -> dict:
    """`code` in a fresh process on Keras' JAX engine; it prints one JSON line last."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TLBRIDGE_BACKEND": "keras", **extra_env}
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


# -- data-parallel replicas on JAX (subprocesses: the device count is fixed when JAX starts) --
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")
_TWO_VS_ONE = """
    import json, sys
    sys.path.insert(0, %r)
    import numpy as np
    import tlbridge as tl
    import dp_train                             # tests/workers: test_distributed.py's runs
    from tlbridge.backends.keras.engine_jax import traced_steps
    import jax
    run = %r
    m2, h2 = dp_train.train("keras", run, replicas=2)
    traces = traced_steps(m2)
    m1, h1 = dp_train.train("keras", run, replicas=None)
    w2, w1 = tl.get_weights(m2), tl.get_weights(m1)
    start = tl.get_weights(dp_train.model("keras", "multi" in run))
    print(json.dumps({"devices": len(jax.devices("cpu")), "traces": traces,
                      "diff": max(float(np.max(np.abs(w2[k] - w1[k]))) for k in w1),
                      "trained": max(float(np.max(np.abs(w1[k] - start[k]))) for k in w1),
                      "loss2": dp_train.losses_of(h2), "loss1": dp_train.losses_of(h1),
                      "rows": [r for *_, r in dp_train.rows_of(h2)]}))
"""


@needs_jax
@not_on_jax
@pytest.mark.parametrize("run", ["sgd:global", "sgd:global:multi"])
def test_two_jax_cpu_replicas_train_what_one_device_trains(tmp_path, run):
    """TLBRIDGE_CPU_REPLICAS=2 gives JAX two CPU devices; replicas=2 with bn_sync='global' then
    equals one device in float64 (37 images in batches of 10: the short last batch splits 4/3,
    padded and masked, so jit traces twice in all, not once per epoch); multi-task: missing
    labels and task means over the global batch."""
    r = _run_jax(_TWO_VS_ONE % (WORKERS, run), tmp_path, TLBRIDGE_CPU_REPLICAS="2")
    assert r["devices"] == 2 and r["traces"] == 2
    assert r["diff"] <= 1e-12 and r["trained"] > 1e-3, r
    np.testing.assert_allclose(r["loss2"], r["loss1"], rtol=0, atol=1e-12)
    assert r["rows"] == [[5, 5]] * 3 + [[4, 3]] + [[5, 5]] * 3 + [[4, 3]]


@needs_jax
@not_on_jax
def test_local_batchnorm_on_jax_replicas_is_what_tensorflow_replicas_train(tmp_path):
    """bn_sync='local': each share normalised on its own rows (4/3 in the short batch), replica
    0's running statistics kept; the same run on 2 TensorFlow replicas gives the same weights
    (which are not one process's: tests/test_distributed.py)."""
    from tlbridge import weights as wio
    r = _run_jax(f"""
        import json, sys
        sys.path.insert(0, {WORKERS!r})
        from tlbridge.backends.keras import cpu_replicas
        cpu_replicas(2)
        import tlbridge as tl
        from tlbridge import weights as wio
        import dp_train
        m, h = dp_train.train("keras", "sgd:local:k2", replicas=2)
        wio.save_file("local.safetensors", tl.get_weights(m), {{}})
        print(json.dumps({{"loss": dp_train.losses_of(h)}}))
    """, tmp_path)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, os.path.join(WORKERS, "dp_train.py"), "keras",
                          str(tmp_path / "tf"), "sgd:local:k2", "--replicas", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jx, _ = wio.load_file(tmp_path / "local.safetensors")
    tf_w, meta = wio.load_file(tmp_path / "tf.0.safetensors")
    assert set(jx) == set(tf_w)
    assert max(float(np.max(np.abs(jx[k] - tf_w[k]))) for k in jx) <= 1e-12   # measured 4e-16
    np.testing.assert_allclose(r["loss"], eval(meta["loss"]), rtol=1e-10)


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
    with pytest.raises(errors.EngineFeatureError, match="KERAS_BACKEND=tensorflow") as info:
        tl.export(m, tmp_path / "m.onnx", "onnx", verbose=False)
    assert "tl.export" in str(info.value) and not (tmp_path / "m.onnx").exists()


@on_jax
def test_more_jax_replicas_than_devices_and_late_cpu_replicas_are_refused():
    """This process started JAX with one CPU device: replicas=2 names cpu_replicas(2) and
    TLBRIDGE_CPU_REPLICAS; cpu_replicas now is too late, and says so."""
    from tlbridge.backends.keras import cpu_replicas
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(32, 32, 3), seed=0, **SMALL), 2)
    x, y = _data(n=8)
    with pytest.raises(errors.DistributedError, match=r"replicas=2 .*cpu_replicas\(2\).*TLBRIDGE_CPU_REPLICAS"):
        tl.fine_tune(m, (x, y), epochs=1, progress=False, parallel=tl.Parallel(replicas=2))
    with pytest.raises(errors.DistributedError, match="before JAX starts its devices"):
        cpu_replicas(3)
    assert cpu_replicas(1) == [str(d) for d in __import__("jax").devices("cpu")]


@on_jax
def test_bf16_on_jax_computes_in_bf16_and_keeps_float32_weights_and_statistics():
    """Mixed precision as on TensorFlow (Keras' mixed_bfloat16 policy on every layer but
    BatchNorm while the step is traced): the first step's loss, from the same weights, is off
    the float32 one by bf16 rounding (8-bit mantissa), not float32's; weights and BatchNorm
    statistics stay float32 (tests/test_precision.py checks that it learns)."""
    x, y = _data(n=16)
    first, out = {}, {}
    for precision in ("fp32", "bf16"):
        m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(32, 32, 3),
                                             seed=0, **SMALL), 2, seed=1)
        seen = []
        tl.fine_tune(m, (x.astype("float32"), y.astype("float32")), epochs=2, batch_size=8,
                     progress=False, feature_cache=False, precision=precision,
                     callbacks=[lambda ev, info: seen.append(info["loss"]) if ev == "step" else None])
        first[precision], out[precision] = seen[0], tl.get_weights(m)
    assert {str(v.dtype) for v in out["bf16"].values()} == {"float32"}
    stats = [k for k in out["bf16"] if k.endswith("running_var")]
    assert stats and all(np.all(np.isfinite(out["bf16"][k])) for k in stats)
    rel = abs(first["bf16"] - first["fp32"]) / first["fp32"]
    assert 1e-4 < rel < 2e-2, rel
    assert 0 < parity.worst(out["bf16"], out["fp32"], floor_rel=1e-3)[0] < 0.1


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
@pytest.mark.parametrize("case", ["repeated", "offset30"])
def test_float32_batchnorm_on_jax_is_as_accurate_as_torchs(case):
    """float32 BatchNorm sums in float32 on JAX (float64 sums cost a MobileNetV2 step 3-5%):
    XLA's reductions keep every gradient and running statistic within max(1e-6, 2 x torch's
    error) against float64, on repeated pixels and on channels whose mean dwarfs their spread."""
    import jax
    import jax.numpy as jnp
    from test_batchnorm_backward import _err, _torch_grads, bn_case

    from tlbridge.backends.keras.network import TorchBatchNorm
    x, r, gamma, beta = bn_case(case)
    bn = TorchBatchNorm(1e-5, 0.1, dtype="float32")
    bn.build(x.shape)
    bn.gamma.assign(gamma.astype(np.float32))
    bn.beta.assign(beta.astype(np.float32))
    params = [v.value for v in bn.trainable_variables]
    stats = [v.value for v in bn.non_trainable_variables]

    def loss(x, params):
        y, new_stats = bn.stateless_call(params, stats, x, training=True)
        return jnp.sum(y * r.astype(np.float32)), new_stats

    (_, new_stats), (gx, (gg, gb)) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(x, jnp.float32), params)
    k32 = {"x": gx, "gamma": gg, "beta": gb, "running_mean": new_stats[0],
           "running_var": new_stats[1]}
    truth = _torch_grads(x, r, gamma, beta, "float64")
    t32 = _torch_grads(x, r, gamma, beta, "float32")
    for k in truth:
        et, ek = _err(t32[k], truth[k]), _err(np.asarray(k32[k]), truth[k])
        assert ek <= max(1e-6, 2 * et), f"{k}: keras {ek:.2g} vs torch {et:.2g} against float64"


@on_jax
def test_float32_batchnorm_on_jax_sums_in_float32_and_float64_in_float64():
    """The test above holds with float32 sums, and float64 ones cost 4% of a MobileNetV2 step
    on JAX (docs/speed.md): no float64 in a float32 train-mode pass and its gradient."""
    import jax
    import jax.numpy as jnp

    from tlbridge.backends.keras.network import TorchBatchNorm

    def jaxpr_of(dtype):
        bn = TorchBatchNorm(1e-5, 0.1, dtype=dtype)
        bn.build((4, 3, 3, 8))
        params = [v.value for v in bn.trainable_variables]
        stats = [v.value for v in bn.non_trainable_variables]

        def loss(x, params):
            return jnp.sum(bn.stateless_call(params, stats, x, training=True)[0] ** 2)
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.ones((4, 3, 3, 8), dtype), params))

    assert "f64" not in jaxpr_of("float32")
    assert "f64" in jaxpr_of("float64") and "f32" not in jaxpr_of("float64")


@on_jax
def test_this_jax_process_never_imported_tensorflow():
    """Last in this file: the parity, training and trace tests above ran on JAX without it."""
    assert "tensorflow" not in sys.modules
