"""Adaptive fusion (issue 9): tl.fuse(..., method="gate"). The gated model is native on each
backend; it is held to the numpy formula in tlbridge/gate.py, to the mean ensemble before
training, and to the other backend (fp64 loss and gradients <= 1e-10, fine_tune <= 1e-9)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import BACKENDS, both_backends, learnable

import tlbridge as tl
from tlbridge import errors, fusion, gate, metrics, parity

SHAPE = (16, 16, 3)


def _member(backend, seed, num_outputs=1, batch_norm=False, dropout=0.0):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float64",
                         seed=seed, widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_head(m, num_outputs, seed=seed + 1, dropout=dropout)


def _members(num_outputs=1):
    """Three that differ: seed, BatchNorm, dropout in the head, and backend where both exist."""
    backends = BACKENDS if len(BACKENDS) > 1 else BACKENDS * 2
    return [_member(backends[0], 0, num_outputs),
            _member(backends[1], 10, num_outputs, batch_norm=True),
            _member(backends[0], 20, num_outputs, dropout=0.5)]


def _random_gate(f, seed=5):
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(0.0, 2.0 / np.sqrt(v.shape[-1]) if v.ndim == 2 else 0.5, size=v.shape)
         for k, v in gate.head_weights(f.gate).items()}
    tl.set_weights(f.gate, w, strict=False)
    return w


def _labels(x, k=1):
    return (x.mean(axis=(1, 2, 3))[:, None] + np.arange(k) * 0.01 > 0).astype(np.float64)


@pytest.mark.parametrize("gate_on", ["logits", "features", "model"])
def test_untrained_gate_is_the_mean_and_trained_gate_follows_the_numpy_formula(backend, gate_on):
    members = _members(num_outputs=2)
    on = _member(backend, 30) if gate_on == "model" else gate_on
    f = tl.fuse(members, "gate", gate_on=on, hidden=(6,), backend=backend)
    assert f.backend == backend and all(m.backend == backend for m in f.members)
    x, _ = learnable(9, 0, SHAPE)
    zs = np.stack([tl.logits(m, x) for m in members])
    np.testing.assert_allclose(tl.logits(f, x), zs.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fusion.gate_weights(f, x), 1 / 3, rtol=0, atol=1e-15)
    w = _random_gate(f)
    gi = f.gate.state["gate"]
    u = tl.features(f.gate, x)
    np.testing.assert_allclose(u[:, gi["gate_dim"]:].reshape(9, 3, 2), zs.transpose(1, 0, 2),
                               rtol=0, atol=1e-12)       # u = [gate input | member logits]
    weights, ref = gate.forward(u, w, gi["gate_dim"], 3, 2, (6,))
    np.testing.assert_allclose(tl.logits(f, x), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tl.logits(f, x), np.einsum("nm,mnk->nk", weights, zs),
                               rtol=0, atol=1e-12)
    assert np.ptp(weights, axis=0).max() > 0.01          # the weights do vary per input
    assert sorted(tl.trainable_names(f.gate)) == sorted(gate.head_weights(f.gate))


@both_backends
@pytest.mark.parametrize("gate_on,hidden", [("logits", ()), ("features", (5,)), ("model", (4, 3))])
def test_gate_loss_and_gradients_match_across_backends_fp64(gate_on, hidden):
    members = [_member("torch", 0, 2), _member("torch", 10, 2, batch_norm=True),
               _member("torch", 20, 2, dropout=0.5)]
    on = _member("torch", 30) if gate_on == "model" else gate_on
    ft = tl.fuse(members, "gate", gate_on=on, hidden=hidden, backend="torch")
    _random_gate(ft)
    fk = tl.convert(ft, "keras")
    assert sorted(tl.get_weights(fk.gate)) == sorted(tl.get_weights(ft.gate))
    x, _ = learnable(12, 1, SHAPE)
    y = _labels(x, 2)
    for training in (False, True):          # train mode: members stay in eval (frozen)
        lt, gt = tl.bce_loss_and_grads(ft.gate, x, y, training=training)
        lk, gk = tl.bce_loss_and_grads(fk.gate, x, y, training=training)
        assert sorted(gt) == sorted(gk) == sorted(gate.head_weights(ft.gate))
        assert abs(lt - lk) <= 1e-10 * max(1.0, abs(lt))
        assert parity.worst(gt, gk)[0] <= 1e-10
        assert max(np.abs(g).max() for g in gt.values()) > 1e-4   # not a vanishing gradient


def test_numpy_gradient_of_the_gate_formula_matches_the_backends(backend):
    """Finite differences of the numpy formula: the backends differentiate what it computes."""
    f = tl.fuse(_members(), "gate", hidden=(), backend=backend)
    w = _random_gate(f)
    x, _ = learnable(8, 2, SHAPE)
    y = _labels(x)
    gi = f.gate.state["gate"]
    u = tl.features(f.gate, x)
    _, grads = tl.bce_loss_and_grads(f.gate, x, y)
    name = "head.gate.weight"
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (2, 1)]:
        plus, minus = {k: v.copy() for k, v in w.items()}, {k: v.copy() for k, v in w.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        lp = metrics.bce_from_logits(gate.forward(u, plus, gi["gate_dim"], 3, 1)[1], y)
        lm = metrics.bce_from_logits(gate.forward(u, minus, gi["gate_dim"], 3, 1)[1], y)
        assert grads[name][idx] == pytest.approx((lp - lm) / (2 * eps), rel=1e-6, abs=1e-10)


@both_backends
def test_gate_fine_tune_matches_across_backends_and_leaves_members_unchanged():
    members = [_member("torch", 0), _member("torch", 10, batch_norm=True), _member("torch", 20)]
    x, _ = learnable(40, 3, SHAPE)
    y = _labels(x)
    results = {}
    for be in ("torch", "keras"):
        for cache in (True, False):
            f = tl.fuse(members, "gate", gate_on="features", hidden=(4,), backend=be)
            before = [tl.get_weights(m) for m in f.members]
            h = tl.fine_tune(f, (x, y), epochs=2, batch_size=16, optimizer=tl.optim.SGD(0.05), feature_cache=cache, progress=False)
            for m, b in zip(f.members, before):
                after = tl.get_weights(m)
                assert all(np.array_equal(after[k], b[k]) for k in b)   # BN stats included
            results[be, cache] = (h["loss"], gate.head_weights(f.gate))
    ref_loss, ref_w = results["torch", True]
    assert np.abs(ref_w["head.gate.3.weight"]).max() > 1e-3      # the gate moved off zero
    for key, (loss, w) in results.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-9, atol=0)
        assert parity.worst(w, ref_w)[0] <= 1e-9, key


def test_gate_trained_by_fuse_beats_the_mean_on_the_data_it_saw(backend):
    """Two members, each right on one half of the inputs: the gate learns whom to trust."""
    x, _ = learnable(64, 4, SHAPE)
    y = _labels(x)
    side = (x[:, :, :, 0].mean(axis=(1, 2)) > 0)
    members = []
    for k, seed in enumerate((0, 10)):
        m = _member(backend, seed)
        keep = side if k == 0 else ~side
        tl.fine_tune(m, (x[keep], y[keep]), epochs=30, optimizer=tl.optim.Adam(3e-3), batch_size=16, progress=False)
        members.append(m)
    mean = tl.fuse(members)
    f = tl.fuse(members, "gate", gate_on="features", train=(x, y), val=(x, y), force=True,
                fine_tune_kwargs={"epochs": 40})
    assert f.report["val_loss"] < tl.evaluate(mean, (x, y))["loss"]
    assert f.report["val_loss"] < min(f.report["val_loss_members"])
    assert len(f.report["history"]) == 40
    assert np.allclose(np.sum(fusion.gate_weights(f, x), axis=1), 1.0)


def test_gate_checkpoint_resume_equals_one_run(backend, tmp_path):
    members = _members()
    x, _ = learnable(32, 5, SHAPE)
    y = _labels(x)
    one = tl.fuse(members, "gate", hidden=(3,), backend=backend)
    tl.fine_tune(one, (x, y), epochs=2, optimizer=tl.optim.SGD(0.05), progress=False)
    two = tl.fuse(members, "gate", hidden=(3,), backend=backend)
    tl.fine_tune(two, (x, y), epochs=1, optimizer=tl.optim.SGD(0.05), progress=False, checkpoint=tmp_path)
    other = [b for b in BACKENDS if b != backend][:1] or [backend]
    three = tl.fuse(members, "gate", hidden=(3,), backend=other[0])
    tl.fine_tune(three, (x, y), epochs=2, optimizer=tl.optim.SGD(0.05), progress=False, checkpoint=tl.Checkpoint(tmp_path, resume=True))
    assert parity.worst(gate.head_weights(three.gate), gate.head_weights(one.gate))[0] <= 1e-10


def test_gate_resume_refuses_a_checkpoint_of_other_members(backend, tmp_path):
    """A gate checkpoint belongs to its members: resuming it over other members (other
    weights), another gate input or other gate shapes is refused before anything changes."""
    members = _members()
    x, _ = learnable(32, 5, SHAPE)
    y = _labels(x)
    run = dict(epochs=2, optimizer=tl.optim.SGD(0.05), progress=False)
    first = tl.fuse(members, "gate", hidden=(3,), backend=backend)
    tl.fine_tune(first, (x, y), checkpoint=tmp_path, **{**run, "epochs": 1})
    others = [_member(m.backend, 30 + i) for i, m in enumerate(members)]
    for f in (tl.fuse(others, "gate", hidden=(3,), backend=backend),
              tl.fuse(members, "gate", hidden=(4,), backend=backend),
              tl.fuse(members, "gate", gate_on="features", hidden=(3,), backend=backend)):
        before = gate.head_weights(f.gate)
        with pytest.raises(errors.CheckpointError, match="same members"):
            tl.fine_tune(f, (x, y), checkpoint=tl.Checkpoint(tmp_path, resume=True), **run)
        after = gate.head_weights(f.gate)
        assert all(np.array_equal(before[k], after[k]) for k in before)
    again = tl.fuse([tl.convert(m, backend) for m in members], "gate", hidden=(3,),
                    backend=backend)
    h = tl.fine_tune(again, (x, y), checkpoint=tl.Checkpoint(tmp_path, resume=True), **run)
    assert h["epoch"] == [0, 1]             # the same members (copies) resume


def test_save_load_convert_round_trip_a_cross_backend_gated_fusion(tmp_path):
    members = _members(num_outputs=2)
    gb = _member(BACKENDS[-1], 40)
    for be in BACKENDS:
        f = tl.fuse(members, "gate", gate_on=gb, hidden=(4,), dropout=0.25, backend=be)
        _random_gate(f)
        x, _ = learnable(6, 6, SHAPE)
        z = tl.logits(f, x)
        path = tmp_path / f"gate_{be}.safetensors"
        tl.save(f, path)
        for target in (None, *BACKENDS):
            g = tl.load(path, backend=target)
            assert g.method == "gate" and g.backend == (target or be)
            assert g.gate.spec.head.dropout == 0.25 and g.gate.spec.head.hidden == (4,)
            np.testing.assert_array_equal(tl.logits(g, x), z) if target in (None, be) else \
                np.testing.assert_allclose(tl.logits(g, x), z, rtol=0, atol=1e-12)
        for target in BACKENDS:
            np.testing.assert_allclose(tl.logits(tl.convert(f, target), x), z, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- bad input
def test_gate_bad_input_is_refused_before_any_work(backend):
    members = _members()
    x, _ = learnable(16, 7, SHAPE)
    y = _labels(x)
    with pytest.raises(errors.DataError, match="sums logits"):
        tl.fuse(members, "gate", space="prob")
    with pytest.raises(errors.DataError, match="gate_on"):
        tl.fuse(members, "gate", gate_on="pixels")
    with pytest.raises(errors.ArgumentTypeError, match="gate_on"):
        tl.fuse(members, "gate", gate_on=3)
    with pytest.raises(errors.DataError, match="per input"):
        tl.fuse(members, "gate", weights=[0.2, 0.3, 0.5])
    with pytest.raises(errors.DataError, match="needs train"):
        tl.fuse(members, "gate", fine_tune_kwargs={"epochs": 2})
    other = _member(backend, 50)
    other32 = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, seed=1,
                               widths=(4, 8))
    with pytest.raises(errors.DataError, match="one dtype"):
        tl.fuse([other, tl.replace_head(other32, 1)], "gate")
    f = tl.fuse(members, "gate", backend=backend)
    with pytest.raises(errors.DataError, match="only the gate"):
        tl.fine_tune(f, (x, y), unfreeze={0: "head.*", 1: "all"}, epochs=2, progress=False)
    tl.unfreeze(f.gate, "all")
    with pytest.raises(errors.DataError, match="only the gate"):
        tl.fine_tune(f, (x, y), progress=False)
    with pytest.raises(errors.DataError, match="method='mean'"):
        tl.fine_tune(tl.fuse(members), (x, y), progress=False)
    with pytest.raises(errors.ArgumentTypeError, match="FusedModel itself"):
        tl.save(f.gate, "never.safetensors")
    assert not os.path.exists("never.safetensors")
    with pytest.raises(errors.DataError, match="gated fusion"):
        fusion.gate_weights(tl.fuse(members), x)


def test_gate_refuses_the_members_own_training_data(backend):
    m = _member(backend, 0)
    x, _ = learnable(16, 8, SHAPE)
    y = _labels(x)
    tl.fine_tune(m, (x, y), progress=False)
    with pytest.raises(errors.DataError, match=r"member\(s\) \[0\]'s own training data"):
        tl.fuse([m, _member(backend, 10)], "gate", train=(x, y))
    f = tl.fuse([m, _member(backend, 10)], "gate", train=(x, y), force=True,
                fine_tune_kwargs={"epochs": 1})
    assert len(f.report["history"]) == 1


@both_backends
def test_native_only_members_fuse_on_their_own_backend():
    shape = (32, 32, 3)
    native = tl.replace_head(tl.load_backbone("mobilenet_v3_small", backend="torch",
                                              input_shape=shape, dtype="float64", seed=0), 1, seed=1)
    vgg = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=shape,
                                           dtype="float64", seed=2, widths=(4, 8)), 1, seed=3)
    f = tl.fuse([native, vgg], "gate", gate_on="features")    # the native member decides
    assert f.backend == "torch" and not f.members[0].portable and f.members[1].portable
    x, _ = learnable(4, 9, shape)
    zs = np.stack([tl.logits(native, x), tl.logits(vgg, x)])
    np.testing.assert_allclose(tl.logits(f, x), zs.mean(0), rtol=0, atol=1e-12)
    with pytest.raises(errors.NotPortableError, match="backend='torch'"):
        tl.fuse([native, vgg], "gate", backend="keras")
    with pytest.raises(errors.NotPortableError, match="mobilenet_v3_small"):
        tl.convert(f, "keras")
