"""Losses beyond BCE (issue 10): softmax cross-entropy (with label smoothing) and MSE, on both
backends. Each backend is held to the numpy formulas in tlbridge/losses.py, and to the other
backend in fp64 (loss and every gradient <= 1e-10, two epochs of fine_tune <= 1e-9)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends, learnable

import tlbridge as tl
from tlbridge import errors, losses, parity

SHAPE = (16, 16, 3)
CASES = [("bce", 3, 0.0), ("ce", 4, 0.0), ("ce", 7, 0.1), ("mse", 2, 0.0)]
IDS = ["bce", "ce", "ce-smoothed", "mse"]


def _model(backend, loss, k, eps=0.0, hidden=(), batch_norm=True, seed=0):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float64",
                         seed=seed, widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_head(m, k, seed=seed + 1, hidden=hidden, loss=loss, label_smoothing=eps)


def _labels(loss, n, k, seed=0):
    rng = np.random.default_rng(seed)
    if loss == "bce":
        return (rng.random((n, k)) > 0.5).astype(np.float64)
    if loss == "ce":
        return rng.integers(0, k, n)
    return rng.normal(size=(n, k))


@pytest.mark.parametrize("loss,k,eps", CASES, ids=IDS)
def test_each_backend_computes_the_numpy_loss_and_its_gradient(backend, loss, k, eps):
    """With a linear head on a frozen backbone, d loss / d head.weight = g^T f exactly, where
    g = d loss / d logits from tlbridge/losses.py and f the backbone features."""
    m = tl.freeze(_model(backend, loss, k, eps), "backbone")
    x, _ = learnable(10, 1, SHAPE)
    y = _labels(loss, 10, k)
    spec = losses.Loss(loss, eps)
    target = losses.prepare_labels(y, 10, k, loss)
    z, f = tl.logits(m, x), tl.features(m, x)
    value, grads = tl.loss_and_grads(m, x, y)
    assert value == pytest.approx(losses.value(z, target, spec), rel=1e-12, abs=0)
    g = losses.grad_logits(z, target, spec)
    np.testing.assert_allclose(grads["head.weight"], g.T @ f, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["head.bias"], g.sum(0), rtol=1e-10, atol=1e-14)
    # the formula against finite differences of the numpy loss itself
    dz = np.zeros_like(z)
    dz[3, 1] = 1e-6
    fd = (losses.value(z + dz, target, spec) - losses.value(z - dz, target, spec)) / 2e-6
    assert g[3, 1] == pytest.approx(fd, rel=1e-6)


@both_backends
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("loss,k,eps", CASES, ids=IDS)
def test_loss_and_every_gradient_match_across_backends_fp64(loss, k, eps, training):
    mt, mk = (_model(be, loss, k, eps, hidden=(6,)) for be in ("torch", "keras"))
    x, _ = learnable(12, 2, SHAPE)
    y = _labels(loss, 12, k, seed=3)
    r = parity.compare(mt, mk, x, y, training=training)
    assert r.n_grads == len(tl.trainable_names(mt))
    assert r.loss <= 1e-10 and r.grads <= 1e-10, (r.loss, r.grads, r.grads_at)
    assert r.zeros == parity.expected_zero_grads(mt, training)
    assert r.stats <= 1e-10


@both_backends
@pytest.mark.parametrize("loss,k,eps", CASES, ids=IDS)
def test_two_epochs_of_fine_tune_match_across_backends_fp64(loss, k, eps):
    x, _ = learnable(24, 4, SHAPE)
    y = _labels(loss, 24, k, seed=5)
    hist, weights = {}, {}
    for be in ("torch", "keras"):
        m = _model(be, loss, k, eps, hidden=(6,))
        hist[be] = tl.fine_tune(m, (x, y), val=(x, y), epochs=2, batch_size=10, optimizer=tl.optim.SGD(0.01, momentum=0.9), progress=False)
        weights[be] = tl.get_weights(m)
    assert parity.worst(weights["torch"], weights["keras"], floor_rel=1e-6)[0] <= 1e-9
    for key in hist["torch"].keys():
        if key != "seconds":
            np.testing.assert_allclose(hist["keras"][key], hist["torch"][key], rtol=1e-9)
    assert set(losses.score_names(k, loss)) <= {k[4:] for k in hist["torch"].keys()
                                                 if k.startswith("val_")}


def test_ce_labels_as_indices_one_hot_or_probabilities_are_one_loss(backend):
    m = _model(backend, "ce", 5)
    x, _ = learnable(8, 6, SHAPE)
    idx = np.array([0, 4, 2, 2, 1, 3, 0, 4])
    a, ga = tl.loss_and_grads(m, x, idx)
    b, gb = tl.loss_and_grads(m, x, idx[:, None])
    c, gc = tl.loss_and_grads(m, x, np.eye(5)[idx])
    assert a == b == c
    assert all(np.array_equal(ga[n], gc[n]) and np.array_equal(ga[n], gb[n]) for n in ga)
    soft = np.full((8, 5), 0.02) + 0.9 * np.eye(5)[idx]
    assert tl.loss_and_grads(m, x, soft)[0] == pytest.approx(
        losses.value(tl.logits(m, x), soft, losses.Loss("ce")), rel=1e-12)


def test_predict_and_evaluate_follow_the_loss(backend):
    x, _ = learnable(16, 7, SHAPE)
    ce = _model(backend, "ce", 7)
    p = tl.predict(ce, x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    y = _labels("ce", 16, 7, seed=8)
    ev = tl.evaluate(ce, (x, y))
    z = tl.logits(ce, x)
    assert set(ev) == {"loss", "accuracy", "top5"}
    assert ev["accuracy"] == np.mean(np.argmax(z, 1) == y)
    top5 = np.argsort(-z, axis=1)[:, :5]
    assert ev["top5"] == np.mean([y[i] in top5[i] for i in range(16)])
    mse = _model(backend, "mse", 2)
    np.testing.assert_array_equal(tl.predict(mse, x), tl.logits(mse, x))
    yr = _labels("mse", 16, 2)
    ev = tl.evaluate(mse, (x, yr))
    assert ev == pytest.approx({"loss": np.mean((tl.logits(mse, x) - yr) ** 2),
                                "mae": np.mean(np.abs(tl.logits(mse, x) - yr))}, rel=1e-12)
    # a per-call loss scores the same logits another way
    bce = tl.evaluate(_model(backend, "bce", 2), (x, (yr > 0).astype(float)), loss="mse")
    assert set(bce) == {"loss", "mae"}


def test_image_folder_index_labels_train_a_ce_head(backend, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png")
    ds = tl.data.image_folder(tmp_path, 16, labels="index", batch_size=4, workers=0)
    assert ds.labels.shape == (12, 1) and set(ds.labels[:, 0]) == {0.0, 1.0, 2.0}
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, seed=0,
                                         widths=(4, 8)), 3, seed=1, loss="ce")
    h = tl.fine_tune(m, ds, val=ds, epochs=1, progress=False)
    assert "val_accuracy" in h.keys() and ds.labels.shape == (12, 1)   # the caller's untouched
    onehot = tl.data.image_folder(tmp_path, 16, batch_size=4, workers=0)
    assert tl.evaluate(m, ds) == tl.evaluate(m, onehot)


def test_loss_is_saved_converted_and_checked_on_resume(tmp_path):
    from helpers import BACKENDS
    m = _model(BACKENDS[0], "ce", 3, 0.2)
    path = tmp_path / "ce.safetensors"
    tl.save(m, path)
    for be in BACKENDS:
        for other in (tl.load(path, backend=be), tl.convert(m, be)):
            assert other.spec.head.loss == "ce" and other.spec.head.label_smoothing == 0.2
    x, _ = learnable(12, 9, SHAPE)
    y = _labels("ce", 12, 3)
    tl.fine_tune(m, (x, y), epochs=1, checkpoint=tmp_path, progress=False)
    before = tl.get_weights(m)
    with pytest.raises(errors.CheckpointError, match="loss"):
        tl.fine_tune(m, (x, y), epochs=2, checkpoint=tl.Checkpoint(tmp_path, resume=True), loss=tl.losses.Loss("ce", 0.0), progress=False)
    assert all(np.array_equal(v, tl.get_weights(m)[k]) for k, v in before.items())


# ------------------------------------------------------------------------------- bad input
def test_bad_labels_and_loss_options_are_refused_before_any_work(backend):
    x, _ = learnable(6, 10, SHAPE)
    ce = _model(backend, "ce", 3)
    before = tl.get_weights(ce)
    with pytest.raises(errors.DataError, match=r"class indices in \[0, 3\)"):
        tl.fine_tune(ce, (x, np.array([0, 1, 2, 3, 1, 0])), progress=False)
    with pytest.raises(errors.DataError, match="summing to 1"):
        tl.fine_tune(ce, (x, np.full((6, 3), 0.5)), progress=False)
    with pytest.raises(errors.DataError, match="summing to 1"):
        tl.loss_and_grads(ce, x, np.full((6, 3), 0.5))
    with pytest.raises(errors.DataError, match="auc"):
        tl.fine_tune(ce, (x, np.zeros(6)), val=(x, np.zeros(6)), progress=False,
                     early_stopping={"monitor": "val_auc"})
    assert all(np.array_equal(v, tl.get_weights(ce)[k]) for k, v in before.items())
    bce = _model(backend, "bce", 1)
    with pytest.raises(errors.DataError, match="loss='ce' for classes"):
        tl.fine_tune(bce, (x, np.array([0, 1, 2, 0, 1, 2])), progress=False)
    with pytest.raises(errors.DataError, match="finite"):
        tl.fine_tune(_model(backend, "mse", 1), (x, np.array([0.0, np.nan, 1, 2, 3, 4])),
                     progress=False)
    with pytest.raises(errors.DataError, match="at least 2 outputs"):
        _model(backend, "ce", 1)
    with pytest.raises(errors.DataError, match="label_smoothing applies to loss='ce'"):
        _model(backend, "bce", 2, eps=0.1)
    with pytest.raises(errors.DataError, match="Unknown loss 'hinge'"):
        tl.fine_tune(bce, (x, np.zeros(6)), loss="hinge", progress=False)
    with pytest.raises(errors.DataError, match=r"\[0, 1\)"):
        tl.fine_tune(ce, (x, np.zeros(6)), loss=tl.losses.Loss("ce", 1.5), progress=False)


def test_bce_loss_and_grads_keeps_its_name_and_meaning(backend):
    m = _model(backend, "ce", 3)
    x, _ = learnable(6, 11, SHAPE)
    y = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    a, ga = tl.bce_loss_and_grads(m, x, y)          # BCE on a CE head's logits, as named
    assert a == pytest.approx(losses.value(tl.logits(m, x), y, losses.Loss()), rel=1e-12)
    assert a != pytest.approx(tl.loss_and_grads(m, x, y)[0], rel=1e-3)   # not the head's CE
