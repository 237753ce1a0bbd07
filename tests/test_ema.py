"""fine_tune(ema=d) (issue 9): the moving average written in tlbridge/optim.py, computed in
numpy from the weights after every step, so it is the same on both backends; evaluated beside
the live weights, kept in checkpoints and resumed, swapped in at the end."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends, learnable

import tlbridge as tl
from tlbridge import errors, parity

SHAPE = (16, 16, 3)


def _data(n=40, seed=0):
    return learnable(n, seed, SHAPE)


def _model(backend):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float64", seed=0,
                         widths=(4, 8), batch_norm=True)
    return tl.replace_head(m, 1, seed=1)


RUN = dict(epochs=2, batch_size=8, progress=False)


def test_ema_is_the_written_formula_over_the_weights_after_every_step(backend):
    x, y = _data()
    m = _model(backend)
    start = tl.get_weights(m)
    after = []
    h = tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, ema=tl.optim.EMA(0.8, swap=False)), callbacks=[lambda ev, info: after.append(tl.get_weights(m))
                                if ev == "step" else None], **RUN)
    want = {k: v.copy() for k, v in start.items()}
    for w in after:
        for k in want:
            want[k] = 0.8 * want[k] + 0.2 * w[k]
    for k in want:
        np.testing.assert_allclose(h.ema_weights[k], want[k], rtol=1e-13, atol=1e-15)
    live = tl.get_weights(m)                     # ema_swap=False: the live weights stay
    assert all(np.array_equal(live[k], after[-1][k]) for k in live)


def test_ema_is_evaluated_beside_the_live_weights_and_swapped_in(backend):
    x, y = _data()
    xv, yv = _data(16, seed=1)
    m = _model(backend)
    h = tl.fine_tune(m, (x, y), val=(xv, yv), optimizer=tl.optim.SGD(0.05, ema=0.9), **RUN)
    assert len(h["val_loss_ema"]) == 2 and not np.isnan(h["val_loss_ema"]).any()
    w = tl.get_weights(m)
    assert all(np.array_equal(w[k], h.ema_weights[k]) for k in w)
    assert tl.evaluate(m, (xv, yv))["loss"] == pytest.approx(h["val_loss_ema"][-1], rel=1e-12)
    assert h["val_loss_ema"][-1] != h["val_loss"][-1]


@both_backends
def test_ema_is_the_same_on_both_backends():
    x, y = _data()
    xv, yv = _data(16, seed=1)
    runs = {}
    for backend in ("torch", "keras"):
        m = _model(backend)
        runs[backend] = (m, tl.fine_tune(m, (x, y), val=(xv, yv), optimizer=tl.optim.SGD(0.05, ema=0.9), **RUN))
    diff, at = parity.worst(tl.get_weights(runs["torch"][0]), tl.get_weights(runs["keras"][0]),
                            floor_rel=1e-6)
    assert diff <= 1e-9, f"{diff:.2e} at {at}"
    np.testing.assert_allclose(runs["torch"][1]["val_loss_ema"], runs["keras"][1]["val_loss_ema"],
                               rtol=1e-9)


def test_ema_is_checkpointed_and_resumed_exactly(backend, tmp_path):
    x, y = _data()
    whole = _model(backend)
    h = tl.fine_tune(whole, (x, y), optimizer=tl.optim.SGD(0.05, ema=0.9), **RUN)
    part = _model(backend)
    tl.fine_tune(part, (x, y), optimizer=tl.optim.SGD(0.05, ema=0.9), checkpoint=tmp_path, **{**RUN, "epochs": 1})
    part = _model(backend)
    tl.fine_tune(part, (x, y), optimizer=tl.optim.SGD(0.05, ema=0.9), checkpoint=tl.Checkpoint(tmp_path, resume=True), **RUN)
    a, b = tl.get_weights(whole), tl.get_weights(part)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(h.ema_weights[k], b[k]) for k in a)
    with pytest.raises(errors.CheckpointError, match="ema"):
        tl.fine_tune(_model(backend), (x, y), optimizer=tl.optim.SGD(0.05, ema=0.99), checkpoint=tl.Checkpoint(tmp_path, resume=True), **RUN)


def test_bad_ema_is_refused_before_training(backend):
    x, y = _data()
    m = _model(backend)
    before = tl.get_weights(m)
    for bad in (1.0, 0.0, -0.5, "0.9", True):
        with pytest.raises(errors.DataError, match="ema as a decay"):
            tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, ema=bad), **RUN)
    with pytest.raises(errors.DataError, match="one source for the final weights"):
        tl.fine_tune(m, (x, y), val=(x, y), optimizer=tl.optim.SGD(0.05, ema=0.9), early_stopping=2, **RUN)
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
