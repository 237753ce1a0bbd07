"""fine_tune defects of issue 7, each pinned by a test that failed before its fix: data checked
against the model up front, unfreeze plans read from JSON, nothing-trainable and option
conflicts refused before training, cross-backend resume (momentum, early stopping, stored
settings), the divergence message, and the feature cache over skipped images."""
from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import errors, metrics, parity
from tlbridge import weights as wio

SHAPE = (16, 16, 3)


def _data(n=32, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]        # learnable
    return x, y


def _model(backend, dtype="float64", batch_norm=False, seed=0):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype=dtype, seed=seed,
                         widths=(4, 8), batch_norm=batch_norm)
    return tl.replace_head(m, 1, seed=seed + 1)


class _Steps:
    """A callback that records every training step (none may run before a refusal)."""

    def __init__(self):
        self.steps = []

    def __call__(self, event, info):
        if event == "step":
            self.steps.append((info["epoch"], info["step"]))


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- data checked against the model

def test_evaluate_refuses_labels_and_images_that_do_not_fit_the_model(backend):
    m = _model(backend)
    x, y = _data(16)
    with pytest.raises(errors.DataError, match=r"data labels with 1 column\(s\).*received 3.*"
                                               r"replace_head\(m, 3\)"):
        tl.evaluate(m, (x, np.repeat(y, 3, 1)))        # broadcast to a wrong loss before
    xs, _ = _data(16, shape=(8, 8, 3))
    with pytest.raises(errors.DataError, match=r"data images of shape \(16, 16, 3\).*"
                                               r"received \(8, 8, 3\)"):
        tl.evaluate(m, (xs, y))
    with pytest.raises(errors.ShapeError, match=r"logits \(4, 1\) and labels \(4, 3\)"):
        metrics.scores(np.zeros((4, 1)), np.zeros((4, 3)))
    assert set(tl.evaluate(m, (x, y))) == {"loss", "accuracy", "auc"}


def test_val_is_checked_against_the_model_before_training(backend):
    m = _model(backend)
    w0 = tl.get_weights(m)
    x, y = _data(16)
    xs, _ = _data(16, shape=(8, 8, 3))
    cb = _Steps()
    with pytest.raises(errors.DataError, match=r"val labels with 1 column\(s\).*received 3"):
        tl.fine_tune(m, (x, y), val=(x, np.repeat(y, 3, 1)), batch_size=8, progress=False,
                     callbacks=[cb])
    with pytest.raises(errors.DataError, match=r"val images of shape \(16, 16, 3\).*"
                                               r"received \(8, 8, 3\)"):
        tl.fine_tune(m, (x, y), val=(xs, y), batch_size=8, progress=False, callbacks=[cb])
    assert cb.steps == [] and _same(tl.get_weights(m), w0)


# ---------------------------------------------------------------- unfreeze plans, nothing trainable

def test_unfreeze_plan_with_string_keys_as_read_from_json(backend):
    x, y = _data(16)
    plan = {0: "head", 1: "all"}
    runs = []
    for p in (plan, json.loads(json.dumps(plan))):     # JSON turns the keys into "0", "1"
        m = _model(backend)
        h = tl.fine_tune(m, (x, y), epochs=2, batch_size=8, optimizer=tl.optim.SGD(0.05), unfreeze=p, progress=False)
        runs.append((h["trainable"], tl.get_weights(m)))
    n = len(runs[0][1])
    assert runs[0][0] == runs[1][0] == [2, n]
    diff, at = parity.worst(runs[0][1], runs[1][1])
    assert diff == 0.0, f"{at}: {diff:.3g}"


def test_unfreeze_plan_keys_are_validated(backend):
    x, y = _data(16)
    with pytest.raises(errors.DataError, match=r"epoch numbers.*received 'first'"):
        tl.fine_tune(_model(backend), (x, y), unfreeze={"first": "head"}, progress=False)
    with pytest.raises(errors.DataError, match="epoch 0 twice"):
        tl.fine_tune(_model(backend), (x, y), unfreeze={0: "head", "0": "all"}, progress=False)
    with pytest.raises(errors.FreezeSpecError, match="matches no parameter"):  # a later epoch's typo
        tl.fine_tune(_model(backend), (x, y), epochs=1, unfreeze={0: "head", 5: "backbone.nope"},
                     progress=False)


