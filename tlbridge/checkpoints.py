"""Read backbone checkpoints from either ecosystem into canonical (torch state_dict) names.

Sources: safetensors (ours or a converted torchvision state_dict), torchvision/PyTorch
`.pth`/`.pt` state_dicts (read with `torch.load(weights_only=True)`: tensors only, never
arbitrary pickled objects), and keras.applications VGG16 weights (`.h5` legacy or Keras 3
`.weights.h5`). Frameworks are imported inside the functions that need them.
"""
from __future__ import annotations

import os
import pickle
import re

import numpy as np

from . import weights as wio
from .errors import BackendNotInstalledError, CheckpointError
from .specs import CAFFE, Preprocessing

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
# torchvision's classifier attribute names: their weights are dropped from a full checkpoint
CLASSIFIERS = ("fc.", "classifier.", "head.", "heads.", "aux_logits.", "AuxLogits.")
# torchvision vgg16 `features` indices of its 13 convs, in the order Keras' VGG16 creates them
VGG16_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def read(path, backbone: str, expected: dict[str, tuple]) -> tuple[dict[str, np.ndarray], Preprocessing | None]:
    """Canonical backbone tensors from `path`, and the preprocessing those weights need
    (None: the catalog default)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Expected a weights file; received {path!r}, which does not exist.")
    lower = path.lower()
    if lower.endswith(KERAS_SUFFIXES):
        if backbone != "vgg16":
            raise CheckpointError(
                f"Keras .h5 weights are read for 'vgg16' (keras.applications.VGG16); received "
                f"{path!r} for {backbone!r}. Convert other Keras weights with tl.save on the "
                f"keras backend, or pass a torchvision .pth / safetensors file.")
        return keras_vgg16(path), CAFFE
    if lower.endswith(TORCH_SUFFIXES):
        raw = torch_state_dict(path)
    else:
        raw, meta = wio.load_file(path)
        if meta.get("format", "").startswith("tlbridge.model"):
            raw = {k: v for k, v in raw.items() if k.startswith("backbone.")}
    return to_canonical(raw, expected), None


def to_canonical(state: dict, expected: dict) -> dict[str, np.ndarray]:
    """torchvision names -> `backbone.` names; drop num_batches_tracked and the classifier."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key if key.startswith("backbone.") else "backbone." + key
        if name not in expected and key.startswith(CLASSIFIERS):
            continue
        out[name] = np.asarray(value)
    return out


def torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"Reading the PyTorch checkpoint {path!r} needs torch, which is not installed. "
            'Install it (pip install "tlbridge[torch]"), or convert the file to safetensors '
            "where torch is installed: safetensors.torch.save_file(torch.load(p), 'w.safetensors').") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():   # a damaged pickle stream, not a refusal
            raise _corrupt_torch_file(path, exc) from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (such as {found.group(1)})" if found else ""
        raise CheckpointError(
            f"Expected a PyTorch state_dict (tensors only) saved with torch.save; {path!r} holds "
            f"other pickled objects{what}, which torch.load(weights_only=True) refused. tlbridge "
            "never unpickles arbitrary objects; save model.state_dict(), not the model.") from exc
    except Exception as exc:  # truncated zip, EOF in a legacy pickle, not a torch file at all
        raise _corrupt_torch_file(path, exc) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"Expected a state_dict (dict of tensors) in {path!r}; received "
                              f"{type(obj).__name__}.")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()   # torch bolds parts of its messages
    return text.splitlines()[0] if text else type(exc).__name__


def _corrupt_torch_file(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Expected a complete PyTorch checkpoint saved with torch.save; {path!r} "
        f"({os.path.getsize(path)} bytes) could not be read: it is truncated or corrupt "
        f"({type(exc).__name__}: {_first_line(exc)}). Download or save the file again.")


def keras_vgg16(path: str) -> dict[str, np.ndarray]:
    """keras.applications VGG16 conv weights (legacy .h5 or Keras 3 .weights.h5) as torch names."""
    try:
        import h5py
    except ImportError as exc:
        raise BackendNotInstalledError('Reading Keras .h5 weights needs h5py: pip install h5py') from exc
    try:
        with h5py.File(path, "r") as f:
            convs = _legacy_convs(f) if "layer_names" in f.attrs else _keras3_convs(f)
    except (OSError, KeyError) as exc:
        raise CheckpointError(f"Expected keras.applications VGG16 weights in HDF5; could not read "
                              f"{path!r}: {exc}") from exc
    if len(convs) != len(VGG16_CONV_INDEX):
        raise CheckpointError(f"Expected the 13 conv layers of Keras' VGG16 in {path!r}; found "
                              f"{len(convs)}.")
    out = {}
    for idx, (kernel, bias) in zip(VGG16_CONV_INDEX, convs):
        out[f"backbone.features.{idx}.weight"] = np.transpose(kernel, (3, 2, 0, 1))  # HWIO -> OIHW
        out[f"backbone.features.{idx}.bias"] = bias
    return out


def _legacy_convs(f):
    convs = []
    for name in f.attrs["layer_names"]:
        name = name.decode() if isinstance(name, bytes) else name
        group = f[name]
        arrays = [np.asarray(group[w.decode() if isinstance(w, bytes) else w])
                  for w in group.attrs.get("weight_names", [])]
        if len(arrays) == 2 and arrays[0].ndim == 4:
            convs.append((arrays[0], arrays[1]))
    return convs


def _keras3_convs(f):
    layers = f["layers"]

    def order(name):  # conv2d, conv2d_1, ..., conv2d_12: creation order
        m = re.search(r"_(\d+)$", name)
        return int(m.group(1)) if m else 0

    convs = []
    for name in sorted(layers, key=order):
        group = layers[name].get("vars")
        if group is not None and "0" in group and group["0"].ndim == 4:
            convs.append((np.asarray(group["0"]), np.asarray(group["1"])))
    return convs


def torchvision_imagenet(backbone: str) -> dict[str, np.ndarray]:
    """torchvision's ImageNet weights for a portable backbone, through torchvision's own
    download helper and cache (used by the Keras backend)."""
    try:
        import torchvision
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"weights='imagenet' for {backbone!r} on Keras translates torchvision's checkpoint, "
            "which needs torchvision to download it. Install tlbridge[torch], or pass "
            "weights=<path to the torchvision .pth or a safetensors file>.") from exc
    try:
        enum = torchvision.models.get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"torchvision has no ImageNet weights for {backbone!r}; use "
                              "weights=None or a file path.") from exc
    state = enum.get_state_dict(progress=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}
