"""fine_tune's behaviour on each backend: resume after SIGKILL, divergence, feature cache,
early stopping, metrics, schedules, history."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import small_model

import tlbridge as tl
from tlbridge import errors, metrics, optim, parity
from tlbridge import weights as wio

SHAPE = (16, 16, 3)


def _data(n=32, k=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE))
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]        # learnable
    return x, (np.repeat(y, k, 1) if k > 1 else y)


def _model(backend, dtype="float64", batch_norm=True, seed=0):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype=dtype, seed=seed,
                         widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_head(m, 1, seed=seed + 1)


CHILD = textwrap.dedent("""
    import sys, time, numpy as np, tlbridge as tl
    backend, ckpt, resume, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    stall = len(sys.argv) > 5   # the run to be killed waits mid-epoch 1, so the kill lands there
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16, 16, 3)); y = (rng.random((32, 1)) > 0.5).astype(float)
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), dtype="float64",
                         seed=0, widths=(4, 8), batch_norm=True)
    m = tl.replace_head(m, 1, seed=1)
    def cb(event, info):
        if event == "step":
            print("step", info["epoch"], info["step"], flush=True)
            if stall and (info["epoch"], info["step"]) == (1, 4):
                time.sleep(60)
    tl.fine_tune(m, (x, y), epochs=3, batch_size=4, optimizer=tl.optim.SGD(0.05, schedule="cosine"),
                 checkpoint=tl.Checkpoint(ckpt, resume=resume), progress=False, seed=1, callbacks=[cb])
    tl.save(m, out)
    print("finished", flush=True)
