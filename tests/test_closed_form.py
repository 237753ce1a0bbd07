"""bce_loss_and_grads against the closed form on a linear head:
dL/dW = (sigmoid(z) - y)^T F / (N K), dL/db = sum(sigmoid(z) - y) / (N K)."""
import numpy as np
import pytest
from helpers import small_model

import tlbridge as tl


@pytest.mark.parametrize("k", [1, 3])
def test_linear_head_gradient_matches_closed_form(backend, k):
    m = small_model(backend, num_outputs=k, dtype="float64")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 32, 32, 3))
    y = (rng.random((6, k)) > 0.5).astype(float)
    loss, grads = tl.bce_loss_and_grads(m, x, y)
    f = tl.features(m, x)
    w = tl.get_weights(m)
    z = f @ w["head.weight"].T + w["head.bias"]
    p = 1.0 / (1.0 + np.exp(-z))
    n_k = z.size
    expected_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(grads["head.weight"], (p - y).T @ f / n_k, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["head.bias"], (p - y).sum(0) / n_k, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(tl.predict(m, x), p, rtol=1e-12)


def test_bce_from_logits_is_stable_for_huge_logits(backend):
    m = small_model(backend, dtype="float64")
    w = tl.get_weights(m)
    w["head.bias"] = np.array([800.0])          # sigmoid saturates: log(1 - p) would be -inf
    tl.set_weights(m, w)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    loss, grads = tl.bce_loss_and_grads(m, x, np.zeros((2, 1)))
    assert np.isfinite(loss) and loss > 700
    assert all(np.all(np.isfinite(g)) for g in grads.values())
