"""The parity metric itself: the zero-to-rounding rule cannot hide a real difference."""
import numpy as np
import pytest

from tlbridge import parity

BN = {"bn"}


def _grads(bias, bias_k=None, weight=1.0):
    a = {"bn.weight": np.array([weight, -weight]), "bn.bias": np.array(bias), "conv.weight": np.ones(3)}
    b = {k: v.copy() for k, v in a.items()}
    if bias_k is not None:
        b["bn.bias"] = np.array(bias_k)
    return a, b


def test_a_real_bias_difference_is_measured_relatively():
    a, b = _grads([0.5, 0.2], [0.5, 0.21])
    rel, at, level, n = parity.split_zeros(a, b, 1e-12, BN)
    assert n == 0 and at == "bn.bias" and rel == pytest.approx(0.02)


def test_noise_on_a_structurally_zero_bias_is_checked_as_zero_on_both_sides():
    a, b = _grads([3e-17, -1e-17], [-2e-17, 4e-17])
    rel, at, level, n = parity.split_zeros(a, b, 1e-12, BN)
    assert n == 1 and rel == 0.0 and level == pytest.approx(4e-17)


def test_a_bias_that_is_zero_on_one_backend_only_is_a_difference():
    a, b = _grads([1e-17, 0.0], [0.3, 0.0])
    rel, at, _, n = parity.split_zeros(a, b, 1e-12, BN)
    assert n == 0 and rel > 1e15 and at == "bn.bias"


def test_only_batchnorm_layers_qualify():
    a, b = _grads([1e-17, 0.0], [-1e-17, 0.0])
    rel, at, _, n = parity.split_zeros(a, b, 1e-12, set())
    assert n == 0 and rel == pytest.approx(2.0)


def test_weight_floor_applies_only_below_the_floor():
    a = {"w": np.array([1.0, -2.0]), "tiny": np.array([1e-18])}
    b = {"w": np.array([1.0, -2.0 + 2e-12]), "tiny": np.array([-1e-19])}
    diff, at = parity.worst(a, b, floor_rel=1e-6)
    assert at == "w" and diff == pytest.approx(1e-12, rel=1e-3)
    assert parity.worst(a, b)[0] == pytest.approx(1.1)     # without the floor: noise/noise
