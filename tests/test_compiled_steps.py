"""The Keras trainer's compiled steps live with the model (issue 8): tracing a step costs more
than an epoch of a small model, so a second fine_tune call, an unfreeze phase seen before and a
ragged last batch must not trace again — and sharing the steps and their optimizer-state
variables between calls must not change a single number (checked against torch, which builds
a fresh optimizer per call). Per-epoch seeding resets the model's own random streams, so a
head with dropout trains the same way twice and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends, learnable

import tlbridge as tl
from tlbridge import parity

SHAPE = (16, 16, 3)


def _data(n=37, seed=0):
    return learnable(n, seed, SHAPE)


def _model(backend, dtype="float64", batch_norm=True, **head):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype=dtype, seed=0,
                         widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_head(m, 1, seed=1, **head)


def test_keras_traces_one_step_per_trainable_set_across_fine_tune_calls():
    pytest.importorskip("keras")
    from tlbridge.backends.keras.training import traced_steps

    m = _model("keras", dtype="float32")
    x, y = _data()                                   # 37 samples, batch 8: a ragged last batch
    run = dict(batch_size=8, progress=False, feature_cache=False)
    tl.fine_tune(m, (x, y), epochs=2, **run)
    assert traced_steps(m) == 1, "a ragged last batch traced a second step"
    tl.fine_tune(m, (x, y), epochs=1, **run)
    assert traced_steps(m) == 1, "a second fine_tune call traced the same step again"
    tl.fine_tune(m, (x, y), epochs=3, unfreeze={0: "head", 1: "all"}, **run)
    assert traced_steps(m) == 2, "only the head-only set is new; 'all' was traced before"
    tl.fine_tune(m, (x, y), epochs=2, unfreeze={0: "head", 1: "all"}, **run)
    assert traced_steps(m) == 2
    tl.freeze(m, "backbone")
    tl.fine_tune(m, (x, y), epochs=2, batch_size=8, progress=False, feature_cache=True)
    assert traced_steps(m) == 3, "the cached-features step is one more graph"
    tl.fine_tune(m, (x, y), epochs=1, optimizer="adam", **run)
    assert traced_steps(m) == 4, "another optimizer is another graph"
    m2 = tl.replace_head(m, 1, seed=3)
    assert traced_steps(m2) == 0, "a new head must not inherit the old head's steps"


@both_backends
def test_repeated_fine_tune_calls_match_torch_which_starts_a_fresh_optimizer_each_time():
    """Keras reuses one set of optimizer-state variables across calls; each call must start
    them from zero as torch's new optimizer does: Adam twice, SGD with momentum, L2-SP."""
    x, y = _data()          # no BatchNorm: Adam would amplify the rounding noise of the
    mt, mk = _model("torch", batch_norm=False), _model("keras", batch_norm=False)  # zero conv-bias grads
    calls = [dict(optimizer=tl.optim.Adam(1e-2, weight_decay=1e-3)),
             dict(optimizer=tl.optim.Adam(1e-2, weight_decay=1e-3)),
             dict(optimizer=tl.optim.SGD(1e-2, momentum=0.9, regularizer="l2sp")),
             dict(optimizer=tl.optim.SGD(1e-2, momentum=0.9, regularizer=tl.L2SP(0.1, 0.0)))]
    for i, kwargs in enumerate(calls):
        for m in (mt, mk):
            tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, seed=i, **kwargs)
        diff, at = parity.worst(tl.get_weights(mt), tl.get_weights(mk), floor_rel=1e-6)
        assert diff <= 1e-9, f"call {i} ({kwargs}): weights differ by {diff:.2e} at {at}"


def test_keras_checkpoint_holds_only_this_optimizers_state(tmp_path):
    pytest.importorskip("keras")
    from tlbridge import weights as wio

    x, y = _data()
    m = _model("keras")
    tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, optimizer="adam")
    tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, optimizer="sgd", checkpoint=tmp_path)
    tensors, _ = wio.load_file(str(tmp_path / "last.safetensors"))
    slots = {k.split("/")[1] for k in tensors if k.startswith("optim/")}
    assert slots == {"momentum_buffer", "step"}, slots


def test_dropout_head_trains_the_same_twice_and_resumes_exactly(backend, tmp_path):
    x, y = _data()
    run = dict(batch_size=8, progress=False, seed=5, optimizer=tl.optim.SGD(1e-2))

    def trained(**kwargs):
        m = _model(backend, hidden=(16,), dropout=0.5)
        tl.fine_tune(m, (x, y), **{**run, **kwargs})
        return tl.get_weights(m)

    once = trained(epochs=2)
    again = trained(epochs=2)
    assert all(np.array_equal(once[k], again[k]) for k in once)
    other = trained(epochs=2, seed=6)
    assert any(not np.array_equal(once[k], other[k]) for k in once), "the seed changes nothing"

    m = _model(backend, hidden=(16,), dropout=0.5)
    tl.fine_tune(m, (x, y), epochs=1, checkpoint=tmp_path, **run)
    m = _model(backend, hidden=(16,), dropout=0.5)       # a new process would start like this
    tl.fine_tune(m, (x, y), epochs=2, checkpoint=tl.Checkpoint(tmp_path, resume=True), **run)
    resumed = tl.get_weights(m)
    diff, at = parity.worst(once, resumed)
    assert diff == 0.0, f"the resumed run differs from the uninterrupted one by {diff:.2e} at {at}"


def test_inference_between_steps_changes_nothing_and_training_ends_in_eval_mode(backend):
    """The torch trainer keeps train mode on across an epoch's steps (nn.Module.train walks
    every module: 3% of a MobileNetV2 step when toggled per step); a callback's tl.predict
    between steps must not disturb it, and the model must end in eval mode, also on error."""
    x, y = _data()
    run = dict(epochs=2, batch_size=8, progress=False, optimizer=tl.optim.SGD(1e-2))
    plain = _model(backend)
    tl.fine_tune(plain, (x, y), **run)
    probed = _model(backend)
    seen = []

    def probe(event, info):
        if event == "step":
            seen.append(tl.predict(probed, x[:4]))
    tl.fine_tune(probed, (x, y), callbacks=[probe], **run)
    a, b = tl.get_weights(plain), tl.get_weights(probed)
    assert all(np.array_equal(a[k], b[k]) for k in a), "inference between steps changed training"
    assert len(seen) == 10
    if backend == "torch":
        assert not probed.native.training

    def fail(event, info):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        tl.fine_tune(probed, (x, y), callbacks=[fail], **run)
    if backend == "torch":
        assert not probed.native.training
