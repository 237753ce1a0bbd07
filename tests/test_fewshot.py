"""Few-shot learning and label transfer (issue 10): prototype heads in closed form, linear
probes, seeded episodes, few_shot_eval, transfer_labels. Every head is checked against numpy
on the backbone's own features, and against the other backend."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, both_backends

import tlbridge as tl
from tlbridge import errors, fewshot

SHAPE = (16, 16, 3)


def _classes(n_per, k, seed=0):
    """Images whose class sets a pattern (a per-class channel offset) under noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    offsets = rng.normal(0, 1.0, size=(k, 1, 1, 3))
    x = rng.normal(size=(len(y), *SHAPE)) * 0.5 + offsets[y]
    return x, y


def _backbone(backend, seed=0):
    return tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float64",
                            seed=seed, widths=(4, 8))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_prototype_head_scores_like_the_prototypes(backend):
    m = _backbone(backend)
    xs, ys = _classes(4, 3, seed=1)
    xq, _ = _classes(5, 3, seed=2)
    f, fq = tl.features(m, xs), tl.features(m, xq)
    mu = np.stack([f[ys == c].mean(axis=0) for c in range(3)])
    h = tl.prototype_head(m, xs, ys)
    assert h.spec.head.loss == "ce" and h.num_outputs == 3
    d2 = ((fq[:, None, :] - mu[None]) ** 2).sum(-1)
    np.testing.assert_allclose(tl.predict(h, xq), _softmax(-d2), rtol=0, atol=1e-10)
    assert np.array_equal(np.argmax(tl.logits(h, xq), 1), np.argmin(d2, 1))
    c = tl.prototype_head(m, xs, np.eye(3)[ys], metric="cosine", scale=5.0)
    mu_hat = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    np.testing.assert_allclose(tl.logits(c, xq), 5.0 * fq @ mu_hat.T, rtol=1e-10, atol=1e-12)
    # a head like any other: it fine-tunes with CE (prototype init, then fine-tune)
    h2 = tl.fine_tune(tl.freeze(h, "backbone"), (xs, ys), epochs=2, progress=False)
    assert len(h2) == 2


@both_backends
def test_prototype_and_probe_heads_are_the_same_on_both_backends():
    xs, ys = _classes(4, 3, seed=3)
    heads = {}
    for be in ("torch", "keras"):
        m = _backbone(be)
        heads[be, "proto"] = tl.get_weights(tl.prototype_head(m, xs, ys))
        heads[be, "probe"] = tl.get_weights(tl.linear_probe(m, xs, ys, l2=0.1))
    for kind, tol in (("proto", 1e-12), ("probe", 1e-6)):
        for k in ("head.weight", "head.bias"):
            a, b = heads["torch", kind][k], heads["keras", kind][k]
            assert np.abs(a - b).max() <= tol * max(1.0, np.abs(a).max()), (kind, k)


def test_linear_probe_is_sklearns_logistic_regression_on_the_features(backend):
    from sklearn.linear_model import LogisticRegression
    m = _backbone(backend)
    x, y = _classes(6, 3, seed=4)
    f = tl.features(m, x)
    probe = tl.linear_probe(m, x, y, l2=0.05)
    ref = LogisticRegression(C=1.0 / (0.05 * len(f)), tol=1e-10, max_iter=5000).fit(f, y)
    np.testing.assert_allclose(tl.predict(probe, x), ref.predict_proba(f), rtol=0, atol=1e-6)
    # the minimiser: the gradient of mean CE + l2/2 ||W||^2 vanishes
    w = tl.get_weights(probe)
    p = _softmax(f @ w["head.weight"].T + w["head.bias"])
    g = (p - np.eye(3)[y]).T @ f / len(f) + 0.05 * w["head.weight"]
    assert np.abs(g).max() < 1e-5
    # two classes: a CE head with two rows whose softmax is sklearn's sigmoid
    two = y < 2
    p2 = tl.linear_probe(m, x[two], y[two], l2=0.05)
    ref2 = LogisticRegression(C=1.0 / (0.05 * two.sum()), tol=1e-10, max_iter=5000).fit(f[two], y[two])
    np.testing.assert_allclose(tl.predict(p2, x[two]), ref2.predict_proba(f[two]), atol=1e-6)
    b = tl.linear_probe(m, x[two], y[two], l2=0.05, loss="bce")
    assert b.num_outputs == 1 and b.spec.head.loss == "bce"
    np.testing.assert_allclose(tl.predict(b, x[two])[:, 0], ref2.predict_proba(f[two])[:, 1],
                               atol=1e-6)