def test_nothing_trainable_is_refused_before_training(backend):
    x, y = _data(16)
    m = tl.freeze(_model(backend), "all")
    w0 = tl.get_weights(m)
    cb = _Steps()
    with pytest.raises(errors.FreezeSpecError, match=r"all \d+ parameters frozen in epoch 0.*"
                                                     r"tl.unfreeze\(m, 'head'\)"):
        tl.fine_tune(m, (x, y), batch_size=8, progress=False, callbacks=[cb])
    assert cb.steps == [] and _same(tl.get_weights(m), w0)


# ---------------------------------------------------------------- options refused up front

def test_early_stopping_monitor_typo_is_refused_before_training(backend):
    x, y = _data(16)
    m = _model(backend)
    cb = _Steps()
    with pytest.raises(errors.DataError, match=r"monitor as one of \['loss', 'val_loss', "
                                               r"'val_accuracy', 'val_auc'\]; received 'val_los'"
                                               r".*Did you mean 'val_loss'"):
        tl.fine_tune(m, (x, y), val=(x, y), epochs=2, batch_size=8, progress=False, callbacks=[cb],
                     early_stopping=tl.EarlyStopping("val_los"))
    with pytest.raises(errors.DataError, match=r"received 'val_loss'\. Pass val="):
        tl.fine_tune(m, (x, y), epochs=2, batch_size=8, progress=False, callbacks=[cb],
                     early_stopping={"monitor": "val_loss"})
    assert cb.steps == []
    with pytest.raises(errors.DataError, match=r"mode 'min', 'max' or 'auto'; received 'maximum'"):
        tl.EarlyStopping("val_auc", mode="maximum")
    with pytest.raises(errors.DataError, match=r"patience as an int >= 0"):
        tl.EarlyStopping(patience=-1)


def test_feature_cache_true_conflicts_are_refused_before_training(backend):
    x, y = _data(16)
    cb = _Steps()
    augmented = tl.data.arrays(x, y, batch_size=8, augment=tl.data.Augment(), dtype="float64")
    m = tl.freeze(_model(backend), "backbone")
    with pytest.raises(errors.DataError, match=r"no augmentation with feature_cache=True.*"
                                               r"received train data with augment=Augment"):
        tl.fine_tune(m, augmented, feature_cache=True, progress=False, callbacks=[cb])
    with pytest.raises(errors.DataError, match=r"backbone frozen in every epoch with "
                                               r"feature_cache=True; received \d+ trainable backbone "
                                               r"parameter\(s\) in epoch 1"):
        tl.fine_tune(m, (x, y), epochs=2, batch_size=8, feature_cache=True,
                     unfreeze={0: "head", 1: "all"}, progress=False, callbacks=[cb])
    with pytest.raises(errors.DataError, match="in epoch 0"):
        tl.fine_tune(_model(backend), (x, y), feature_cache=True, progress=False, callbacks=[cb])
    with pytest.raises(errors.DataError, match=r"feature_cache 'auto', True or False; received 'yes'"):
        tl.fine_tune(m, (x, y), feature_cache="yes", progress=False, callbacks=[cb])
    assert cb.steps == []


# ---------------------------------------------------------------- divergence

def test_divergence_restores_the_epoch_its_message_names(backend, tmp_path):
    x, y = _data()
    steps = 4   # 32 samples / batch 8
    snapshots = {}
    m = _model(backend)
    w_init = tl.get_weights(m)

    def snap(event, info):
        if event == "epoch":
            snapshots[info["epoch"]] = tl.get_weights(m)

    explode = lambda step, total: 1.0 if step < 2 * steps else 1e200  # noqa: E731  epoch 2
    with pytest.raises(errors.TrainingDivergedError) as e:
        tl.fine_tune(m, (x, y), epochs=4, batch_size=8, optimizer=tl.optim.SGD(0.05, schedule=explode), progress=False, checkpoint=tmp_path, feature_cache=False, callbacks=[snap])
    assert e.value.epoch == 2
    assert "restored to the end of epoch 1, as saved in the checkpoint" in str(e.value)
    assert _same(tl.get_weights(m), snapshots[1]) and not _same(snapshots[1], snapshots[0])
    assert wio.load_file(tmp_path / "last.safetensors")[1]["epoch"] == "1"

    m = _model(backend)                                 # diverging in the first epoch
    with pytest.raises(errors.TrainingDivergedError,
                       match="restored to its weights from before training") as e:
        tl.fine_tune(m, (x, y), epochs=2, batch_size=8, optimizer=tl.optim.SGD(0.05, schedule=lambda step, total: 1e200), progress=False, feature_cache=False)
    assert e.value.epoch == 0 and _same(tl.get_weights(m), w_init)


