"""BCE with several outputs is scored as what it is: K independent sigmoids (multi-label), so
accuracy is exact match; per-entry accuracy, macro AUC and top-1 (one-hot rows only) stand
beside it, named (docs/parity.md #18)."""
from __future__ import annotations

import numpy as np
import pytest

import tlbridge as tl
from tlbridge import metrics
from helpers import small_model


def _multilabel(rng, n=60, k=4):
    """Rows with 2 or more positives."""
    y = np.zeros((n, k))
    for i in range(n):
        y[i, rng.choice(k, size=rng.integers(2, k + 1), replace=False)] = 1
    return y


def test_a_model_scored_on_its_own_thresholded_outputs_is_exactly_right():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 4))
    y = (z > 0).astype(float)
    s = metrics.scores(z, y)
    assert s["accuracy"] == 1.0 and s["entry_accuracy"] == 1.0
    assert s["auc"] == 1.0
    assert np.isnan(s["top1"])          # rows with 0 or 2+ positives: argmax means nothing


def test_exact_match_per_entry_and_top1_differ_where_they_should():
    rng = np.random.default_rng(1)
    y = _multilabel(rng)
    z = np.where(y > 0, 2.0, -2.0)
    z[0, np.argmax(y[0] == 0) if (y[0] == 0).any() else 0] *= -1   # one entry wrong in row 0
    s = metrics.scores(z, y)
    assert s["accuracy"] == pytest.approx(59 / 60)
    assert s["entry_accuracy"] == pytest.approx(1 - 1 / 240)
    onehot = np.eye(10)[rng.integers(0, 10, size=50)]
    zeros = np.full((50, 10), -3.0)                 # predicts every output negative
    s = metrics.scores(zeros, onehot)
    assert s["accuracy"] == 0.0 and s["entry_accuracy"] == pytest.approx(0.9)
    assert s["top1"] == pytest.approx(float(np.mean(np.argmax(zeros, 1) == np.argmax(onehot, 1))))
    right = np.where(onehot > 0, 1.0, -1.0) + rng.normal(0, 0.1, size=onehot.shape)
    assert metrics.scores(right, onehot)["top1"] == 1.0


def test_macro_auc_is_the_mean_of_each_outputs_auc():
    rng = np.random.default_rng(2)
    y = _multilabel(rng, 40, 3)
    y[:, 2] = rng.integers(0, 2, size=40)
    z = rng.normal(size=(40, 3)) + y
    want = np.mean([metrics.roc_auc(z[:, k], y[:, k]) for k in range(3)])
    assert metrics.scores(z, y)["auc"] == pytest.approx(want)
    assert metrics.score_names(3) == list(metrics.scores(z, y))


def test_evaluate_and_fine_tune_report_the_multilabel_scores(backend):
    rng = np.random.default_rng(3)
    m = small_model(backend, num_outputs=4, dtype="float64", input_shape=(16, 16, 3), widths=(4,))
    x = rng.normal(size=(24, 16, 16, 3))
    y = _multilabel(rng, 24, 4)
    z = tl.logits(m, x)
    own = (z > 0).astype(float)
    assert tl.evaluate(m, (x, own))["accuracy"] == 1.0
    h = tl.fine_tune(m, (x, y), val=(x, y), epochs=1, batch_size=8, progress=False,
                     early_stopping=tl.EarlyStopping("val_top1", patience=1, restore_best=False))
    assert {"val_accuracy", "val_entry_accuracy", "val_auc", "val_top1"} <= set(h.keys())
    assert np.isnan(h["val_top1"][0])
