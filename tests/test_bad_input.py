"""One test per row of the README's bad-input table: the exception type (tlbridge's and the
builtin one) and a phrase of its message; failed writes leave the model as it was."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import small_model

import tlbridge as tl
from tlbridge import errors, registry
from tlbridge import weights as wio


def _x(n=2):
    return np.random.default_rng(0).normal(size=(n, 32, 32, 3)).astype("float32")


def test_unknown_backend_argument():
    with pytest.raises(errors.UnknownBackendError, match=r"Expected one of \['keras', 'torch'\]") as e:
        tl.set_backend("trch")
    assert isinstance(e.value, ValueError) and "backend='trch'" in str(e.value)


def test_unknown_backend_from_environment_variable():
    code = "import tlbridge as tl; tl.get_backend()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TLBRIDGE_BACKEND": "trch"})
    assert out.returncode != 0
    assert "UnknownBackendError" in out.stderr
    assert "environment variable TLBRIDGE_BACKEND='trch'" in out.stderr


def test_backend_not_installed_names_the_pip_extra(monkeypatch):
    fake = registry.BackendEntry("torch", "tlbridge.backends.torch",
                                 ("tlbridge_no_such_framework",), 'pip install "tlbridge[torch]"')
    monkeypatch.setitem(registry.BACKENDS, "torch", fake)
    monkeypatch.setattr(registry, "_loaded", {})
    with pytest.raises(errors.BackendNotInstalledError, match=r'pip install "tlbridge\[torch\]"') as e:
        tl.load_backbone("resnet18", backend="torch")
    assert isinstance(e.value, ImportError)


def test_unknown_backbone_suggests_close_matches(backend):
    with pytest.raises(errors.UnknownBackboneError, match="Did you mean: 'resnet18'") as e:
        tl.load_backbone("resnt18", backend=backend)
    assert isinstance(e.value, KeyError)


def test_channels_first_input_is_refused_with_a_hint(backend):
    m = small_model(backend)
    with pytest.raises(errors.ShapeError, match=r"NCHW.*transpose\(0, 2, 3, 1\)") as e:
        tl.predict(m, _x().transpose(0, 3, 1, 2))
    assert isinstance(e.value, ValueError) and "Expected x of shape (N, 32, 32, 3)" in str(e.value)


def test_wrong_channel_count(backend):
    m = small_model(backend)
    with pytest.raises(errors.ShapeError, match="takes 3 channel"):
        tl.features(m, np.zeros((2, 32, 32, 1), "float32"))


def test_labels_outside_zero_one(backend):
    m = small_model(backend)
    with pytest.raises(errors.DataError, match=r"labels in \{0, 1\}.*e\.g\. \[2\.0\]") as e:
        tl.bce_loss_and_grads(m, _x(), np.array([0, 2]))
    assert isinstance(e.value, ValueError)


def test_labels_of_the_wrong_shape(backend):
    m = small_model(backend, num_outputs=3)
    with pytest.raises(errors.ShapeError, match=r"shape \(2, 3\).*received \(2,\)"):
        tl.bce_loss_and_grads(m, _x(), np.array([0, 1]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_images(backend, bad):
    m = small_model(backend)
    x = _x()
    x[1, 3, 4, 0] = bad
    with pytest.raises(errors.DataError, match="1 NaN/inf value"):
        tl.predict(m, x)


def test_weights_dict_of_another_architecture_lists_keys_and_changes_nothing(backend):
    m = small_model(backend)
    before = tl.get_weights(m)
    other = tl.get_weights(small_model(backend, widths=(8, 32)))
    other["backbone.extra.weight"] = np.zeros(3)
    with pytest.raises(errors.WeightsMismatchError) as e:
        tl.set_weights(m, other)
    msg = str(e.value)
    assert "missing keys [backbone.features.6.weight" in msg
    assert "unexpected keys [backbone.extra.weight]" in msg
    assert "backbone.features.0.weight: expected (16, 3, 3, 3), received (8, 3, 3, 3)" in msg
    assert e.value.missing and e.value.unexpected and e.value.mismatched
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_partly_valid_weights_write_nothing(backend):
    m = small_model(backend)
    before = tl.get_weights(m)
    w = {k: v + 1 for k, v in before.items()}
    w["head.bias"] = np.array([np.nan])
    with pytest.raises(errors.WeightsMismatchError, match="NaN/inf in \\[head.bias\\]"):
        tl.set_weights(m, w)
    assert all(np.array_equal(before[k], tl.get_weights(m)[k]) for k in before)


def test_weights_file_of_another_architecture(backend, tmp_path):
    tl.save(small_model(backend, widths=(8,)), tmp_path / "other.safetensors")
    with pytest.raises(errors.WeightsMismatchError, match="do not fit"):
        tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3),
                         weights=tmp_path / "other.safetensors")


def test_truncated_file(backend, tmp_path):
    path = tmp_path / "m.safetensors"
    tl.save(small_model(backend), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match="truncated or not safetensors") as e:
        tl.load(path)
    assert isinstance(e.value, ValueError)


def test_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am not a tensor file")
    with pytest.raises(errors.CheckpointError, match="truncated or not safetensors"):
        tl.load(path)


def test_safetensors_without_tlbridge_spec(tmp_path):
    wio.save_file(tmp_path / "plain.safetensors", {"a": np.zeros(2)}, {})
    with pytest.raises(errors.CheckpointError, match="Expected a tlbridge model file"):
        tl.load(tmp_path / "plain.safetensors")


def test_failed_load_leaves_existing_model_untouched(backend, tmp_path):
    """The file reads fine and every tensor has the right name, shape and a finite value; one
    of them overflows the float32 model, so the write itself must refuse, before any tensor
    (all of which differ from the model's) is written."""
    m = small_model(backend)
    before = tl.get_weights(m)
    w = {k: v.astype("float64") + 1 for k, v in before.items()}
    w["backbone.features.3.weight"][0, 0, 0, 0] = 1e39          # finite in fp64, inf in fp32
    wio.save_file(tmp_path / "big.safetensors", w, {})
    tensors = wio.load_file(tmp_path / "big.safetensors")[0]    # reading succeeds
    assert sorted(tensors) == sorted(before) and all(np.isfinite(v).all() for v in tensors.values())
    with pytest.raises(errors.WeightsMismatchError,
                       match=r"overflow to inf in float32.*backbone\.features\.3\.weight|"
                             r"backbone\.features\.3\.weight.*overflow to inf in float32") as e:
        tl.set_weights(m, tensors)
    assert isinstance(e.value, ValueError) and "left unchanged" in str(e.value)
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(v).all() for v in after.values())