# ---------------------------------------------------------------- resume

class _Interrupt(Exception):
    pass


def _interrupt_after(last_epoch):
    def cb(event, info):
        if event == "epoch" and info["epoch"] == last_epoch:
            raise _Interrupt            # after that epoch's checkpoint was written
    return cb


def _interrupt_after_first_epoch(event, info):
    _interrupt_after(0)(event, info)


RESUME_CASES = {
    # momentum buffers must carry over: torch's SGD state had no step, so Keras restarted
    # them. 1 epoch on torch + 1 resumed on Keras == 2 epochs on Keras, with train-mode
    # BatchNorm (its running statistics travel in the checkpoint's weights).
    "sgd-momentum": (0, True, dict(epochs=2, optimizer=tl.optim.SGD(0.05, momentum=0.9, nesterov=True))),
    # early stopping's best value, best epoch, best weights and patience count must carry over:
    # on Keras alone val_loss is best at epoch 1, worse at 2 and 3, so the run stops after
    # epoch 3 and restores epoch 1. Torch trains epochs 0-2 (the checkpoint holds best epoch 1
    # and one epoch without improvement), Keras resumes at 3 and must stop there too. No
    # momentum, so only the early-stopping state is under test.
    "early-stopping": (2, False, dict(epochs=5, optimizer=tl.optim.SGD(0.1, momentum=0.0), early_stopping=tl.EarlyStopping("val_loss", patience=2))),
}


@both_backends
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_epochs_on_torch_then_resume_on_keras_equals_keras_throughout(case, tmp_path):
    x, y = _data()
    last, batch_norm, settings = RESUME_CASES[case]
    kw = dict(settings, batch_size=8, seed=3, progress=False, feature_cache=False)
    if "early_stopping" in kw:
        kw["val"] = (x, 1.0 - y)    # flipped: val_loss rises as the model learns

    ref = _model("keras", batch_norm=batch_norm)
    h_ref = tl.fine_tune(ref, (x, y), **kw)
    first = _model("torch", batch_norm=batch_norm)
    with pytest.raises(_Interrupt):
        tl.fine_tune(first, (x, y), checkpoint=tmp_path, callbacks=[_interrupt_after(last)], **kw)
    assert wio.load_file(tmp_path / "last.safetensors")[1]["epoch"] == str(last)
    resumed = _model("keras", batch_norm=batch_norm)
    steps = _Steps()
    h = tl.fine_tune(resumed, (x, y), checkpoint=tl.Checkpoint(tmp_path, resume=True), callbacks=[steps], **kw)

    assert steps.steps[0] == (last + 1, 0)
    assert len(h) == len(h_ref) and h["epoch"] == h_ref["epoch"]
    if "early_stopping" in kw:
        assert len(h_ref) == 4 and h_ref.best_epoch == 1 and h.best_epoch == 1
    wr, w = tl.get_weights(ref), tl.get_weights(resumed)
    diff, at = parity.worst(wr, w, floor_rel=1e-6)
    assert diff <= 1e-10, f"{case}: {at} differs by {diff:.3g} (relative)"
    moved, _ = parity.worst(wr, tl.get_weights(_model("keras", batch_norm=batch_norm)),
                            floor_rel=1e-6)
    assert moved > 1e-3                                    # the comparison is not vacuous


