"""The catalog: portable backbones (both backends, identical function) and native ones.

Adding a portable backbone is local: one entry here, one torch builder in
`backends/torch/backbones.py`, one Keras mirror in `backends/keras/backbones.py`.
The parity tests pick it up from `PORTABLE` automatically.
"""
from __future__ import annotations

import difflib

from .errors import UnknownBackboneError
from .specs import BackboneInfo, Preprocessing

_RGB01 = Preprocessing()

PORTABLE: dict[str, BackboneInfo] = {
    info.name: info
    for info in [
        BackboneInfo(
            "seed_vgg", True, "vgg",
            defaults=(("widths", (16, 32, 64)), ("batch_norm", False)),
            preprocessing=_RGB01,
            doc="VGG-style stack: per width a conv3x3+ReLU(+BN)+maxpool2x2 block, then flatten "
                "(channel-major, as PyTorch flattens). Built with torchvision.models.vgg.make_layers.",
        ),
        BackboneInfo(
            "vgg16", True, "vgg", preprocessing=_RGB01,
            doc="torchvision vgg16: features, AdaptiveAvgPool2d(7), flatten (25088 features).",
        ),
        BackboneInfo(
            "resnet18", True, "resnet", preprocessing=_RGB01,
            doc="torchvision resnet18 up to global average pooling (512 features).",
        ),
        BackboneInfo(
            "resnet50", True, "resnet", preprocessing=_RGB01,
            doc="torchvision resnet50 (v1.5: the stride sits in the 3x3 conv of the bottleneck) up "
                "to global average pooling (2048 features).",
        ),
        BackboneInfo(
            "mobilenet_v2", True, "mobilenet", preprocessing=_RGB01,
            doc="torchvision mobilenet_v2: features (ReLU6, depthwise convs, inverted residuals), "
                "global average pooling (1280 features).",
        ),
        BackboneInfo(
            "efficientnet_b0", True, "efficientnet", preprocessing=_RGB01,
            defaults=(("stochastic_depth_prob", 0.0),),
            doc="torchvision efficientnet_b0: features (SiLU, squeeze-excitation), global average "
                "pooling (1280 features). Stochastic depth is off by default on both backends "
                "(torchvision trains with 0.2): parity needs it off, since a train-mode pass would "
                "drop rows at random; with p > 0 only eval mode agrees across backends.",
        ),
        BackboneInfo(
            "convnext_tiny", True, "convnext", preprocessing=_RGB01,
            defaults=(("stochastic_depth_prob", 0.0),),
            doc="torchvision convnext_tiny: features, global average pooling, the classifier's "
                "LayerNorm2d + flatten (768 features). Stochastic depth off by default, as for "
                "efficientnet_b0 (torchvision trains with 0.1).",
        ),
    ]
}


def is_portable(name: str) -> bool:
    return name in PORTABLE


def info(name: str, native_names: list[str], backend: str) -> BackboneInfo:
    """Catalog entry for `name` on `backend`, or UnknownBackboneError with close matches."""
    if name in PORTABLE:
        return PORTABLE[name]
    if name in native_names:
        return BackboneInfo(name, False, "native", doc=f"{backend}-native backbone")
    candidates = sorted(set(PORTABLE) | set(native_names))
    close = difflib.get_close_matches(str(name), candidates, n=5, cutoff=0.6)
    if not close:  # case-insensitive second chance (e.g. 'ResNet50' vs 'resnet50')
        lower = {c.lower(): c for c in candidates}
        close = [lower[c] for c in difflib.get_close_matches(str(name).lower(), list(lower), n=5)]
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone {name!r} for backend {backend!r}.{hint} Expected a portable backbone "
        f"({', '.join(sorted(PORTABLE))}) or one of the {len(native_names)} {backend}-native "
        f"names from tl.list_backbones(backend={backend!r})."
    )
