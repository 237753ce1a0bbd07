"""Models with a declared input signature beyond one image array: the two-input text model
token_bag (input_ids + attention_mask, int64) goes through everything images go through —
features, logits, every gradient, fine_tune, the feature cache, evaluate, checkpoints and
resume across backends (data-parallel: tests/test_distributed.py run 6) — with fp64 parity
<= 1e-10 between the backends, as for images."""
from __future__ import annotations

import numpy as np
import pytest

import tlbridge as tl
from tlbridge import errors, parity
from helpers import both_backends

L, V = 9, 30


def _model(backend, dtype="float64", seed=0):
    m = tl.load_backbone("token_bag", backend=backend, input_shape=(L,), dtype=dtype, seed=seed,
                         vocab_size=V, dim=8)
    return tl.replace_head(m, 1, hidden=(6,), seed=seed + 1)


def _data(n=24, seed=0, length=L):
    """Token ids with right padding of varying length, and a learnable label (is token 1
    among the real tokens?)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n, length))
    mask = (np.arange(length)[None, :] < rng.integers(2, length + 1, size=(n, 1))).astype(np.int64)
    y = ((ids == 1) & (mask == 1)).any(axis=1).astype(float)[:, None]
    return {"input_ids": ids, "attention_mask": mask}, y


def test_the_signature_is_declared(backend):
    m = _model(backend)
    assert [(s.name, s.shape, s.dtype, s.kind) for s in m.inputs] == [
        ("input_ids", (None,), "int64", "tokens"), ("attention_mask", (None,), "int64", "mask")]
    image = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3))
    assert [(s.name, s.shape, s.kind) for s in image.inputs] == [("images", (16, 16, 3), "image")]


@both_backends
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_loss_and_every_gradient_match_across_backends_fp64(training):
    x, y = _data()
    mt, mk = _model("torch"), _model("keras")
    assert parity.worst(tl.get_weights(mt), tl.get_weights(mk))[0] == 0.0   # one seed, one init
    lt, gt = tl.loss_and_grads(mt, x, y, training=training)
    lk, gk = tl.loss_and_grads(mk, x, y, training=training)
    assert abs(lt - lk) <= 1e-10 * max(1.0, abs(lt))
    assert sorted(gt) == sorted(gk) == sorted(tl.trainable_names(mt))
    diff, at = parity.worst(gt, gk)
    assert diff <= 1e-10, f"{at}: {diff:.2e}"
    assert np.abs(gt["backbone.embeddings.weight"]).max() > 0     # the embedding is trained
    np.testing.assert_allclose(tl.features(mt, x), tl.features(mk, x), rtol=0, atol=1e-13)


def test_padding_changes_neither_features_nor_gradients(backend):
    x, y = _data()
    m = _model(backend)
    pad = {"input_ids": np.concatenate([x["input_ids"], np.full((24, 4), 7)], axis=1),
           "attention_mask": np.concatenate([x["attention_mask"], np.zeros((24, 4), np.int64)], 1)}
    np.testing.assert_allclose(tl.features(m, pad), tl.features(m, x), rtol=0, atol=1e-15)
    _, g = tl.loss_and_grads(m, x, y)
    _, gp = tl.loss_and_grads(m, pad, y)
    assert parity.worst(g, gp)[0] <= 1e-14


@both_backends
def test_two_epochs_of_fine_tune_match_across_backends_fp64():
    x, y = _data(30)
    xv, yv = _data(10, seed=1)
    hist, weights, scores = {}, {}, {}
    for be in ("torch", "keras"):
        m = _model(be)
        hist[be] = tl.fine_tune(m, (x, y), val=(xv, yv), epochs=2, batch_size=8,
                                optimizer=tl.optim.SGD(0.1, momentum=0.9), progress=False)
        weights[be], scores[be] = tl.get_weights(m), tl.evaluate(m, (xv, yv))
    assert parity.worst(weights["torch"], weights["keras"])[0] <= 1e-10
    for key in ("loss", "val_loss", "val_accuracy", "val_auc"):
        np.testing.assert_allclose(hist["torch"][key], hist["keras"][key], rtol=1e-10)
    assert scores["torch"] == pytest.approx(scores["keras"], rel=1e-10)
    assert parity.worst(weights["torch"], tl.get_weights(_model("torch")))[0] > 1e-3


def test_feature_cache_equals_the_full_forward(backend):
    x, y = _data(20)
    results = []
    for cache in (False, True):
        m = tl.freeze(_model(backend), "backbone")
        h = tl.fine_tune(m, tl.data.arrays(x, y, batch_size=6, seed=2), epochs=2,
                         optimizer=tl.optim.Adam(1e-2), progress=False, feature_cache=cache)
        assert h["cached"] == [cache, cache]
        results.append(tl.get_weights(m))
    assert parity.worst(*results)[0] <= 1e-12


@both_backends
def test_a_checkpoint_from_torch_resumes_on_keras_as_one_run(tmp_path):
    x, y = _data(20)
    run = dict(batch_size=8, optimizer=tl.optim.Adam(1e-2), seed=3, progress=False)
    whole = _model("keras")
    tl.fine_tune(whole, (x, y), epochs=2, **run)
    first = _model("torch")
    tl.fine_tune(first, (x, y), epochs=1, checkpoint=tmp_path, **run)
    second = _model("keras")
    h = tl.fine_tune(second, (x, y), epochs=2, checkpoint=tl.Checkpoint(tmp_path, resume=True),
                     **run)
    assert h["epoch"] == [0, 1]
    assert parity.worst(tl.get_weights(second), tl.get_weights(whole))[0] <= 1e-10


def test_datasets_of_named_inputs_keep_token_ids_integer(backend):
    x, y = _data(10)
    ds = tl.data.arrays(x, y, batch_size=4, seed=0, dtype="float64")
    xb, yb = next(iter(ds.epoch(0)))
    assert set(xb) == {"input_ids", "attention_mask"} and xb["input_ids"].dtype == np.int64
    assert len(yb) == 4 and yb.dtype == np.float64
    order, w = ds.plan(0)[0][:4], xb["input_ids"].shape[1]
    np.testing.assert_array_equal(xb["input_ids"], x["input_ids"][order][:, :w])
    assert not x["attention_mask"][order][:, w:].any()      # only columns of padding dropped
    whole, _ = ds.as_arrays()
    w = whole["attention_mask"].shape[1]
    np.testing.assert_array_equal(whole["attention_mask"], x["attention_mask"][:, :w])
    real = whole["attention_mask"] == 1
    np.testing.assert_array_equal(whole["input_ids"][real], x["input_ids"][:, :w][real])
    with pytest.raises(errors.DataError, match="augment=None for inputs other than one image"):
        tl.data.arrays(x, y, augment=True)
    with pytest.raises(errors.ShapeError, match="same number of samples"):
        tl.data.arrays({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:5]}, y)


def test_wrong_inputs_are_refused_before_any_work(backend):
    x, y = _data(8)
    m = _model(backend)
    before = tl.get_weights(m)
    cases = [
        (x["input_ids"], errors.DataError, r"dict of the model's inputs \['input_ids', "),
        ({"input_ids": x["input_ids"]}, errors.DataError, r"missing \['attention_mask'\]"),
        ({**x, "input_ids": x["input_ids"] + 0.5}, errors.DataError, "as integers"),
        ({**x, "input_ids": x["input_ids"] + V}, errors.DataError, rf"token ids in \[0, {V}\)"),
        ({**x, "attention_mask": x["attention_mask"] * 2}, errors.DataError, r"in \{0, 1\}"),
        ({**x, "attention_mask": np.zeros_like(x["attention_mask"])}, errors.DataError,
         "at least one real token"),
    ]
    for bad, err, match in cases:
        with pytest.raises(err, match=match):
            tl.logits(m, bad)
    with pytest.raises(errors.DataError, match=r"inputs \['input_ids', 'attention_mask'\] \(the "
                                               r"model's\); received one array of per-sample"):
        tl.fine_tune(m, (np.zeros((8, 16, 16, 3)), y), progress=False)
    with pytest.raises(errors.DataError, match=r"received \['input_ids', 'mask'\]"):
        tl.fine_tune(m, ({"input_ids": x["input_ids"], "mask": x["attention_mask"]}, y),
                     progress=False)
    assert parity.worst(before, tl.get_weights(m))[0] == 0.0
    with pytest.raises(errors.ShapeError, match=r"input_shape as \(max_length,\)"):
        tl.load_backbone("token_bag", backend=backend, input_shape=(16, 16, 3))


def test_models_of_named_inputs_fuse_by_mean_and_refuse_a_gate(backend):
    x, y = _data(12)
    a, b = _model(backend, seed=0), _model(backend, seed=5)
    f = tl.fuse([a, b], "mean")
    np.testing.assert_allclose(tl.logits(f, x), (tl.logits(a, x) + tl.logits(b, x)) / 2,
                               rtol=0, atol=1e-12)
    with pytest.raises(errors.DataError, match="image members for a gated fusion"):
        tl.fuse([a, b], "gate")