def test_resume_refuses_other_settings_than_the_checkpoint_was_trained_with(backend, tmp_path):
    x, y = _data(16)
    kw = dict(epochs=2, batch_size=8, progress=False, checkpoint=tl.Checkpoint(tmp_path, resume=True))
    with pytest.raises(_Interrupt):
        tl.fine_tune(_model(backend), (x, y), optimizer=tl.optim.SGD(0.05, momentum=0.9), seed=1,
                     callbacks=[_interrupt_after_first_epoch], **{**kw, "checkpoint": tmp_path})
    m = _model(backend)
    w0 = tl.get_weights(m)
    cb = _Steps()
    with pytest.raises(errors.CheckpointError, match=r"name 'sgd' -> 'adam'.*same settings"):
        tl.fine_tune(m, (x, y), optimizer=tl.optim.Adam(0.05), seed=1, callbacks=[cb], **kw)
    with pytest.raises(errors.CheckpointError, match=r"lr 0.05 -> 0.01"):  # the whole value
        tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.01, momentum=0.9), seed=1, callbacks=[cb],
                     **kw)
    with pytest.raises(errors.CheckpointError, match=r"schedule .*Cosine"):
        tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, momentum=0.9, schedule="cosine"),
                     seed=1, callbacks=[cb], **kw)
    with pytest.raises(errors.CheckpointError, match=r"momentum 0.9 -> 0.5"):
        tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, momentum=0.5), seed=1, callbacks=[cb], **kw)
    with pytest.raises(errors.CheckpointError, match=r"Expected seed=1 .*received seed=2"):
        tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, momentum=0.9), seed=2, callbacks=[cb], **kw)
    with pytest.raises(errors.CheckpointError, match=r"early_stopping"):
        tl.fine_tune(m, (x, y), val=(x, y), optimizer=tl.optim.SGD(0.05, momentum=0.9), seed=1, early_stopping=1, callbacks=[cb], **kw)
    assert cb.steps == [] and _same(tl.get_weights(m), w0)
    h = tl.fine_tune(m, (x, y), optimizer=tl.optim.SGD(0.05, momentum=0.9), seed=1, callbacks=[cb], **kw)
    assert h["epoch"] == [0, 1] and cb.steps[0] == (1, 0)


# ---------------------------------------------------------------- feature cache over image folders

def _folder(tmp_path, n_per_class=12, size=16, truncated=2):
    """Two classes of PNGs; the last `truncated` files of class b have a good header and cut
    pixels, so they fail only when decoded (on_error='skip' drops them from their batch)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, value in (("a", 60), ("b", 190)):
        (tmp_path / cls).mkdir()
        for i in range(n_per_class):
            img = np.clip(rng.normal(value, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / cls / f"{i:02d}.png")
    for i in range(n_per_class - truncated, n_per_class):
        path = tmp_path / "b" / f"{i:02d}.png"
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])
    return tmp_path


class _Alive:
    """preprocess for image_folder that counts the decoded images alive at any one time."""

    def __init__(self):
        self.alive = self.peak = 0
        self.lock = threading.Lock()

    def _gone(self, n):
        with self.lock:
            self.alive -= n

    def __call__(self, batch):
        out = np.asarray(batch, np.float64) / 255.0 - 0.5
        with self.lock:
            self.alive += len(out)
            self.peak = max(self.peak, self.alive)
        weakref.finalize(out, self._gone, len(out))
        return out


def test_feature_cache_over_an_image_folder_with_undecodable_files(backend, tmp_path):
    root = _folder(tmp_path)
    results = []
    for cache in (False, True):
        alive = _Alive()
        ds = tl.data.image_folder(root, SHAPE[:2], on_error="skip", batch_size=4, seed=0,
                                  preprocess=alive, dtype="float64")
        assert ds.num_samples == 24 and ds.skipped == []     # the headers are fine
        m = tl.freeze(_model(backend), "backbone")
        with pytest.warns(UserWarning, match="could not be decoded"):
            h = tl.fine_tune(m, ds, epochs=2, optimizer=tl.optim.Adam(1e-2), progress=False, feature_cache=cache)
        assert h["cached"] == [cache] * 2 and len(ds.skipped) == 2
        results.append(tl.get_weights(m))
        if cache:       # features are computed batch by batch, never from the whole set at once
            assert alive.peak <= (ds.prefetch + 3) * ds.batch_size < ds.num_samples
    diff, at = parity.worst(*results)
    assert diff <= 1e-10, f"{at}: {diff:.3g}"


def test_evaluate_decodes_batch_by_batch(backend, tmp_path):
    root = _folder(tmp_path, truncated=0)
    alive = _Alive()
    ds = tl.data.image_folder(root, SHAPE[:2], batch_size=4, shuffle=False, preprocess=alive,
                              dtype="float64")
    m = _model(backend)
    scores = tl.evaluate(m, ds)
    assert alive.peak <= (ds.prefetch + 3) * ds.batch_size < ds.num_samples
    x, y = ds.as_arrays()
    assert scores["loss"] == pytest.approx(tl.evaluate(m, (x, y))["loss"], rel=1e-12)