""")


def _child(tmp_path, *args):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), *map(str, args)]


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(backend, tmp_path):
    ref = tmp_path / "ref.safetensors"
    subprocess.run(_child(tmp_path, backend, tmp_path / "ref_ckpt", 0, ref), check=True,
                   capture_output=True, timeout=600)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(_child(tmp_path, backend, ckpt, 0, tmp_path / "never.safetensors", "stall"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:                      # wait until epoch 1 is half done
            if line.strip() == "step 1 4":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    _, meta = wio.load_file(ckpt / "last.safetensors")
    assert meta["epoch"] == "0"                       # the last complete epoch, written atomically
    assert not [p for p in os.listdir(ckpt) if p.startswith(".tmp")]
    out = tmp_path / "resumed.safetensors"
    done = subprocess.run(_child(tmp_path, backend, ckpt, 1, out), check=True, capture_output=True,
                          text=True, timeout=600)
    assert done.stdout.splitlines()[0] == "step 1 0"  # resumed at epoch 1
    a, b = wio.load_file(ref)[0], wio.load_file(out)[0]
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_divergence_names_epoch_and_step_and_keeps_the_last_good_checkpoint(backend, tmp_path):
    m = _model(backend, dtype="float32")
    x, y = _data()
    steps = 4   # 32 samples / batch 8
    explode = lambda step, total: 1.0 if step < steps else 1e30  # noqa: E731
    with pytest.raises(errors.TrainingDivergedError, match=r"epoch 1, step \d") as e:
        tl.fine_tune(m, (x, y), epochs=3, batch_size=8, optimizer=tl.optim.SGD(0.05, schedule=explode), checkpoint=tmp_path, progress=False, feature_cache=False)
    assert e.value.epoch == 1 and isinstance(e.value, RuntimeError)
    tensors, meta = wio.load_file(tmp_path / "last.safetensors")
    assert meta["epoch"] == "0"
    w = tl.get_weights(m)                               # restored to the end of epoch 0
    assert all(np.array_equal(w[k], tensors["model/" + k]) for k in w)


def test_feature_cache_gives_the_same_result_as_the_full_forward(backend):
    x, y = _data()
    results = []
    for cache in (False, True):
        m = tl.freeze(_model(backend), "backbone")
        h = tl.fine_tune(m, (x, y), epochs=3, batch_size=8, optimizer=tl.optim.Adam(1e-2, schedule="cosine"), progress=False, feature_cache=cache)
        assert h["cached"] == [cache] * 3
        results.append(tl.get_weights(m))
    diff, at = parity.worst(*results)
    assert diff <= 1e-10, f"{at}: {diff:.3g}"


def test_feature_cache_is_automatic_only_when_the_backbone_is_frozen_and_no_augmentation(backend):
    x, y = _data()
    m = tl.freeze(_model(backend), "backbone")
    h = tl.fine_tune(m, (x, y), epochs=2, batch_size=8, progress=False,
                     unfreeze={0: "head", 1: "all"})
    assert h["cached"] == [True, False]
    ds = tl.data.arrays(x.astype("float32"), y, batch_size=8, augment=tl.data.Augment(), seed=0)
    m2 = tl.freeze(_model(backend), "backbone")
    assert tl.fine_tune(m2, ds, epochs=1, progress=False)["cached"] == [False]


def test_early_stopping_restores_the_best_weights(backend):
    x, y = _data()
    m = _model(backend)
    snapshots = []
    cb = lambda event, info: snapshots.append(tl.get_weights(m)) if event == "epoch" else None  # noqa: E731
    h = tl.fine_tune(m, (x, y), val=(x, y), epochs=8, batch_size=8, optimizer=tl.optim.SGD(3.0, momentum=0.9), early_stopping=tl.EarlyStopping("val_loss", patience=1), progress=False, callbacks=[cb])
    best = int(np.nanargmin(h["val_loss"]))
    assert h.best_epoch == best
    w = tl.get_weights(m)
    assert all(np.array_equal(w[k], snapshots[best][k]) for k in w)


def test_restore_points_are_taken_where_something_can_use_them(backend, monkeypatch):
    """A copy of every weight before training and at the end of each epoch but the last
    (nothing can diverge after it), and at the last too when early stopping may keep it. A run
    diverging in its last epoch returns to the end of the one before."""
    from tlbridge.training import snapshot
    taken = []
    take = snapshot.Snapshot.take.__func__
    monkeypatch.setattr(snapshot.Snapshot, "take",
                        classmethod(lambda cls, m, be: taken.append(1) or take(cls, m, be)))
    x, y = _data()
    run = dict(batch_size=8, progress=False, feature_cache=False)
    for kwargs, expected in ((dict(epochs=1), 1), (dict(epochs=3), 3),
                             (dict(epochs=2, val=(x, y), early_stopping=5), 3)):
        taken.clear()
        tl.fine_tune(_model(backend), (x, y), **kwargs, **run)
        assert len(taken) == expected, kwargs
    m, ref = _model(backend, dtype="float32"), _model(backend, dtype="float32")
    tl.fine_tune(ref, (x, y), epochs=1, optimizer=tl.optim.SGD(0.05), **run)
    explode = lambda step, total: 1.0 if step < 4 else 1e30  # noqa: E731  (4 steps an epoch)
    with pytest.raises(errors.TrainingDivergedError, match=r"epoch 1, step \d.*end of epoch 0"):
        tl.fine_tune(m, (x, y), epochs=2, optimizer=tl.optim.SGD(0.05, schedule=explode), **run)
    w, r = tl.get_weights(m), tl.get_weights(ref)
    assert all(np.array_equal(w[k], r[k]) for k in r)


def test_learning_lowers_the_loss_and_evaluate_reports_metrics(backend):
    x, y = _data(64)
    m = _model(backend, batch_norm=False)
    h = tl.fine_tune(m, (x, y), val=(x, y), epochs=4, batch_size=16, optimizer=tl.optim.Adam(1e-2), progress=False)
    assert h["loss"][-1] < h["loss"][0]
    scores = tl.evaluate(m, (x, y))
    assert set(scores) == {"loss", "accuracy", "auc"} and scores["accuracy"] > 0.6
    assert scores["loss"] == pytest.approx(h["val_loss"][-1], rel=1e-9)
    # against an independent computation from the model's probabilities (fp64 model)
    p, t = tl.predict(m, x)[:, 0], y[:, 0]
    assert 0.01 < p.min() and p.max() < 0.99               # log(1 - p) is accurate here
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log1p(-p))
    assert scores["loss"] == pytest.approx(bce, rel=1e-12)
    assert scores["accuracy"] == np.mean((p > 0.5) == (t == 1))
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert scores["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(t, p), abs=1e-12)


def test_progress_false_is_silent_and_true_shows_a_bar(backend, capsys):
    x, y = _data(16)
    tl.fine_tune(_model(backend), (x, y), epochs=1, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
    tl.fine_tune(_model(backend), (x, y), epochs=1, batch_size=8, progress=True)
    assert "epoch 1/1" in capsys.readouterr().err


def test_history_plot_writes_a_png(tmp_path):
    h = tl.History([{"epoch": 0, "loss": 0.7, "val_loss": 0.72}, {"epoch": 1, "loss": 0.5, "val_loss": 0.6}])
    path = h.plot(tmp_path / "curve.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert tl.History.from_json(h.to_json()).epochs == h.epochs


def test_roc_auc_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=200), 1)                  # with ties
    y = (rng.random(200) > 0.4).astype(float)
    assert metrics.roc_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(metrics.roc_auc(s, np.ones(200)))


def test_schedules():
    cos = optim.make_schedule("cosine", 10)
    assert cos(0, 100) == 1.0 and cos(50, 100) == pytest.approx(0.5) and cos(100, 100) == pytest.approx(0.0)
    step = optim.make_schedule(("step", 2, 0.1), 10)
    assert [step(s, 100) for s in (0, 19, 20, 40)] == pytest.approx([1, 1, 0.1, 0.01])
    warm = optim.make_schedule(("warmup", 1, "cosine"), 10)
    assert [warm(s, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warm(10, 110) == pytest.approx(1.0) and warm(110, 110) == pytest.approx(0.0)
    with pytest.raises(errors.DataError, match="Unknown schedule"):
        optim.make_schedule("cosnie", 10)


def test_group_lrs_and_unfreeze_plans_are_validated(backend):
    x, y = _data(16)
    with pytest.raises(errors.DataError, match="matches no parameter"):
        tl.fine_tune(_model(backend), (x, y), optimizer=tl.optim.SGD(groups={"backbone.layer9.*": 1e-4}), progress=False)
    with pytest.raises(errors.DataError, match="starting at epoch 0"):
        tl.fine_tune(_model(backend), (x, y), unfreeze={1: "all"}, progress=False)
    with pytest.raises(errors.DataError, match="Unknown optimizer 'adamm'"):
        tl.fine_tune(_model(backend), (x, y), optimizer="adamm", progress=False)
    with pytest.raises(errors.DataError, match="1 column"):
        tl.fine_tune(_model(backend), (x, np.zeros((16, 2))), progress=False)


def test_fine_tune_on_an_image_folder(backend, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, value in (("cat", 40), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(6):
            img = np.clip(rng.normal(value, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    m = _model(backend, dtype="float32", batch_norm=False)
    ds = tl.data.image_folder(tmp_path, (16, 16), batch_size=4, seed=0,
                              preprocess=lambda b: tl.preprocess(m, np.asarray(b).round().astype(np.uint8)))
    assert ds.classes == ["cat", "dog"] and ds.num_outputs == 1
    h = tl.fine_tune(m, ds, epochs=2, optimizer=tl.optim.Adam(1e-2), progress=False)
    assert len(h) == 2 and all(np.isfinite(h["loss"]))
