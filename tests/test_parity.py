"""Both backends in one process: the same weights give the same loss, every gradient and the
same BatchNorm statistics (PARITY.md #1-#5, #8-#10), for every portable backbone."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import parity, zoo

pytestmark = both_backends

TOL, BATCH, SHAPE, SHAPES = parity.TOL, parity.BATCH, parity.SHAPE, parity.SHAPES
PORTABLE = sorted(zoo.PORTABLE)


@functools.lru_cache(maxsize=4)
def _pair(name, dtype, k):
    return parity.pair(name, dtype=dtype, num_outputs=k, input_shape=SHAPES.get(name, SHAPE), seed=0,
                       calibrate=parity.CALIBRATE)


@pytest.mark.parametrize("k", [1, 3], ids=["1out", "3out"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "trainBN"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", PORTABLE)
def test_loss_every_gradient_and_bn_stats_agree(name, dtype, training, frozen, k):
    mt, mk = _pair(name, dtype, k)
    for m in (mt, mk):
        tl.unfreeze(m, "all")
        if frozen:
            tl.freeze(m, "backbone")
    x, y = parity.batch(mt.input_shape, BATCH[dtype], k, seed=1, dtype=dtype)
    own = parity.fp32_error(mt, x, y, training=training) if dtype == "float32" else 0.0
    r = parity.compare(mt, mk, x, y, training=training)
    expected = len(tl.trainable_names(mt))
    assert r.n_grads == expected and expected > 0
    assert r.loss <= TOL[dtype], f"loss differs by {r.loss:.3g}"
    # fp32: the bar is 1e-4, or twice torch's own fp32-vs-fp64 error where fp32 itself is
    # worse than that (deep nets: ReLU kinks flipped by rounding; see README "fp32")
    bar = TOL[dtype] if dtype == "float64" else max(TOL[dtype], 2 * own)
    assert r.grads <= bar, f"gradient {r.grads_at} differs by {r.grads:.3g} (torch fp32 own error {own:.3g})"
    assert r.zero_level <= parity.ZERO[dtype]          # zero-to-rounding tensors: zero on both sides
    assert r.zero_grads <= r.n_grads // 4
    assert r.stats <= TOL[dtype], f"weights/BN statistics differ by {r.stats:.3g} after the pass"


def test_train_mode_pass_stores_pytorch_unbiased_running_variance():
    """PARITY.md #3: the Keras mirror stores n/(n-1) * batch variance, like PyTorch."""
    mt, mk = parity.pair("seed_vgg", dtype="float64", input_shape=SHAPE, widths=(4,), batch_norm=True)
    x, y = parity.batch(SHAPE, 4, 1, seed=2)
    conv = x.transpose(0, 3, 1, 2)
    w = tl.get_weights(mt)
    # the first conv's output, in numpy, to know the batch statistics
    out = _conv3x3(conv, w["backbone.features.0.weight"], w["backbone.features.0.bias"])
    n = out.shape[0] * out.shape[2] * out.shape[3]
    unbiased = out.var(axis=(0, 2, 3)) * n / (n - 1)
    for m in (mt, mk):
        tl.bce_loss_and_grads(m, x, y, training=True)
        got = tl.get_weights(m)["backbone.features.1.running_var"]
        np.testing.assert_allclose(got, 0.9 + 0.1 * unbiased, rtol=1e-12)
        np.testing.assert_allclose(tl.get_weights(m)["backbone.features.1.running_mean"],
                                   0.1 * out.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-15)


def _conv3x3(x, w, b):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


@pytest.mark.parametrize("name", PORTABLE)
def test_convert_round_trip_returns_weights_exactly(name):
    mt, _ = _pair(name, "float64", 1)
    tl.unfreeze(mt, "all")
    tl.freeze(mt, "backbone")
    back = tl.convert(tl.convert(mt, "keras"), "torch")
    w0, w1 = tl.get_weights(mt), tl.get_weights(back)
    assert list(w0) == list(w1)
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert back.frozen == mt.frozen


def test_seeded_random_init_is_identical_on_both_backends():
    mt = tl.load_backbone("resnet18", backend="torch", input_shape=SHAPE, seed=7)
    mk = tl.load_backbone("resnet18", backend="keras", input_shape=SHAPE, seed=7)
    wt, wk = tl.get_weights(mt), tl.get_weights(mk)
    assert list(wt) == list(wk)
    assert all(np.array_equal(wt[k], wk[k]) for k in wt)


def test_saved_model_loads_on_the_other_backend_with_same_predictions(tmp_path):
    mt, _ = _pair("resnet18", "float64", 3)
    tl.save(mt, tmp_path / "m.safetensors")
    mk = tl.load(tmp_path / "m.safetensors", backend="keras")
    x, _ = parity.batch(SHAPE, 3, 3, seed=5)
    assert mk.backend == "keras" and mk.frozen == mt.frozen
    assert parity.rel_diff(tl.predict(mt, x), tl.predict(mk, x)) <= 1e-12