def test_episodes_are_seeded_disjoint_and_relabelled():
    x, y = _classes(10, 6, seed=5)
    eps = tl.data.episodes((x, y), n_way=3, n_shot=2, n_query=4, n_episodes=20, seed=7)
    again = tl.data.episodes((x, y), n_way=3, n_shot=2, n_query=4, n_episodes=20, seed=7)
    other = tl.data.episodes((x, y), n_way=3, n_shot=2, n_query=4, n_episodes=20, seed=8)
    assert len(eps) == 20
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
               for a, b in zip(eps, again))
    assert any(not np.array_equal(a.support, b.support) for a, b in zip(eps, other))
    for e in eps:
        assert len(e.support) == 6 and len(e.query) == 12 and e.n_way == 3
        assert not set(e.support) & set(e.query)
        for j, c in enumerate(e.classes):    # labels 0..n_way-1 map back to the classes
            assert np.all(y[e.support[e.support_y == j]] == c)
            assert np.all(y[e.query[e.query_y == j]] == c)
    assert len({e.classes for e in eps}) > 1
    sx, sy, qx, qy = eps.arrays(0)
    assert sx.shape == (6, *SHAPE) and np.array_equal(qy, eps[0].query_y)


def test_few_shot_eval_reports_mean_accuracy_and_its_interval(backend):
    m = _backbone(backend)
    x, y = _classes(12, 5, seed=6)
    eps = tl.data.episodes((x, y), n_way=3, n_shot=3, n_query=5, n_episodes=12, seed=0)
    proto = tl.few_shot_eval(m, eps, "prototype")
    accs = np.asarray(proto["per_episode"])
    assert proto["accuracy"] == pytest.approx(accs.mean())
    assert proto["ci95"] == pytest.approx(1.96 * accs.std(ddof=1) / np.sqrt(12))
    assert proto["accuracy"] > 0.6                 # classes are separable; chance is 1/3
    # the same as building each episode's prototype head and scoring its queries
    e = eps[3]
    h = tl.prototype_head(m, x[e.support], e.support_y)
    acc = np.mean(np.argmax(tl.logits(h, x[e.query]), 1) == e.query_y)
    assert proto["per_episode"][3] == pytest.approx(acc)
    # on noisier images, where methods differ, each probe episode recomputed independently:
    # scikit-learn's logistic regression on the support features, scored on the queries
    from sklearn.linear_model import LogisticRegression
    x = x + np.random.default_rng(7).normal(0, 2.0, size=x.shape)
    eps = tl.data.episodes((x, y), n_way=3, n_shot=3, n_query=5, n_episodes=12, seed=0)
    proto = tl.few_shot_eval(m, eps, "prototype")
    probe = tl.few_shot_eval(m, eps, "probe", l2=0.1)
    assert 0 <= probe["accuracy"] <= 1 and probe["episodes"] == 12
    for i in range(12):
        e = eps[i]
        fs, fq = tl.features(m, x[e.support]), tl.features(m, x[e.query])
        clf = LogisticRegression(C=1.0 / (0.1 * len(fs)), tol=1e-10, max_iter=5000)
        want = np.mean(clf.fit(fs, e.support_y).predict(fq) == e.query_y)
        assert probe["per_episode"][i] == pytest.approx(want)
    assert probe["per_episode"] != proto["per_episode"]     # not the prototypes again
    small = tl.data.episodes((x, y), n_way=3, n_shot=3, n_query=5, n_episodes=4, seed=0)
    before = tl.get_weights(m)
    smooth = tl.losses.Loss("ce", 0.2)     # a gradient even where the prototypes are right
    recipe = {"epochs": 5, "loss": smooth, "optimizer": tl.optim.SGD(0.5)}
    ft = tl.few_shot_eval(m, small, "finetune", fine_tune_kwargs=recipe)
    assert ft["episodes"] == 4 and ft["accuracy"] > 0.4     # chance is 1/3
    after = tl.get_weights(m)                       # each episode fine-tunes a copy
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    # episode 1 fine-tuned by hand: the prototype head, backbone frozen, 3 epochs of SGD
    e = small[1]
    h = tl.prototype_head(m, x[e.support], e.support_y)
    tl.freeze(h, "backbone")
    tl.fine_tune(h, (x[e.support], e.support_y), batch_size=32, progress=False, **recipe)
    want = np.mean(np.argmax(tl.logits(h, x[e.query]), 1) == e.query_y)
    assert ft["per_episode"][1] == pytest.approx(want)
    start = tl.get_weights(tl.prototype_head(m, x[e.support], e.support_y))["head.weight"]
    assert np.abs(tl.get_weights(h)["head.weight"] - start).max() > 1e-4     # it trained
    # and the training shows in the queries: not the prototypes' accuracies
    assert ft["per_episode"] != tl.few_shot_eval(m, small, "prototype")["per_episode"]


