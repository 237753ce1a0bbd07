"""The parity metric itself: per-tensor errors, structural zeros, the float32 bar and the
float32 judge (flips, medians) cannot hide a real difference."""
import numpy as np
import pytest

import tlbridge as tl
from tlbridge import fp32, parity


def test_errors_are_per_tensor_relative_to_the_truth():
    truth = {"big": np.array([100.0, -50.0]), "small": np.array([1e-3, 2e-3])}
    got = {"big": np.array([100.0, -50.0 + 1e-3]), "small": np.array([1e-3, 2.2e-3])}
    e = parity.rel_errors(got, truth)
    assert e["big"] == pytest.approx(1e-5) and e["small"] == pytest.approx(0.1)   # a global scale would say 4e-6


def test_zero_set_is_fixed_by_the_float64_truth_relative_to_the_largest_gradient():
    g = {"w": np.array([2.0, -1.0]), "b": np.array([3e-13, -1e-13]), "c": np.array([1e-9])}
    assert parity.zero_set(g) == {"b"}
    assert parity.zero_level({"w": np.array([2.0]), "b": np.array([1e-12])}, {"b"}) == pytest.approx(5e-13)


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


def test_relu_flips_count_sign_changes_against_float64():
    truth = np.array([[-1e-8, 2e-8, 1.0, -1.0]])
    assert fp32.flips("relu", np.array([[1e-9, 2e-8, 1.0, -1.0]]), truth) == (1, 4)
    assert fp32.flips("relu", truth.copy(), truth) == (0, 4)
    six = np.array([[6.0 - 1e-6, 1.0]])
    assert fp32.flips("relu6", np.array([[6.0 + 1e-6, 1.0]]), six) == (1, 2)   # the upper kink
    assert fp32.flips("relu", np.array([[6.0 + 1e-6, 1.0]]), six) == (0, 2)
    assert fp32.flips("smooth", np.array([[-1.0]]), np.array([[1.0]])) == (0, 0)


def test_max_pool_flips_count_a_different_choice_but_not_a_tie():
    truth = np.zeros((1, 1, 2, 2))                 # NCHW, torch's layout
    truth[0, 0] = [[1.0, 1.0 + 1e-7], [0.5, 0.0]]
    swapped = truth.copy()
    swapped[0, 0, 0, 0] = 1.0 + 2e-7              # float32 picks another element
    assert fp32.flips("maxpool", swapped, truth, (2, 2, 0)) == (1, 1)
    tie = np.zeros((1, 1, 2, 2))                   # all equal in float64: any choice is right
    moved = tie.copy()
    moved[0, 0, 1, 1] = 1e-9
    assert fp32.flips("maxpool", moved, tie, (2, 2, 0)) == (0, 1)
    # torch's -inf padding: a 3x3/2 pool with padding 1 over 4x4 has 2x2 windows
    assert fp32.flips("maxpool", truth.repeat(2, 2).repeat(2, 3), truth.repeat(2, 2).repeat(2, 3),
                      (3, 2, 1))[1] == 4


def test_flip_test_passes_four_times_torch_and_fails_far_beyond():
    assert fp32.flip_p_value(0, 0) == 1.0
    assert fp32.flip_p_value(7, 2) > 0.5                  # 3.5x torch: within 4x
    assert fp32.flip_p_value(20, 0) > fp32.ALPHA          # 20 flips against none: not yet evidence
    assert fp32.flip_p_value(60, 2) < fp32.ALPHA          # 30x torch
    assert fp32.flip_p_value(200, 20) < fp32.ALPHA        # 10x torch


def _judgement(forward, grads, flips=(0, 0), batches=12):
    """A Judgement whose every batch has these (reference "torch_cl", keras) errors per tensor;
    a value may be a list (one error per batch)."""
    def per(d, i):
        return {k: list(v[i]) if isinstance(v[i], list) else [v[i]] * batches for k, v in d.items()}

    per_batch = {"forward": {"torch_cl": per(forward, 0), "keras": per(forward, 1)},
                 "grads": {"torch_cl": per(grads, 0), "keras": per(grads, 1)}}
    med = {w: {r: {k: float(np.median(v)) for k, v in d.items()} for r, d in runs.items()}
           for w, runs in per_batch.items()}
    return fp32.Judgement(med["forward"], med["grads"], {"torch_cl": flips[0], "keras": flips[1]},
                          100, batches, {}, set(), per_batch)


