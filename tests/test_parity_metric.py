"""The parity metric itself: per-tensor errors, structural zeros, the float32 bar and the
conditioning certificate cannot hide a real difference."""
import numpy as np
import pytest

import tlbridge as tl
from tlbridge import parity


def test_errors_are_per_tensor_relative_to_the_truth():
    truth = {"big": np.array([100.0, -50.0]), "small": np.array([1e-3, 2e-3])}
    got = {"big": np.array([100.0, -50.0 + 1e-3]), "small": np.array([1e-3, 2.2e-3])}
    e = parity.rel_errors(got, truth)
    assert e["big"] == pytest.approx(1e-5) and e["small"] == pytest.approx(0.1)   # a global scale would say 4e-6


def test_zero_set_is_fixed_by_the_float64_truth_relative_to_the_largest_gradient():
    g = {"w": np.array([2.0, -1.0]), "b": np.array([3e-13, -1e-13]), "c": np.array([1e-9])}
    assert parity.zero_set(g) == {"b"}
    assert parity.zero_level({"w": np.array([2.0]), "b": np.array([1e-12])}, {"b"}) == pytest.approx(5e-13)


def _result(torch, keras):
    return parity.Fp32Result(dict(torch), dict(keras), set(), {})


def test_float32_bar_is_four_times_torch_with_a_floor_and_a_ceiling():
    ok = _result({"a": 1e-6, "b": 1e-3}, {"a": 9e-5, "b": 3.9e-3})
    assert ok.failures() == []
    assert [f[0] for f in _result({"a": 1e-6}, {"a": 1.1e-4}).failures()] == ["a"]       # floor 1e-4
    assert [f[0] for f in _result({"a": 1e-3}, {"a": 4.1e-3}).failures()] == ["a"]       # 4 x torch
    assert [f[0] for f in _result({"a": 5e-3}, {"a": 1.1e-2}).failures()] == ["a"]       # ceiling
    assert [f[0] for f in _result({"a": 2e-2}, {"a": 1e-3}).failures()] == ["a"]         # torch too


def test_a_running_mean_is_measured_against_the_spread_it_averages():
    truth = {"bn.running_mean": np.array([1e-17, -2e-17]), "bn.running_var": np.array([4.0, 1.0])}
    noise = {"bn.running_mean": np.array([3e-9, 0.0]), "bn.running_var": np.array([4.0, 1.0 + 1e-7])}
    e = parity.stat_errors(noise, truth)
    assert e["bn.running_mean"] == pytest.approx(1.5e-9) and e["bn.running_var"] == pytest.approx(2.5e-8)
    real = {"bn.running_mean": np.array([0.5, 0.0]), "bn.running_var": np.array([4.0, 1.0])}
    assert parity.stat_errors(real, truth)["bn.running_mean"] == pytest.approx(0.25)


@pytest.mark.parametrize("name, options, expected", [
    ("mobilenet_v2", {}, 17), ("efficientnet_b0", {}, 16), ("seed_vgg", {"batch_norm": True}, 3),
    ("resnet18", {}, 0), ("convnext_tiny", {}, 0)])
def test_expected_structural_zeros_are_named_by_the_architecture(name, options, expected):
    m = tl.replace_head(tl.load_backbone(name, backend="torch", input_shape=(32, 32, 3), **options), 1)
    zeros = parity.expected_zero_grads(m, training=True)
    assert len(zeros) == expected
    assert all(k.endswith(".bias") for k in zeros)
    assert parity.expected_zero_grads(m, training=False) == set()
    tl.freeze(m, "backbone")
    assert parity.expected_zero_grads(m, training=True) == set()


def test_sensitivity_sees_a_relu_kink_within_the_perturbation():
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=(8, 8, 3), dtype="float64",
                                         seed=0, widths=(4,)), 1, hidden=(4,), seed=1)
    x, y = parity.batch((8, 8, 3), 2, 1, seed=0)
    calm, _ = parity.sensitivity(m, x, y, training=False)
    assert calm < 1e-4
    # put the first hidden unit's pre-activation for sample 0 exactly on its ReLU kink
    w = tl.get_weights(m)
    wkey = next(k for k, v in w.items() if k.startswith("head.") and k.endswith(".weight") and v.shape[0] == 4)
    bkey = wkey[: -len("weight")] + "bias"
    f = tl.features(m, x)
    w[bkey] = w[bkey].copy()
    w[bkey][0] = -(f[0] @ w[wkey][0])
    tl.set_weights(m, w)
    # the random signs push it across the kink or away from it: some of four seeds cross
    kinked = max(parity.sensitivity(m, x, y, training=False, seed=seed)[0] for seed in range(4))
    assert kinked > 1e-3