def test_transfer_labels_keeps_matching_classes_exactly(backend):
    m = tl.replace_head(_backbone(backend), 3, hidden=(5,), seed=1, loss="ce")
    x, _ = _classes(2, 3, seed=9)
    z = tl.logits(m, x)
    t = tl.transfer_labels(m, ["cat", "dog", "bird"], ["dog", "fish", "kitten", "bird"],
                           mapping={"kitten": "cat"}, seed=3)
    assert t.num_outputs == 4 and t.spec.head.loss == "ce" and t.spec.head.hidden == (5,)
    zt = tl.logits(t, x)
    np.testing.assert_array_equal(zt[:, 0], z[:, 1])       # dog
    np.testing.assert_array_equal(zt[:, 2], z[:, 0])       # kitten <- cat
    np.testing.assert_array_equal(zt[:, 3], z[:, 2])       # bird
    assert not np.allclose(zt[:, 1], z[:, 0])              # fish: new
    assert t.report["transferred"] == {"dog": "dog", "kitten": "cat", "bird": "bird"}
    w0, w1 = tl.get_weights(m), tl.get_weights(t)
    assert np.array_equal(w0["head.0.weight"], w1["head.0.weight"])   # hidden layer kept
    again = tl.transfer_labels(m, ["cat", "dog", "bird"], ["dog", "fish", "kitten", "bird"],
                               mapping={"kitten": "cat"}, seed=3)
    np.testing.assert_array_equal(tl.logits(again, x), zt)              # seeded


# ------------------------------------------------------------------------------- bad input
def test_few_shot_bad_input_is_refused_with_what_was_expected(backend):
    m = _backbone(backend)
    x, y = _classes(3, 3, seed=10)
    with pytest.raises(errors.DataError, match=r"none for class\(es\) \[1\]"):
        tl.prototype_head(m, x[y != 1], np.where(y[y != 1] == 2, 2, 0))
    with pytest.raises(errors.DataError, match="Unknown metric"):
        tl.prototype_head(m, x, y, metric="manhattan")
    with pytest.raises(errors.DataError, match="n_shot \\+ n_query = 5"):
        tl.data.episodes((x, y), n_way=2, n_shot=2, n_query=3)
    with pytest.raises(errors.DataError, match="at least n_way=4 classes"):
        tl.data.episodes((x, y), n_way=4, n_shot=1, n_query=1)
    with pytest.raises(errors.DataError, match="n_way as an int >= 2"):
        tl.data.episodes((x, y), n_way=1, n_shot=1, n_query=1)
    with pytest.raises(errors.ArgumentTypeError, match="tl.data.episodes"):
        tl.few_shot_eval(m, [(x, y)])
    with pytest.raises(errors.DataError, match="Unknown method"):
        tl.few_shot_eval(m, tl.data.episodes((x, y), 2, 1, 1, 2), "knn")
    with pytest.raises(errors.DataError, match="l2 as a positive number"):
        tl.linear_probe(m, x, y, l2=0)
    h = tl.replace_head(m, 2, seed=0)
    with pytest.raises(errors.DataError, match=r"unknown source\(s\) \['cow'\]"):
        tl.transfer_labels(h, ["a", "b"], ["a", "c"], mapping={"c": "cow"})
    with pytest.raises(errors.DataError, match=r"unknown target\(s\) \['z'\]"):
        tl.transfer_labels(h, ["a", "b"], ["a", "c"], mapping={"z": "a"})
    with pytest.raises(errors.ShapeError, match="Expected 2 source classes"):
        tl.transfer_labels(h, ["a", "b", "c"], ["a"])
