"""tlbridge.data: seeded batching, shuffling, augmentation and folder loading (numpy + Pillow only)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tlbridge import data
from tlbridge.errors import DataError, ShapeError

try:
    from PIL import Image
except ImportError:  # the array tests still run
    Image = None

needs_pil = pytest.mark.skipif(Image is None, reason="needs Pillow (pip install pillow)")

H, W = 20, 24


def _write_image(path, rng, fmt=None):
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 6 images (20x24, PNG and JPEG, one in a nested folder), plus one corrupt .jpg."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / c / "nested").mkdir(parents=True)
        for i in range(6):
            ext = ".png" if i % 2 == 0 else ".JPG"
            sub = root / c / "nested" if i == 5 else root / c
            _write_image(sub / f"{c}{i}{ext}", rng, "PNG" if ext == ".png" else "JPEG")
        (root / c / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "dog" / "broken.jpg").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    rng = np.random.default_rng(1)
    for c in ("neg", "pos"):
        (root / c).mkdir()
        for i in range(5):
            _write_image(root / c / f"{i}.png", rng)
    return root


def _xy(n=10, k=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, H, W, 3)).astype(np.float32)
    y = rng.integers(0, 2, (n, k)) if k > 1 else rng.integers(0, 2, n)
    return x, y


def _collect(it):
    return [(x.copy(), y.copy()) for x, y in it]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
                                    for p, q in zip(a, b))


# ----------------------------------------------------------------------------- arrays

def test_arrays_batches_shapes_and_len():
    x, y = _xy(10)
    ds = data.arrays(x, y, batch_size=4)
    assert len(ds) == 3 and ds.num_samples == 10 and ds.num_outputs == 1
    assert ds.image_shape == (H, W, 3) and ds.classes is None and ds.skipped == []
    batches = _collect(ds.epoch(0))
    assert [b[0].shape for b in batches] == [(4, H, W, 3), (4, H, W, 3), (2, H, W, 3)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.float32 and b[1].shape[1] == 1
               for b in batches)
    assert len(data.arrays(x, y, batch_size=4, drop_last=True)) == 2
    assert data.arrays(x, y, augment=True).augment == data.Augment()
    assert data.arrays(x, y, augment=data.Augment(False, None, 0)).augment is None
    ds64 = data.arrays(x, y, batch_size=4, dtype="float64")
    xb, yb = next(iter(ds64.epoch(0)))
    assert xb.dtype == np.float64 and yb.dtype == np.float64


def test_shuffled_epoch_is_a_permutation_and_labels_follow_images():
    x, y = _xy(10, k=3)
    ds = data.arrays(x, y, batch_size=3)
    xs, ys = map(np.concatenate, zip(*ds.epoch(0)))
    order = [int(np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0]) for img in xs]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    np.testing.assert_array_equal(ys, y[order])
    unshuffled = np.concatenate([b[0] for b in data.arrays(x, y, shuffle=False).epoch(5)])
    np.testing.assert_array_equal(unshuffled, x)


@pytest.mark.parametrize("augment", [None, data.Augment()])
def test_same_seed_same_batches_any_threads(augment):
    x, y = _xy(23)
    runs = [_collect(data.arrays(x, y, batch_size=5, seed=7, augment=augment, workers=w,
                                 prefetch=p).epoch(2))
            for w, p in [(0, 0), (2, 2), (2, 2), (1, 4)]]
    assert all(_same(runs[0], r) for r in runs[1:])


def test_epochs_differ_and_do_not_depend_on_earlier_epochs():
    x, y = _xy(16)
    ds = data.arrays(x, y, batch_size=4, seed=3)
    e0, e1 = _collect(ds.epoch(0)), _collect(ds.epoch(1))
    assert not np.array_equal(np.concatenate([b[0] for b in e0]), np.concatenate([b[0] for b in e1]))
    fresh = data.arrays(x, y, batch_size=4, seed=3)
    assert _same(_collect(fresh.epoch(1)), e1)      # no epoch 0 needed first
    other_seed = data.arrays(x, y, batch_size=4, seed=4)
    assert not _same(_collect(other_seed.epoch(0)), e0)


def test_start_batch_skips_exactly():
    x, y = _xy(11)
    ds = data.arrays(x, y, batch_size=3, augment=data.Augment(), seed=1)
    full = _collect(ds.epoch(4))
    assert _same(_collect(ds.epoch(4, start_batch=2)), full[2:])
    assert _collect(ds.epoch(4, start_batch=len(ds))) == []
    with pytest.raises(DataError, match="start_batch"):
        ds.epoch(0, start_batch=len(ds) + 1)


@pytest.mark.parametrize("x, y, err, words", [
    (np.zeros((4, H, W, 3), "float32"), np.zeros(3), ShapeError, "4 sample"),
    (np.full((2, H, W, 3), np.nan, "float32"), np.zeros(2), DataError, "NaN"),
    (np.zeros((2, H, W, 3), "float32"), np.array([0, np.inf]), DataError, "finite labels"),
    (np.zeros((2, H, W, 3), "float32"), np.array(["a", "b"]), DataError, "numeric labels"),
    (np.zeros((2, H, W, 3), "uint8"), np.zeros(2), DataError, "tl.preprocess"),
    (np.zeros((H, W, 3), "float32"), np.zeros(1), ShapeError, "NHWC"),
    (np.zeros((0, H, W, 3), "float32"), np.zeros(0), ShapeError, "at least one"),
    (np.zeros((2, H, W, 3), "float32"), np.zeros((2, 1, 1)), ShapeError, r"\(N,\) or \(N, K\)"),
])
def test_arrays_rejects_bad_input_with_clear_words(x, y, err, words):
    with pytest.raises(err, match=words):
        data.arrays(x, y)


@pytest.mark.parametrize("kw, words", [
    ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"dtype": "float16"}, "dtype"),
    ({"augment": "yes"}, "Augment"), ({"batch_size": 20, "drop_last": True}, "drop_last"),
])
def test_arrays_rejects_bad_options(kw, words):
    x, y = _xy(10)
    with pytest.raises(DataError, match=words):
        data.arrays(x, y, **kw)


def test_dataset_is_iterated_per_epoch():
    ds = data.arrays(*_xy(4))
    with pytest.raises(TypeError, match=r"epoch\(e\)"):
        iter(ds)


# ----------------------------------------------------------------------------- augmentation

def test_augmentation_keeps_shape_dtype_changes_images_and_is_deterministic():
    x, y = _xy(12)
    ds = data.arrays(x, y, batch_size=12, shuffle=False, augment=data.Augment(), seed=5)
    (a, _), = _collect(ds.epoch(0))
    (b, _), = _collect(ds.epoch(0))
    (c, _), = _collect(ds.epoch(1))
    assert a.shape == x.shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    changed = [not np.allclose(a[i], x[i]) for i in range(12)]
    assert all(changed)
    ds64 = data.arrays(x, y, batch_size=12, shuffle=False, augment=data.Augment(), seed=5,
                       dtype="float64")
    (a64, _), = _collect(ds64.epoch(0))
    assert a64.dtype == np.float64
    np.testing.assert_allclose(a64, a, atol=1e-5)


def test_flip_only_gives_exact_mirrors():
    x, y = _xy(16)
    aug = data.Augment(flip=True, crop_scale=None, rotation=0)
    ds = data.arrays(x, y, batch_size=16, shuffle=False, augment=aug, seed=2)
    (a, _), = _collect(ds.epoch(0))
    same = [np.array_equal(a[i], x[i]) for i in range(16)]
    mirrored = [np.array_equal(a[i], x[i, :, ::-1]) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < 16
    # the general (affine) path gives the same mirror too
    p = np.zeros((2, 6))
    p[:, 0], p[:, 3], p[:, 4] = [1, 0], W, H
    out = data._warp(x[:2], p)
    np.testing.assert_array_equal(out[0], x[0, :, ::-1])
    np.testing.assert_array_equal(out[1], x[1])


def test_augment_draws_are_fixed_whatever_is_switched_on():
    full = data.Augment().sample(np.random.default_rng(0), 8, (H, W))
    no_flip = data.Augment(flip=False).sample(np.random.default_rng(0), 8, (H, W))
    np.testing.assert_array_equal(full[:, 1:], no_flip[:, 1:])
    assert (no_flip[:, 0] == 0).all()
    crop_area = full[:, 3] * full[:, 4] / (H * W)
    assert (crop_area >= 0.8 - 1e-9).all() and (crop_area <= 1 + 1e-9).all()
    assert (full[:, 1] >= 0).all() and (full[:, 1] + full[:, 3] <= W + 1e-9).all()
    assert (np.abs(full[:, 5]) <= np.deg2rad(10) + 1e-12).all()


@needs_pil
def test_rotation_and_crop_match_pillow():
    rng = np.random.default_rng(0)
    img = rng.random((1, H, W, 1))
    pil = Image.fromarray(img[0, ..., 0].astype(np.float32), "F")
    p = np.array([[0, 0, 0, W, H, np.deg2rad(10)]])
    ref = np.asarray(pil.rotate(10, Image.Resampling.BILINEAR))   # counter-clockwise, zero fill
    np.testing.assert_allclose(data._warp(img, p)[0, ..., 0], ref, atol=1e-6)
    p = np.array([[0, 2, 3, 12, 10, 0.0]])                      # crop of 12x10, scaled up 2x
    ref = np.asarray(pil.resize((W, H), Image.Resampling.BILINEAR, box=(2, 3, 14, 13)))
    np.testing.assert_allclose(data._warp(img, p)[0, ..., 0], ref, atol=1e-6)


@pytest.mark.parametrize("kw", [{"crop_scale": (0.5, 1.5)}, {"crop_scale": (0.9, 0.8)},
                                {"rotation": -1}, {"ratio": (2, 1)}])
def test_augment_rejects_bad_settings(kw):
    with pytest.raises(DataError, match="Expected"):
        data.Augment(**kw)


# ----------------------------------------------------------------------------- folders

@needs_pil
def test_folder_classes_labels_and_as_arrays_order(folder):
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = data.image_folder(folder, (H, W), on_error="skip", batch_size=4)
    assert ds.classes == ["cat", "dog", "eel"]          # sorted, hidden folder left out
    assert ds.num_samples == 18 and ds.num_outputs == 3 and ds.image_shape == (H, W, 3)
    assert ds.skipped == [os.path.join(folder, "dog", "broken.jpg")]
    assert len(ds) == 5 and ds.files[5] == os.path.join(folder, "cat", "nested", "cat5.JPG")
    x, y = ds.as_arrays()
    assert x.shape == (18, H, W, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(y, np.repeat(np.eye(3), 6, axis=0))
    png = np.asarray(Image.open(ds.files[0]).convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(x[0], png)
    xs, ys = map(np.concatenate, zip(*ds.epoch(0)))
    assert xs.shape == x.shape and ys.sum(axis=1).tolist() == [1.0] * 18


@needs_pil
def test_folder_two_classes_is_one_binary_column_and_classes_argument(two_class):
    ds = data.image_folder(two_class, (H, W))
    assert ds.classes == ["neg", "pos"] and ds.num_outputs == 1
    _, y = ds.as_arrays()
    assert y.shape == (10, 1) and y[:, 0].tolist() == [0.0] * 5 + [1.0] * 5
    flipped = data.image_folder(two_class, (H, W), classes=["pos", "neg"])
    assert flipped.as_arrays()[1][:, 0].tolist() == [0.0] * 5 + [1.0] * 5
    assert flipped.files[0].endswith(os.path.join("pos", "0.png"))


@needs_pil
def test_folder_resizes_and_preprocess_hook(two_class):
    seen = []

    def pre(batch):
        seen.append(batch.dtype)
        return batch.astype(np.float32) / 255 * 2 - 1

    ds = data.image_folder(two_class, 8, preprocess=pre, shuffle=False, workers=0)
    x, _ = ds.as_arrays()
    assert x.shape == (10, 8, 8, 3) and -1 <= x.min() and x.max() <= 1
    assert set(seen) == {np.dtype(np.uint8)}
    ref = Image.open(ds.files[0]).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(x[0], np.asarray(ref, np.float32) / 255 * 2 - 1, atol=1e-6)
    aug = data.image_folder(two_class, 8, preprocess=pre, augment=data.Augment(), workers=0)
    next(iter(aug.epoch(0)))
    assert seen[-1] == np.float32                  # augmented batches reach the hook as float
    with pytest.raises(DataError, match="preprocess"):
        data.image_folder(two_class, 8, preprocess=lambda b: b[:, :4]).as_arrays()


@needs_pil
def test_folder_same_seed_same_batches_any_threads(folder):
    def run(workers, prefetch):
        ds = data.image_folder(folder, (H, W), on_error="skip", batch_size=5, seed=11,
                               augment=data.Augment(), workers=workers, prefetch=prefetch)
        return _collect(ds.epoch(3))

    with pytest.warns(UserWarning):
        a, b, c = run(0, 0), run(2, 2), run(2, 2)
    assert _same(a, b) and _same(b, c)


@needs_pil
def test_folder_start_batch_does_not_decode_skipped_batches(two_class, monkeypatch):
    ds = data.image_folder(two_class, (H, W), batch_size=3, workers=0)
    full = _collect(ds.epoch(1))
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda p, hw: calls.append(p) or real(p, hw))
    assert _same(_collect(ds.epoch(1, start_batch=2)), full[2:])
    assert len(calls) == 10 - 6


@needs_pil
def test_folder_corrupt_file_raises_naming_it(folder):
    with pytest.raises(DataError, match=r"broken\.jpg.*on_error='skip'"):
        data.image_folder(folder, (H, W))


@needs_pil
def test_folder_truncated_pixels_fail_at_batch_time(tmp_path):
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            _write_image(tmp_path / c / f"{i}.png", rng)
    good = (tmp_path / "b" / "2.png").read_bytes()
    (tmp_path / "b" / "2.png").write_bytes(good[: len(good) // 2])   # header fine, pixels cut
    ds = data.image_folder(tmp_path, (H, W), shuffle=False, batch_size=4)
    with pytest.raises(DataError, match=r"2\.png"):
        _collect(ds.epoch(0))
    ds = data.image_folder(tmp_path, (H, W), on_error="skip", shuffle=False, batch_size=4)
    with pytest.warns(UserWarning, match="could not be decoded"):
        sizes = [len(x) for x, _ in ds.epoch(0)]
    assert sizes == [4, 1] and ds.skipped == [str(tmp_path / "b" / "2.png")]
    ds = data.image_folder(tmp_path, (H, W), on_error="skip", shuffle=False, batch_size=1)
    with pytest.warns(UserWarning):
        assert len(_collect(ds.epoch(0))) == len(ds) - 1    # its all-failed batch is left out
    assert len(ds.as_arrays()[0]) == 5


@needs_pil
def test_indexed_batches_name_the_samples_of_every_row(tmp_path):
    """The whole set one batch at a time, each row keyed by its sample index: an image that
    fails to decode under on_error='skip' is left out of its batch and of the indices."""
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            _write_image(tmp_path / c / f"{i}.png", rng)
    good = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(good[: len(good) // 2])   # header fine, pixels cut
    ds = data.image_folder(tmp_path, (H, W), on_error="skip", batch_size=3, seed=0)
    with pytest.warns(UserWarning, match="could not be decoded"):
        batches = [(i.copy(), x.copy(), y.copy()) for i, x, y in ds.indexed_batches()]
    assert [i.tolist() for i, _, _ in batches] == [[0, 2], [3, 4, 5], [6, 7]]
    for idx, x, y in batches:
        assert len(x) == len(y) == len(idx) <= ds.batch_size
        np.testing.assert_array_equal(y, ds.labels[idx])
        for i, row in zip(idx, x):
            np.testing.assert_array_equal(row, data._decode(ds.files[i], (H, W)) / np.float32(255))
    x, y = ds.as_arrays()
    np.testing.assert_array_equal(x, np.concatenate([b[1] for b in batches]))


@needs_pil
def test_folder_layout_errors(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        data.image_folder(tmp_path / "nope", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="at least 2 class sub-folders"):
        data.image_folder(empty, 8)
    _write_image(empty / "loose.png", np.random.default_rng(0))
    with pytest.raises(DataError, match="directly"):
        data.image_folder(empty, 8)
    (empty / "a").mkdir()
    (empty / "b").mkdir()
    _write_image(empty / "a" / "x.png", np.random.default_rng(0))
    with pytest.raises(DataError, match=r"empty.b; received none"):
        data.image_folder(empty, 8)
    with pytest.raises(DataError, match="not found"):
        data.image_folder(folder, 8, classes=["cat", "cow"], on_error="skip")
    with pytest.raises(DataError, match="on_error"):
        data.image_folder(folder, 8, on_error="ignore")
    with pytest.raises(ShapeError, match="image_size"):
        data.image_folder(folder, (8, 0))


# ----------------------------------------------------------------------------- threads, imports

def _data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tlbridge-data")]


def test_stopping_early_leaves_no_threads():
    x, y = _xy(40)
    ds = data.arrays(x, y, batch_size=2, augment=data.Augment(), workers=2, prefetch=3)
    it = ds.epoch(0)
    next(it)
    assert _data_threads()
    it.close()
    assert _data_threads() == []
    for _ in ds.epoch(1):
        break
    assert _data_threads() == []
    it = ds.epoch(2)
    next(it)
    del it                                              # dropped, not closed
    assert _data_threads() == []


def test_importing_data_imports_no_framework_nor_pillow():
    code = ("import sys, tlbridge.data; "
            "print([m for m in ('torch', 'tensorflow', 'keras', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_arrays_hold_any_finite_labels_and_the_model_s_loss_judges_them():
    """{0, 1} is BCE's rule, not the dataset's: class indices (CE) and real values (MSE) are
    data too. A BCE model refuses other labels before training (tests/test_bad_input.py)."""
    x = np.zeros((2, H, W, 3), "float32")
    for y in (np.array([0, 2]), np.array([0.5, 1])):
        assert data.arrays(x, y).labels.shape == (2, 1)