def test_freeze_spec_matching_nothing(backend):
    m = small_model(backend)
    with pytest.raises(errors.FreezeSpecError, match="'backbone.layer9.*' matches no parameter") as e:
        tl.freeze(m, "backbone.layer9.*")
    assert isinstance(e.value, ValueError) and not m.frozen


def test_predict_without_a_head(backend):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="replace_head") as e:
        tl.predict(m, _x())
    assert isinstance(e.value, errors.NoHeadError) and "received a bare backbone" in str(e.value)


def test_something_else_than_a_model():
    with pytest.raises(TypeError, match="Expected a tlbridge TransferModel.*received str") as e:
        tl.predict("model.safetensors", _x())
    assert isinstance(e.value, errors.ArgumentTypeError)


def test_weights_of_the_wrong_type(backend):
    with pytest.raises(TypeError, match=r"Expected weights=None, 'imagenet' or a file path.*"
                                        r"received dict.*tl\.set_weights") as e:
        tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), weights={})
    assert isinstance(e.value, errors.ArgumentTypeError)


def test_unknown_backbone_option(backend):
    with pytest.raises(TypeError, match=r"unknown option 'width'.*Expected one of "
                                        r"\['batch_norm', 'widths'\]; received width=\(8,\)") as e:
        tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), width=(8,))
    assert isinstance(e.value, errors.UnknownOptionError)
    assert isinstance(e.value, errors.TLBridgeError)


def test_imagenet_weights_for_a_backbone_without_them(backend):
    with pytest.raises(ValueError, match=r"Expected weights=None or a checkpoint file for "
                                         r"'seed_vgg'.*received weights='imagenet'") as e:
        tl.load_backbone("seed_vgg", backend=backend, weights="imagenet", input_shape=(32, 32, 3))
    assert isinstance(e.value, errors.NoPretrainedWeightsError)


@pytest.mark.parametrize("name, shape, options, least", [
    ("vgg16", (16, 16, 3), {}, 32),
    ("convnext_tiny", (64, 31, 3), {}, 32),
    ("seed_vgg", (32, 7, 3), {"widths": (4, 4, 4)}, 8),
])
def test_input_too_small_for_the_backbone(backend, name, shape, options, least):
    """Refused before anything is built: the frameworks fail deep inside (or, on Keras with
    seed_vgg, build a model with no pixels left)."""
    with pytest.raises(errors.ShapeError, match=rf"Expected input_shape of at least \({least}, "
                                                rf"{least}, 3\) for '{name}'.*received "
                                                rf"{re.escape(str(shape))}.*input_shape=") as e:
        tl.load_backbone(name, backend=backend, input_shape=shape, **options)
    assert isinstance(e.value, ValueError)


def test_smallest_input_the_backbone_takes(backend):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(8, 8, 3), widths=(4, 4, 4))
    assert tl.features(m, np.zeros((1, 8, 8, 3), "float32")).shape == (1, 4)