def test_judgement_bars_per_tensor_with_floors_and_the_ceiling():
    ok = _judgement({"logits": (1e-7, 9e-7), "loss": (1e-6, 3.9e-6)}, {"w": (1e-6, 9e-6), "b": (1e-3, 3.9e-3)})
    assert ok.failures() == []
    assert ok.ratio("grads") == pytest.approx((9 + 3.9) / 2)
    assert len(_judgement({"logits": (1e-7, 1.1e-6)}, {"w": (1e-6, 1e-6)}).failures()) == 1   # forward floor
    assert len(_judgement({"logits": (1e-5, 4.1e-5)}, {"w": (1e-6, 1e-6)}).failures()) == 1   # 4 x torch
    assert len(_judgement({"logits": (1e-7, 1e-7)}, {"w": (1e-7, 1.1e-5)}).failures()) == 1   # gradient floor
    assert len(_judgement({"logits": (1e-7, 1e-7)}, {"w": (5e-3, 1.1e-2)}).failures()) == 1   # ceiling
    assert len(_judgement({"logits": (1e-7, 1e-7)}, {"w": (1e-7, 1e-7)}, (2, 60)).failures()) == 1   # flips


def test_judgement_fails_a_tensor_only_where_the_excess_outlasts_the_batch_to_batch_spread():
    """The sign test: above 4 x torch in every one of 12 batches fails (p = 2.4e-4); in 10 of 12
    (p = 0.019) is not yet evidence, however far the median ratio is past 4."""
    assert fp32.batches_to_fail(12) == 12 and fp32.batches_to_fail(20) == 18
    ref = [1e-5] * 12
    assert fp32.excess_p_value([4.1e-5] * 12, ref, 1e-5) == (12, 2.0 ** -12)
    assert fp32.excess_p_value([3.9e-5] * 12, ref, 1e-5)[0] == 0
    assert fp32.excess_p_value([1e-6] * 12, [1e-8] * 12, 1e-5)[0] == 0      # under the floor
    ten = [5e-5] * 10 + [3e-5] * 2
    assert _judgement({"logits": (1e-7, 1e-7)}, {"w": (ref, ten)}).failures() == []
    assert _judgement({"logits": (1e-7, 1e-7)}, {"w": (ref, ten)}).most_excess() == (10, "grads w")
    # the half-precision leak docs/parity.md names (errors 100 x torch's) fails whatever the spread
    leak = [x * 100 for x in np.geomspace(0.5, 2.0, 12) * 1e-5]
    assert len(_judgement({"logits": (1e-7, 1e-7)}, {"w": (ref, leak)}).failures()) == 1
    # batch by batch against the same batch: Keras 2x torch on each, torch's spread 100x, passes
    spread = list(np.geomspace(1e-6, 1e-4, 12))
    assert _judgement({"logits": (1e-7, 1e-7)}, {"w": (spread, [2 * t for t in spread])}).failures() == []


def _tiny():
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=(8, 8, 3), dtype="float64",
                                         seed=0, widths=(4, 4)), 1, seed=1)
    x, y = parity.batch((8, 8, 3), 4, 1, seed=0)
    return m, x, y


def test_float64_with_its_own_kink_decisions_is_float64():
    """backends/torch/probe.py decided(): the truth float32 gradients are measured against."""
    from tlbridge import registry
    be = registry.load("torch")
    m, x, y = _tiny()
    sites, _ = fp32.activations(m, x, training=False)
    assert {kind for kind, _, _ in sites} == {"relu", "maxpool"}
    _, plain = tl.bce_loss_and_grads(m, x, y)
    with be.decided(m, sites):
        _, same = tl.bce_loss_and_grads(m, x, y)
    assert all(np.array_equal(plain[k], same[k]) for k in plain)


def test_another_runs_kink_decisions_change_the_gradient_as_that_run_took_them():
    """Flipping one ReLU unit's decision (off where float64 keeps it) in the sites handed to
    decided() moves the gradient, and the loss equals the forward pass with that unit zeroed."""
    from tlbridge import registry
    be = registry.load("torch")
    m, x, y = _tiny()
    sites, _ = fp32.activations(m, x, training=False)
    kind, a, pool = sites[0]
    flipped = a.copy()
    flipped.flat[np.argmax(a)] = -1.0                     # the largest unit, now "off"
    _, plain = tl.bce_loss_and_grads(m, x, y)
    with be.decided(m, [(kind, flipped, pool), *sites[1:]]):
        _, moved = tl.bce_loss_and_grads(m, x, y)
    assert max(parity.rel_diff(plain[k], moved[k]) for k in plain) > 1e-3
