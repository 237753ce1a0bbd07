"""Fusion (issue 9): output-space ensembles across backends (tl.fuse: mean, weighted) and
weight-space soups (tl.soup: uniform, greedy; BatchNorm averaged or recomputed). Every fused
number is checked against a numpy computation on the members' own outputs or weights."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import BACKENDS, both_backends, learnable

import tlbridge as tl
from tlbridge import errors, fusion, metrics, parity

SHAPE = (16, 16, 3)


def _data(n=40, seed=0):
    return learnable(n, seed, SHAPE)


def _member(backend, seed, num_outputs=1, batch_norm=False, widths=(4, 8), shape=SHAPE):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=shape, dtype="float64",
                         seed=seed, widths=widths, batch_norm=batch_norm)
    return tl.replace_head(m, num_outputs, seed=seed + 1)


def _members():
    backends = BACKENDS if len(BACKENDS) > 1 else BACKENDS * 2
    return [_member(backends[i % len(backends)], seed) for i, seed in enumerate((0, 10, 20))]


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------- tl.fuse
def test_mean_fusion_is_the_numpy_mean_of_members_logits_or_probabilities():
    members = _members()
    x, _ = _data(12)
    zs = np.stack([tl.logits(m, x) for m in members])
    f = tl.fuse(members)
    np.testing.assert_allclose(tl.logits(f, x), zs.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(tl.predict(f, x), _sig(zs.mean(0)), rtol=0, atol=1e-12)
    fp = tl.fuse(members, space="prob")
    np.testing.assert_allclose(tl.predict(fp, x), _sig(zs).mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_weighted_fusion_fits_simplex_weights_no_worse_than_the_best_member(space):
    members = _members()
    xv, yv = _data(40, seed=1)
    f = tl.fuse(members, "weighted", val=(xv, yv), space=space)
    assert f.weights.min() >= 0 and abs(f.weights.sum() - 1) < 1e-12
    zs = np.stack([tl.logits(m, xv) for m in members])
    member_losses = [tl.evaluate(m, (xv, yv))["loss"] for m in members]
    fused = fusion.combine(zs, f.weights, space)
    np.testing.assert_allclose(tl.logits(f, xv), fused, rtol=0, atol=1e-12)
    loss = metrics.bce_from_logits(fused, yv)
    assert loss <= min(member_losses) + 1e-12
    assert f.report["val_loss"] == pytest.approx(loss, rel=1e-9)
    assert f.report["val_loss_members"] == pytest.approx(member_losses, rel=1e-9)
    assert tl.evaluate(f, (xv, yv)) == pytest.approx(metrics.scores(fused, yv), rel=1e-12)
    # the optimum: no simplex vertex or the centre does better
    for w in [*np.eye(len(members)), np.full(len(members), 1 / len(members))]:
        assert loss <= metrics.bce_from_logits(fusion.combine(zs, w, space), yv) + 1e-12
    _assert_kkt(zs, yv, f.weights, space)


def _assert_kkt(zs, y, w, space, tol=1e-5):
    """The simplex optimum's KKT conditions, with the gradient taken by central differences of
    the fused loss (not the code's own gradient): every weight in use has the same gradient
    lambda, every weight at zero a gradient >= lambda."""
    def loss(v):
        return metrics.bce_from_logits(fusion.combine(zs, v, space), y)
    h = 1e-6
    g = np.array([(loss(w + h * e) - loss(w - h * e)) / (2 * h) for e in np.eye(len(w))])
    used = w > 1e-9
    lam = g[used].mean()
    scale = max(1.0, np.abs(g).max())
    assert np.abs(g[used] - lam).max() <= tol * scale, (w, g)
    assert (g[~used] >= lam - tol * scale).all(), (w, g)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fitted_weights_meet_the_optimality_conditions_inside_the_simplex(space):
    """Two members wrong on different halves of the data: the best fusion mixes them (the
    best single member is not optimal), and the fit finds the mixture."""
    rng = np.random.default_rng(0)
    y = (rng.random((200, 1)) > 0.5).astype(float)
    truth = np.where(y > 0, 2.0, -2.0)
    noise = rng.normal(0, 1.5, size=(2, 200, 1))
    zs = truth[None] + noise
    zs[0, :100] *= -0.3            # member 0 unreliable on the first half, member 1 on the second
    zs[1, 100:] *= -0.3
    w = fusion.fit_weights(zs, y, space)
    assert (w > 0.05).sum() >= 2, w
    _assert_kkt(zs, y, w, space)


def test_given_weights_are_used_as_given():
    members = _members()
    x, _ = _data(8)
    w = [0.5, 0.3, 0.2]
    f = tl.fuse(members, "weighted", weights=w)
    zs = np.stack([tl.logits(m, x) for m in members])
    np.testing.assert_allclose(tl.logits(f, x), np.tensordot(w, zs, axes=1), rtol=0, atol=1e-12)


def test_projection_onto_the_simplex():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=5) * 3
        w = fusion.project_simplex(v)
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
        for _ in range(20):                          # no simplex point is closer to v
            u = rng.dirichlet(np.ones(5))
            assert np.sum((v - w) ** 2) <= np.sum((v - u) ** 2) + 1e-12


def test_fused_model_saves_and_loads_exactly_each_member_on_its_backend(tmp_path):
    members = _members()
    xv, yv = _data(20, seed=2)
    f = tl.fuse(members, "weighted", val=(xv, yv))
    path = tmp_path / "fused.safetensors"
    tl.save(f, path)
    g = tl.load(path)
    assert isinstance(g, tl.FusedModel) and g.backends == f.backends
    np.testing.assert_array_equal(g.weights, f.weights)
    np.testing.assert_array_equal(tl.logits(g, xv), tl.logits(f, xv))
    assert g.report == f.report
    for backend in BACKENDS:
        h = tl.load(path, backend=backend)
        assert h.backends == [backend] * 3
        np.testing.assert_allclose(tl.logits(h, xv), tl.logits(f, xv), rtol=0, atol=1e-10)
        c = tl.convert(f, backend)
        np.testing.assert_allclose(tl.logits(c, xv), tl.logits(f, xv), rtol=0, atol=1e-10)


def test_fusion_bad_input_is_refused_with_what_was_expected():
    members = _members()
    xv, yv = _data(8)
    with pytest.raises(errors.DataError, match="empty list"):
        tl.fuse([])
    with pytest.raises(errors.ArgumentTypeError, match="list of tlbridge models"):
        tl.fuse(members[0])
    with pytest.raises(errors.ShapeError, match="3 output"):
        tl.fuse([_member(BACKENDS[0], 0, num_outputs=3), _member(BACKENDS[0], 1)])
    with pytest.raises(errors.ShapeError, match=r"shape \(16, 16, 3\)"):
        tl.fuse([members[0], _member(BACKENDS[0], 1, shape=(32, 32, 3))])
    with pytest.raises(errors.DataError, match="needs val="):
        tl.fuse(members, "weighted")
    with pytest.raises(errors.DataError, match="simplex"):
        tl.fuse(members, "weighted", weights=[0.7, 0.7, -0.4])
    with pytest.raises(errors.DataError, match="simplex"):
        tl.fuse(members, "weighted", weights=[0.5, 0.3, 0.3])
    with pytest.raises(errors.ShapeError, match="3 weights"):
        tl.fuse(members, "weighted", weights=[0.5, 0.5])
    with pytest.raises(errors.DataError, match="Unknown fusion method 'avg'"):
        tl.fuse(members, "avg")
    with pytest.raises(errors.DataError, match="Unknown fusion space"):
        tl.fuse(members, space="probability")
    broken = _member(BACKENDS[0], 5)
    w = tl.get_weights(broken)
    w["head.weight"] = np.full_like(w["head.weight"], np.finfo(np.float64).max)
    tl.set_weights(broken, w)
    f = tl.fuse([members[0], broken])
    with pytest.raises(errors.DataError, match="member 1 .* NaN/inf"):
        tl.logits(f, xv)


# ------------------------------------------------------------------------------- tl.soup
def _ingredients(batch_norm=False):
    """Three models fine-tuned from one starting point with different data orders; on
    alternating backends when both are installed (canonical weights average across them)."""
    x, y = _data(32, seed=3)
    start = _member(BACKENDS[0], 0, batch_norm=batch_norm)
    out = []
    for i in range(3):
        m = tl.convert(start, BACKENDS[i % len(BACKENDS)]) if len(BACKENDS) > 1 else \
            tl.convert(start, BACKENDS[0])
        tl.fine_tune(m, (x, y), epochs=1, batch_size=8, optimizer=tl.optim.SGD(0.05), seed=i, progress=False)
        out.append(m)
    return out


def test_uniform_soup_is_the_numpy_mean_of_canonical_weights():
    models = _ingredients(batch_norm=True)
    s = tl.soup(models)
    ws = [tl.get_weights(m) for m in models]
    got = tl.get_weights(s)
    for k in got:
        np.testing.assert_allclose(got[k], np.mean([w[k] for w in ws], axis=0), rtol=0,
                                   atol=1e-15)
    assert s.backend == models[0].backend and s.report["ingredients"] == [0, 1, 2]


@pytest.mark.parametrize("bn", ["average", "recompute"])
def test_greedy_soup_is_never_worse_on_val_than_its_first_ingredient(bn):
    models = _ingredients(batch_norm=True)
    val = _data(24, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = tl.soup(models, "greedy", val=val, bn=bn, data=_data(32, seed=3)[0])
    assert not [w for w in caught if "worse than its best" in str(w.message)]
    scores = [tl.evaluate(m, val)["loss"] for m in models]
    first = int(np.argmin(scores))
    assert s.report["ingredients"][0] == first
    assert s.report["val_loss"] <= scores[first] + 1e-12
    assert tl.evaluate(s, val)["loss"] == pytest.approx(s.report["val_loss"], rel=1e-12)
    assert len(s.report["steps"]) == len(models)


def test_recomputed_batchnorm_statistics_are_the_equal_weight_average_over_batches():
    """torch's momentum=None, computed by hand on the torch model, is what recompute gives on
    every backend."""
    x, _ = _data(24, seed=5)
    m = _member(BACKENDS[0], 0, batch_norm=True)
    ref = tl.convert(m, BACKENDS[0])
    from tlbridge.soup import recompute_batchnorm
    recompute_batchnorm(m, x, batch_size=8)
    stats = {k: v for k, v in tl.get_weights(m).items() if "running" in k}
    if "torch" in BACKENDS:
        t = tl.convert(ref, "torch")
        bns = [mod for mod in t.native.modules() if hasattr(mod, "reset_running_stats")]
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = None
        for i in range(0, len(x), 8):
            tl.bce_loss_and_grads(t, x[i:i + 8], np.zeros((8, 1)), training=True)
        want = {k: v for k, v in tl.get_weights(t).items() if "running" in k}
        diff, at = parity.worst(stats, want)
        assert diff <= 1e-12, f"{diff:.2e} at {at}"
    others = {k: v for k, v in tl.get_weights(m).items() if "running" not in k}
    before = {k: v for k, v in tl.get_weights(ref).items() if "running" not in k}
    assert all(np.array_equal(others[k], before[k]) for k in others), "weights changed"


@both_backends
def test_recompute_gives_the_same_statistics_on_both_backends():
    x, _ = _data(24, seed=6)
    mt = _member("torch", 0, batch_norm=True)
    mk = tl.convert(mt, "keras")
    from tlbridge.soup import recompute_batchnorm
    for m in (mt, mk):
        recompute_batchnorm(m, x, batch_size=8)
    diff, at = parity.worst(tl.get_weights(mt), tl.get_weights(mk))
    assert diff <= 1e-10, f"{diff:.2e} at {at}"


def test_soup_bad_input_is_refused_before_any_work():
    a = _member(BACKENDS[0], 0)
    with pytest.raises(errors.DataError, match="empty list"):
        tl.soup([])
    with pytest.raises(errors.WeightsMismatchError, match="one architecture"):
        tl.soup([a, _member(BACKENDS[0], 0, widths=(4, 16))])
    with pytest.raises(errors.WeightsMismatchError, match="one head"):
        tl.soup([a, _member(BACKENDS[0], 0, num_outputs=2)])
    with pytest.raises(errors.DataError, match="needs val="):
        tl.soup([a, a], "greedy")
    with pytest.raises(errors.DataError, match="needs data="):
        tl.soup([a, a], bn="recompute")
    with pytest.raises(errors.DataError, match="Unknown soup method"):
        tl.soup([a, a], "average")


def test_a_soup_worse_than_its_best_ingredient_warns():
    models = _ingredients()
    val = _data(24, seed=4)
    bad = tl.convert(models[0], models[0].backend)
    w = tl.get_weights(bad)
    w["head.bias"] = w["head.bias"] + 50.0                   # an ingredient that ruins the mean
    tl.set_weights(bad, w)
    with pytest.warns(UserWarning, match="worse than its best ingredient"):
        tl.soup([models[0], bad], val=val)


# ------------------------------------------------------------------------------- stacking
def test_stacker_is_an_l2_logistic_regression_on_members_logits():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random((n, 1)) > 0.5).astype(float)
    zs = np.stack([(2 * y - 1) * s + rng.normal(size=(n, 1)) for s in (1.0, 0.5, 0.0)])
    coef, bias = fusion.fit_stacker(zs, y, l2=1e-2)
    ref = LogisticRegression(C=1.0 / (1e-2 * n), tol=1e-12, max_iter=10000).fit(zs[:, :, 0].T, y[:, 0])
    np.testing.assert_allclose(coef[:, 0], ref.coef_[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bias, ref.intercept_, rtol=1e-5, atol=1e-7)
    assert coef[0, 0] > coef[1, 0] > abs(coef[2, 0])          # trusts the informative member


def test_stack_from_given_out_of_fold_outputs_predicts_with_its_coefficients(tmp_path):
    members = _members()
    x, y = _data(30, seed=7)
    zs = np.stack([tl.logits(m, x) for m in members]) + 0.1   # stand-in out-of-fold outputs
    f = tl.fuse(members, "stack", oof=(zs, y))
    assert f.weights.shape == (3, 1) and f.bias.shape == (1,)
    xt, _ = _data(10, seed=8)
    zt = np.stack([tl.logits(m, xt) for m in members])
    want = np.einsum("m,mn->n", f.weights[:, 0], zt[:, :, 0])[:, None] + f.bias
    np.testing.assert_allclose(tl.logits(f, xt), want, rtol=0, atol=1e-12)
    tl.save(f, tmp_path / "stack.safetensors")
    g = tl.load(tmp_path / "stack.safetensors")
    np.testing.assert_array_equal(tl.logits(g, xt), tl.logits(f, xt))
    assert g.method == "stack" and np.array_equal(g.bias, f.bias)


def test_stack_refuses_the_members_own_training_data_unless_forced():
    x, y = _data(32, seed=3)
    xv, yv = _data(24, seed=9)
    members = [_member(BACKENDS[0], s) for s in (0, 10)]
    for m in members:
        tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False)
    with pytest.raises(errors.DataError, match=r"member\(s\) \[0, 1\]'s own training data"):
        tl.fuse(members, "stack", val=(x, y))
    forced = tl.fuse(members, "stack", val=(x, y), force=True)
    assert forced.report["stack_source"] == ("val (forced: members' own training data) (overlap "
                                             "with members' training rows 100.0%, 100.0%)")
    held_out = tl.fuse(members, "stack", val=(xv, yv))           # data they never saw: fine
    assert held_out.report["stack_source"] == ("held-out val (overlap with members' training "
                                               "rows 0.0%, 0.0%)")


def test_the_own_training_data_guard_knows_rows_by_content(tmp_path):
    """A subset, a float32 copy, a model saved and loaded (or converted): the same rows, all
    refused; 1 row in 40 (2.5%) is let through and reported."""
    x, y = _data(40, seed=3)
    members = [_member(BACKENDS[0], s) for s in (0, 10)]
    for m in members:
        tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False)
    tl.save(members[1], tmp_path / "m1.safetensors")
    reloaded = [members[0], tl.load(tmp_path / "m1.safetensors")]
    converted = [tl.convert(m, BACKENDS[-1]) for m in members]
    for group, xs, ys, share in ((members, x[:39], y[:39], "100.0%"),
                                 (members, x.astype(np.float32), y, "100.0%"),
                                 (reloaded, x[5:], y[5:], "100.0%"),
                                 (converted, x[::2], y[::2], "100.0%")):
        with pytest.raises(errors.DataError, match=rf"\({share}, {share} of the val rows are rows"):
            tl.fuse(group, "stack", val=(xs, ys))
    xv, yv = _data(39, seed=9)
    mixed = (np.concatenate([xv, x[:1]]), np.concatenate([yv, y[:1]]))
    f = tl.fuse(members, "stack", val=mixed)
    assert f.report["stack_source"].endswith("training rows 2.5%, 2.5%)")
    from tlbridge import inputs
    assert inputs.overlap(x[:10], members[0].report["trained_rows"]) == 1.0
    assert inputs.overlap(xv, members[0].report["trained_rows"]) == 0.0


def test_stack_with_folds_uses_copies_trained_without_each_sample():
    x, y = _data(24, seed=3)
    kw = dict(epochs=1, batch_size=8, optimizer=tl.optim.SGD(0.05))
    starts = [_member(BACKENDS[0], s) for s in (0, 10)]
    before = [tl.get_weights(m) for m in starts]
    members = [tl.convert(m, m.backend) for m in starts]
    f = tl.fuse(members, "stack", train=(x, y), folds=3, fine_tune_kwargs=kw, seed=4)
    assert f.report["stack_source"] == "out-of-fold (3 folds of 24 samples)"
    # fold 0 of member 1, recomputed by hand
    held = np.array_split(np.random.default_rng(4).permutation(24), 3)[0]
    keep = np.setdiff1d(np.arange(24), held)
    c = tl.convert(starts[1], starts[1].backend)
    tl.fine_tune(c, (x[keep], y[keep]), progress=False, **kw)
    oof = fusion.out_of_fold([starts[1]], x, y, 3, kw, seed=4)
    np.testing.assert_array_equal(oof[0, held], tl.logits(c, x[held]))
    # the members themselves end fine-tuned on all of train, from where they started
    full = tl.convert(starts[0], starts[0].backend)
    tl.fine_tune(full, (x, y), progress=False, **kw)
    a, b = tl.get_weights(full), tl.get_weights(members[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(before[0][k], tl.get_weights(starts[0])[k]) for k in a)


def test_stack_with_a_checkpoint_gives_each_fold_its_own_place(tmp_path):
    """Folds sharing one checkpoint directory would resume each other's runs, trained on the
    rows now held out (in-sample "out-of-fold" logits). Each fold, and each final member,
    checkpoints in its own sub-directory; the stacker equals the one without checkpoints, and a
    second call with resume=True continues each fold's own run to the same result."""
    x, y = _data(24, seed=3)
    kw = dict(epochs=2, batch_size=8, optimizer=tl.optim.SGD(0.05))
    starts = [_member(BACKENDS[0], s) for s in (0, 10)]

    def stacked(**extra):
        members = [tl.convert(m, m.backend) for m in starts]
        f = tl.fuse(members, "stack", train=(x, y), folds=3, fine_tune_kwargs={**kw, **extra},
                    seed=4)
        return f, members
    plain, plain_members = stacked()
    ck, ck_members = stacked(checkpoint=tmp_path)
    np.testing.assert_allclose(ck.weights, plain.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ck.bias, plain.bias, rtol=0, atol=1e-12)
    again, _ = stacked(checkpoint=tl.Checkpoint(tmp_path, resume=True))   # every run complete
    np.testing.assert_allclose(again.weights, plain.weights, rtol=0, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"member{i}_fold{k}" for i in range(2) for k in range(3)] + ["member0_all", "member1_all"])
    a, b = tl.get_weights(plain_members[1]), tl.get_weights(ck_members[1])
    assert all(np.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


def test_stack_bad_input():
    members = _members()
    x, y = _data(12)
    with pytest.raises(errors.DataError, match="exactly one source"):
        tl.fuse(members, "stack")
    with pytest.raises(errors.DataError, match="exactly one source"):
        tl.fuse(members, "stack", val=(x, y), oof=(np.zeros((3, 12, 1)), y))
    with pytest.raises(errors.ShapeError, match=r"\(3, 12, 1\)"):
        tl.fuse(members, "stack", oof=(np.zeros((2, 12, 1)), y))
    with pytest.raises(errors.DataError, match="folds as an int"):
        tl.fuse(members, "stack", train=(x, y), folds=1)
    with pytest.raises(errors.DataError, match="combines logits"):
        tl.fuse(members, "stack", oof=(np.zeros((3, 12, 1)), y), space="prob")
    with pytest.raises(errors.DataError, match="member 1 .* NaN/inf"):
        tl.fuse(members, "stack", oof=(np.stack([np.zeros((12, 1)), np.full((12, 1), np.nan),
                                                  np.zeros((12, 1))]), y))


# ------------------------------------------------------------------------------- per-member input
def test_images_preprocess_lets_each_member_normalise_rgb_images_its_own_way(tmp_path):
    from dataclasses import replace

    from tlbridge.specs import CAFFE
    a, b = _member(BACKENDS[0], 0), _member(BACKENDS[-1], 10)
    b.spec = replace(b.spec, preprocessing=CAFFE)       # e.g. Keras VGG16 weights: BGR, caffe
    images = np.random.default_rng(0).integers(0, 256, size=(10, *SHAPE), dtype=np.uint8)
    y = (images.mean(axis=(1, 2, 3)) > 127).astype(np.float64)[:, None]
    zs = np.stack([tl.logits(a, tl.preprocess(a, images)), tl.logits(b, tl.preprocess(b, images))])
    assert not np.allclose(tl.preprocess(a, images), tl.preprocess(b, images))
    f = tl.fuse([a, b], "weighted", val=(images, y), preprocess="images")
    np.testing.assert_allclose(tl.logits(f, images), fusion.combine(zs, f.weights, "logit"),
                               rtol=0, atol=1e-12)
    assert tl.evaluate(f, (images, y)) == pytest.approx(
        metrics.scores(fusion.combine(zs, f.weights, "logit"), y), rel=1e-12)
    path = tmp_path / "images.safetensors"
    tl.save(f, path)
    g = tl.load(path)
    assert g.preprocess == "images"
    np.testing.assert_array_equal(tl.logits(g, images), tl.logits(f, images))
    with pytest.raises(errors.DataError, match="uint8 0-255"):
        tl.logits(f, images / 255.0)


def test_per_member_callables_fuse_members_with_different_input_shapes():
    small, large = _member(BACKENDS[0], 0), _member(BACKENDS[-1], 10, shape=(24, 24, 3))

    def upsample(x):        # nearest 16 -> 24 (3/2), numpy only
        idx = (np.arange(24) * 16) // 24
        return x[:, idx][:, :, idx]

    prep = [lambda x: x, upsample]
    x, y = _data(30, seed=3)
    zs = np.stack([tl.logits(small, x), tl.logits(large, upsample(x))])
    f = tl.fuse([small, large], "weighted", val=(x, y), preprocess=prep)
    assert f.input_shape is None
    np.testing.assert_allclose(tl.logits(f, x), fusion.combine(zs, f.weights, "logit"),
                               rtol=0, atol=1e-12)
    assert tl.evaluate(f, (x, y))["loss"] == pytest.approx(f.report["val_loss"], rel=1e-12)
    st = tl.fuse([small, large], "stack", train=(x, y), folds=2, preprocess=prep,
                 fine_tune_kwargs={"epochs": 1})
    assert np.all(np.isfinite(tl.logits(st, x)))
    with pytest.raises(errors.DataError, match="callables, which a file cannot hold"):
        tl.save(f, "never.safetensors")
    with pytest.raises(errors.ShapeError, match="preprocess=\\[one callable per member\\]"):
        tl.fuse([small, large])
    with pytest.raises(errors.DataError, match="list of 2 callables"):
        tl.fuse([small, large], preprocess=[upsample])
    with pytest.raises(errors.DataError, match="per-member preprocess"):
        tl.fuse([small, small], "gate", preprocess="images")