def test_grey_input_shape_for_a_portable_backbone(backend):
    """torchvision builds the portable backbones for RGB; the Keras mirror would silently
    build a 1-channel model that no longer matches its torch twin."""
    with pytest.raises(errors.ShapeError, match=r"Expected input_shape with 3 channels.*received "
                                                r"\(32, 32, 1\).*np\.repeat") as e:
        tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 1))
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("hidden", [(0,), (16, -2)])
def test_hidden_layer_without_units(backend, hidden):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), widths=(4,))
    with pytest.raises(errors.ShapeError, match=rf"Expected hidden layer widths as ints >= 1; "
                                                rf"received hidden={re.escape(str(hidden))}.*hidden=\(\)") as e:
        tl.replace_head(m, 1, hidden=hidden)
    assert isinstance(e.value, ValueError)


def test_hidden_as_a_bare_int(backend):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), widths=(4,))
    with pytest.raises(TypeError, match=r"Expected hidden as a tuple of layer widths; received int "
                                        r"16\. Write hidden=\(16,\)") as e:
        tl.replace_head(m, 1, hidden=16)
    assert isinstance(e.value, errors.ArgumentTypeError)


def test_freeze_spec_none(backend):
    m = small_model(backend)
    with pytest.raises(errors.FreezeSpecError, match=r"Expected a freeze spec.*received NoneType "
                                                     r"None") as e:
        tl.freeze(m, None)
    assert isinstance(e.value, TypeError) and not m.frozen


def test_uint8_images_point_to_preprocess(backend):
    m = small_model(backend)
    with pytest.raises(errors.DataError, match="tl.preprocess"):
        tl.predict(m, np.zeros((1, 32, 32, 3), np.uint8))


def test_grouped_conv_has_no_keras_mirror_yet():
    keras = pytest.importorskip("keras")
    from tlbridge.backends.keras.network import Mirror
    with pytest.raises(NotImplementedError, match="groups=2") as e:
        Mirror("float32").conv(keras.Input((8, 8, 4)), "c", 4, 3, groups=2)
    assert isinstance(e.value, errors.UnsupportedLayerError)
    assert "Expected groups=1 or a depthwise conv" in str(e.value)


def test_iterating_a_dataset_instead_of_an_epoch():
    ds = tl.data.arrays(_x(4), np.zeros((4, 1), "float32"))
    with pytest.raises(TypeError, match=r"Expected an iterable of batches; received a "
                                        r"tl\.data\.Dataset.*ds\.epoch\(e\)") as e:
        iter(ds)
    assert isinstance(e.value, errors.ArgumentTypeError)


@pytest.mark.parametrize("value", [np.array(["x"]), np.array([None], dtype=object)],
                         ids=["str", "object"])
def test_non_numeric_weight_names_key_and_dtypes(backend, value):
    m = small_model(backend)
    before = tl.get_weights(m)
    w = dict(before, **{"head.bias": value})
    with pytest.raises(errors.WeightsMismatchError,
                       match=r"Expected weights of a real numeric dtype \(float32 or float64.*"
                             rf"received \[head\.bias: {re.escape(str(value.dtype))}\]") as e:
        tl.set_weights(m, w)
    assert isinstance(e.value, ValueError) and "left unchanged" in str(e.value)
    assert all(np.array_equal(before[k], tl.get_weights(m)[k]) for k in before)


def test_pickled_whole_model_names_the_pickled_class(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.save({"model": torchvision.models.resnet18()}, tmp_path / "whole_model.pth")
    with pytest.raises(errors.CheckpointError, match=r"holds other pickled objects \(such as "
                                                     r"torchvision\.models\.resnet\.ResNet\).*"
                                                     r"save model\.state_dict\(\)") as e:
        tl.load_backbone("resnet18", backend="torch", weights=tmp_path / "whole_model.pth",
                         input_shape=(32, 32, 3))
    assert isinstance(e.value, ValueError)


def _offline(monkeypatch, tmp_path):
    """No network: every download the frameworks attempt fails as DNS does on a machine
    without one, and their caches point at empty folders."""
    import importlib.util
    import urllib.error

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("torch", "keras"):     # through tlbridge: it loads torch's Triton before TF
        if registry.is_installed(name):
            registry.load(name)
    if importlib.util.find_spec("torch"):
        import torch.hub
        monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    if importlib.util.find_spec("keras"):
        from keras.src.backend import config
        from keras.src.utils import file_utils
        monkeypatch.setattr(file_utils, "urlretrieve", unreachable)
        monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras"))


@pytest.mark.parametrize("name, shape", [("resnet18", (32, 32, 3)), ("native", (32, 32, 3))])
def test_imagenet_weights_without_network_say_where_from_and_how_to_pass_a_file(
        backend, name, shape, monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    if name == "native":
        name = "squeezenet1_0" if backend == "torch" else "VGG16"
    with pytest.raises(errors.WeightsDownloadError,
                       match=rf"fetch the ImageNet weights of '{name}' from .*(URLError|URL fetch).*"
                             rf"weights='path/to/checkpoint'") as e:
        tl.load_backbone(name, weights="imagenet", backend=backend, input_shape=shape)
    assert isinstance(e.value, OSError)
