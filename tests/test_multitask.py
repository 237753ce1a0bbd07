"""Multi-task heads on a shared backbone (issue 10): tl.replace_heads, dict labels with missing
entries, task weights and uncertainty weighting. Each backend is held to the numpy formulas in
tlbridge/multitask.py and to the other backend (fp64: losses and every gradient <= 1e-10, two
epochs of SGD <= 1e-9)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, both_backends, learnable

import tlbridge as tl
from tlbridge import errors, multitask, parity

SHAPE = (16, 16, 3)
TASKS = {"digit": ("ce", 4), "odd": ("bce", 1), "size": ("mse", 2)}


def _model(backend, hidden=(), batch_norm=True, seed=0, tasks=TASKS):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float64",
                         seed=seed, widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_heads(m, tasks, hidden=hidden, seed=seed + 1)


def _labels(n, seed=0, missing=True):
    rng = np.random.default_rng(seed)
    y = {"digit": rng.integers(0, 4, n).astype(float), "odd": (rng.random(n) > 0.5).astype(float),
         "size": rng.normal(size=(n, 2))}
    if missing:
        y["digit"][[1, 4]] = -1
        y["odd"][[2]] = np.nan
        y["size"][3, 1] = np.nan
    return y


def _ml(m, task_weights=None):
    return multitask.of(m.spec.head, None if task_weights is None else tl.losses.TaskWeights(task_weights))


def test_heads_have_canonical_names_and_logits_side_by_side(backend):
    m = _model(backend, hidden=(5,))
    names = set(tl.get_weights(m))
    for t in TASKS:
        assert {f"heads.{t}.0.weight", f"heads.{t}.0.bias", f"heads.{t}.3.weight"} <= names
    assert multitask.LOG_VARS in names
    assert not any(n.startswith("head.") for n in names)
    x, _ = learnable(6, 0, SHAPE)
    z = tl.logits(m, x)
    assert z.shape == (6, 7)
    p = tl.predict(m, x)
    assert list(p) == list(TASKS)
    np.testing.assert_allclose(p["digit"].sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(p["size"], z[:, 5:7])
    np.testing.assert_allclose(p["odd"][:, 0], 1 / (1 + np.exp(-z[:, 4])), atol=1e-12)


@pytest.mark.parametrize("weights", [None, {"digit": 1.0, "odd": 0.5}, "uncertainty"],
                         ids=["equal", "weighted", "uncertainty"])
def test_each_backend_computes_the_numpy_multitask_loss(backend, weights):
    m = tl.freeze(_model(backend), "backbone")
    if weights == "uncertainty":
        tl.set_weights(m, {multitask.LOG_VARS: np.array([0.3, -0.2, 0.1])}, strict=False)
    x, _ = learnable(8, 1, SHAPE)
    y = _labels(8)
    ml = _ml(m, weights)
    packed = multitask.pack_labels(y, 8, ml.tasks)
    z, f = tl.logits(m, x), tl.features(m, x)
    s = tl.get_weights(m)[multitask.LOG_VARS]
    value, grads = tl.loss_and_grads(m, x, y, loss=tl.losses.TaskWeights(weights))
    parts = multitask.task_losses(z, packed, ml)
    assert value == pytest.approx(multitask.total(parts, ml, s), rel=1e-12)
    if weights == "uncertainty":    # d/ds_t [exp(-s_t) L_t + s_t] = 1 - exp(-s_t) L_t
        np.testing.assert_allclose(grads[multitask.LOG_VARS], 1 - np.exp(-s) * parts, rtol=1e-10)
        # a batch without any label of a task leaves its s_t alone (no bare +s_t to descend)
        none = {**y, "size": np.full((8, 2), np.nan)}
        v2, g2 = tl.loss_and_grads(m, x, none, loss=tl.losses.TaskWeights(weights))
        p2, h2 = multitask.task_losses_and_presence(z, multitask.pack_labels(none, 8, ml.tasks), ml)
        assert h2.tolist() == [1.0, 1.0, 0.0]
        assert v2 == pytest.approx(multitask.total(p2, ml, s, h2), rel=1e-12)
        assert g2[multitask.LOG_VARS][2] == 0.0
    else:                           # unused by the loss: a zero gradient, and it never moves
        assert np.all(grads[multitask.LOG_VARS] == 0.0)
    # every head's bias gradient: the numpy loss differentiated (finite differences) in its logits
    assert grads["heads.digit.weight"].shape == (4, f.shape[1])
    for name, j, col in [("digit", 0, 0), ("digit", 3, 3), ("odd", 0, 4), ("size", 1, 6)]:
        assert grads[f"heads.{name}.bias"][j] == pytest.approx(
            _column_grad(z, packed, ml, s, col), rel=1e-6, abs=1e-12), (name, j)


def _entry_grad(z, y, ml, s, i, j, eps=1e-6):
    dz = np.zeros_like(z)
    dz[i, j] = eps
    return (multitask.total(multitask.task_losses(z + dz, y, ml), ml, s)
            - multitask.total(multitask.task_losses(z - dz, y, ml), ml, s)) / (2 * eps)


def _column_grad(z, y, ml, s, j):
    """d total / d bias_j = sum_i d total / d z_ij."""
    return sum(_entry_grad(z, y, ml, s, i, j) for i in range(len(z)))


@both_backends
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("weights", [None, {"digit": 2.0, "size": 0.25}, "uncertainty"],
                         ids=["equal", "weighted", "uncertainty"])
def test_multitask_loss_and_every_gradient_match_across_backends_fp64(weights, training):
    mt, mk = (_model(be, hidden=(6,)) for be in ("torch", "keras"))
    for m in (mt, mk):
        tl.set_weights(m, {multitask.LOG_VARS: np.array([0.3, -0.2, 0.1])}, strict=False)
    x, _ = learnable(12, 2, SHAPE)
    y = _labels(12, seed=3)
    lt, gt = tl.loss_and_grads(mt, x, y, training=training, loss=tl.losses.TaskWeights(weights))
    lk, gk = tl.loss_and_grads(mk, x, y, training=training, loss=tl.losses.TaskWeights(weights))
    assert abs(lt - lk) <= 1e-10 * max(1, abs(lt))
    zeros = parity.zero_set(gt)     # plus task_log_vars, which only "uncertainty" uses
    unused = set() if weights == "uncertainty" else {multitask.LOG_VARS}
    assert zeros == parity.expected_zero_grads(mt, training) | unused
    rel = parity.rel_errors(gk, gt, skip=zeros)
    assert max(rel.values()) <= 1e-10, max(rel, key=rel.get)
    assert (np.abs(gt[multitask.LOG_VARS]).max() > 0) == (weights == "uncertainty")


@both_backends
@pytest.mark.parametrize("weights", [None, "uncertainty"], ids=["equal", "uncertainty"])
def test_two_epochs_of_multitask_fine_tune_match_across_backends_fp64(weights):
    x, _ = learnable(24, 4, SHAPE)
    y = _labels(24, seed=5)
    hist, w = {}, {}
    for be in ("torch", "keras"):
        m = _model(be, hidden=(6,))
        hist[be] = tl.fine_tune(m, (x, y), val=(x, y), epochs=2, batch_size=10, optimizer=tl.optim.SGD(0.01), loss=tl.losses.TaskWeights(weights), progress=False)
        w[be] = tl.get_weights(m)
    assert parity.worst(w["torch"], w["keras"], floor_rel=1e-6)[0] <= 1e-9
    keys = hist["torch"].keys()
    for t in TASKS:
        assert f"loss_{t}" in keys and f"val_{t}_loss" in keys
    assert "val_digit_accuracy" in keys and "val_odd_auc" in keys and "val_size_mae" in keys
    if weights == "uncertainty":
        assert "log_var_digit" in keys
        assert not np.allclose(w["torch"][multitask.LOG_VARS], 0)
    else:
        np.testing.assert_array_equal(w["torch"][multitask.LOG_VARS], 0)
    for key in keys:
        if key != "seconds":
            np.testing.assert_allclose(hist["keras"][key], hist["torch"][key], rtol=1e-9,
                                       err_msg=key)


def test_a_missing_label_leaves_its_task_s_loss(backend):
    m = _model(backend)
    x, _ = learnable(6, 6, SHAPE)
    y = _labels(6, missing=False)
    full, _ = tl.loss_and_grads(m, x, y)
    y2 = {k: v.copy() for k, v in y.items()}
    y2["digit"][0] = -1
    ml = _ml(m)
    z = tl.logits(m, x)
    part, _ = tl.loss_and_grads(m, x, y2)           # the backend's value
    without = multitask.task_losses(z[1:], multitask.pack_labels(
        {k: v[1:] for k, v in y.items()}, 5, ml.tasks), ml)    # sample 0 dropped from the data
    with_all = multitask.task_losses(z, multitask.pack_labels(y, 6, ml.tasks), ml)
    # the digit task loses sample 0; the other tasks keep it
    assert part == pytest.approx(without[0] + with_all[1] + with_all[2], rel=1e-12)
    assert part != full


def test_evaluate_save_load_convert_keep_every_head(tmp_path):
    m = _model(BACKENDS[0], hidden=(4,))
    x, _ = learnable(10, 7, SHAPE)
    y = _labels(10, seed=8)
    ev = tl.evaluate(m, (x, y))
    assert {"loss", "digit_loss", "digit_accuracy", "odd_loss", "odd_accuracy", "odd_auc",
            "size_loss", "size_mae"} == set(ev)
    path = tmp_path / "mt.safetensors"
    tl.save(m, path)
    for be in BACKENDS:
        for other in (tl.load(path, backend=be), tl.convert(m, be)):
            assert other.spec.head.tasks == m.spec.head.tasks
            np.testing.assert_allclose(tl.logits(other, x), tl.logits(m, x), rtol=0, atol=1e-12)
            assert tl.evaluate(other, (x, y)) == pytest.approx(ev, rel=1e-10, nan_ok=True)


# ------------------------------------------------------------------------------- bad input
def test_multitask_bad_input_is_refused_before_any_work(backend):
    m = _model(backend)
    x, _ = learnable(6, 9, SHAPE)
    y = _labels(6)
    before = tl.get_weights(m)
    with pytest.raises(errors.DataError, match=r"Unknown task\(s\) \['colour'\]"):
        tl.fine_tune(m, (x, {**y, "colour": np.zeros(6)}), progress=False)
    with pytest.raises(errors.DataError, match=r"none for \['size'\]"):
        tl.fine_tune(m, (x, {k: v for k, v in y.items() if k != "size"}), progress=False)
    with pytest.raises(errors.DataError, match=r"Unknown task\(s\) \['colour'\] in TaskWeights"):
        tl.fine_tune(m, (x, y), loss=tl.losses.TaskWeights({"colour": 1.0}), progress=False)
    with pytest.raises(errors.DataError, match=r"class indices in \[0, 4\)"):
        tl.fine_tune(m, (x, {**y, "digit": np.array([0, 1, 5, 2, 3, 1])}), progress=False)
    with pytest.raises(errors.DataError, match="summing to 1"):
        tl.loss_and_grads(m, x, {**y, "digit": np.full((6, 4), 0.5)})
    with pytest.raises(errors.DataError, match=r"\{0, 1\}"):
        tl.loss_and_grads(m, x, {**y, "odd": np.full(6, 2.0)})
    with pytest.raises(errors.DataError, match="multi-task head"):
        tl.fine_tune(m, (x, np.zeros(6)), progress=False)
    with pytest.raises(errors.DataError, match="TaskWeights"):
        tl.fine_tune(m, (x, y), loss="bce", progress=False)
    with pytest.raises(errors.DataError, match="TaskWeights"):
        tl.loss_and_grads(tl.replace_head(m, 1), x, np.zeros(6), loss=tl.losses.TaskWeights("uncertainty"))
    trainable = tl.trainable_names(m)
    with pytest.raises(errors.DataError, match="unfreeze plan"):
        tl.fine_tune(m, (x, y), loss=tl.losses.TaskWeights("uncertainty"), unfreeze={1: "all"}, progress=False)
    assert all(np.array_equal(v, tl.get_weights(m)[k]) for k, v in before.items())
    assert tl.trainable_names(m) == trainable       # nothing changed, freeze state included
    with pytest.raises(errors.DataError, match="at least 2 outputs"):
        _model(backend, tasks={"digit": ("ce", 1)})
    with pytest.raises(errors.DataError, match="identifiers"):
        _model(backend, tasks={"my task": ("bce", 1)})
    with pytest.raises(errors.DataError, match="bce heads"):
        tl.fuse([m, m])


@both_backends
def test_uncertainty_run_resumes_on_the_other_backend(tmp_path):
    """task_log_vars and its optimizer state are checkpointed under canonical names: 1 epoch
    on torch + resume on Keras equals 2 epochs on Keras (Adam, fp64). Without BatchNorm: a conv
    bias before BatchNorm has an exactly-zero gradient, and Adam divides its rounding noise by
    itself (an O(lr) step of noise, different on each backend)."""
    x, _ = learnable(20, 10, SHAPE)
    y = _labels(20, seed=11)
    kw = dict(epochs=2, batch_size=8, optimizer=tl.optim.Adam(0.01), loss=tl.losses.TaskWeights("uncertainty"), progress=False)
    whole = _model("keras", batch_norm=False)
    tl.fine_tune(whole, (x, y), **kw)
    first = _model("torch", batch_norm=False)
    tl.fine_tune(first, (x, y), **{**kw, "epochs": 1}, checkpoint=tmp_path)
    second = _model("keras", batch_norm=False)
    h = tl.fine_tune(second, (x, y), **kw, checkpoint=tl.Checkpoint(tmp_path, resume=True))
    assert len(h) == 2 and "log_var_odd" in h.keys()
    assert parity.worst(tl.get_weights(second), tl.get_weights(whole), floor_rel=1e-6)[0] <= 1e-10
    with pytest.raises(errors.CheckpointError, match="loss"):
        tl.fine_tune(_model("keras", batch_norm=False), (x, y),
                     **{**kw, "loss": None, "epochs": 3}, checkpoint=tl.Checkpoint(tmp_path, resume=True))
