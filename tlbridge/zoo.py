"""The catalog: portable backbones (both backends, identical function) and native ones.

Adding a portable backbone is local: one entry here, one torch builder in
`backends/torch/backbones.py`, one Keras mirror in `backends/keras/backbones.py`.
The parity tests pick it up from `PORTABLE` automatically.
"""
from __future__ import annotations

import difflib

from .errors import NoPretrainedWeightsError, ShapeError, UnknownBackboneError
from .specs import BackboneInfo, InputSpec, Preprocessing

_RGB01 = Preprocessing()

PORTABLE: dict[str, BackboneInfo] = {
    info.name: info
    for info in [
        BackboneInfo(
            "seed_vgg", True, "vgg",
            defaults=(("widths", (16, 32, 64)), ("batch_norm", False)),
            preprocessing=_RGB01, pretrained=False,
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
        BackboneInfo(
            "token_bag", True, "text", inputs="tokens", pretrained=False,
            defaults=(("vocab_size", 1000), ("dim", 64)),
            doc="A small text encoder with two inputs (input_ids, attention_mask): token "
                "embeddings (nn.Embedding), their mean over the attention mask, then Linear + "
                "tanh (`dim` features). The house's two-input model: text pipelines, sharding "
                "and checkpoints run on it without a transformer's cost.",
        ),
    ]
}

GATE = "fused_gate"     # the gated model inside a fusion takes its members' images


def signature(backbone: str, input_shape: tuple, options: tuple | dict = ()) -> tuple:
    """The model's declared inputs (InputSpec, in order): one "images" (H, W, C) float input for
    image backbones; "input_ids" and "attention_mask" (L,) int64 for token backbones, whose
    input_shape is (L,) (the longest sequence they take; batches may be shorter)."""
    info = PORTABLE.get(backbone)
    if info is not None and info.inputs == "tokens":
        vocab = dict(options).get("vocab_size")
        return (InputSpec("input_ids", (None,), "int64", "tokens", vocab),
                InputSpec("attention_mask", (None,), "int64", "mask"))
    return (InputSpec("images", tuple(input_shape), "float", "image"),)


def check_input_shape(backbone: str, input_shape) -> tuple:
    """input_shape as the backbone's kind of input takes it: (H, W, C) for images (default
    (224, 224, 3)), (L,) for tokens (default (128,))."""
    tokens = backbone in PORTABLE and PORTABLE[backbone].inputs == "tokens"
    if input_shape is None:                 # the kind's default
        input_shape = (128,) if tokens else (224, 224, 3)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if tokens and (len(shape) != 1 or shape[0] < 1):
        raise ShapeError(f"Expected input_shape as (max_length,) for the token backbone "
                         f"{backbone!r}; received {input_shape!r}.")
    if not tokens and (len(shape) != 3 or min(shape) < 1):
        raise ShapeError(f"Expected input_shape as (height, width, channels) of positive ints; "
                         f"received {input_shape!r}.")
    return shape


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


# (kernel, stride, padding) of each layer that shrinks the image, in order; layers that keep
# the size (3x3 convs with padding 1, adaptive pooling) are left out
_POOL2 = (2, 2, 0)
_RESNET_STEPS = ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1))
_STEPS = {
    "vgg16": (_POOL2,) * 5,
    "resnet18": _RESNET_STEPS,
    "resnet50": _RESNET_STEPS,
    "mobilenet_v2": ((3, 2, 1),) * 5,
    "efficientnet_b0": ((3, 2, 1), (3, 2, 1), (5, 2, 2), (3, 2, 1), (5, 2, 2)),
    "convnext_tiny": ((4, 4, 0), _POOL2, _POOL2, _POOL2),
}
PORTABLE_CHANNELS = 3   # torchvision builds every portable backbone for RGB


def spatial_steps(name: str, options: dict) -> tuple:
    """The shrinking layers of portable backbone `name` with builder `options`."""
    if name == "seed_vgg":
        return (_POOL2,) * len(tuple(options.get("widths", ())))
    return _STEPS.get(name, ())


def _survives(side: int, steps) -> bool:
    for kernel, stride, padding in steps:
        side = (side + 2 * padding - kernel) // stride + 1
        if side < 1:
            return False
    return True


def min_input_side(name: str, options: dict) -> int:
    """The smallest height (and width) that leaves at least one pixel after every shrinking
    layer of portable backbone `name`."""
    steps = spatial_steps(name, options)
    side = 1
    while not _survives(side, steps):
        side += 1
    return side


def check_portable_input(name: str, options: dict, input_shape: tuple) -> None:
    """Refuse, before anything is built, an input shape a portable backbone cannot take:
    too small for its downsampling, or not RGB."""
    if PORTABLE[name].inputs != "image":
        return
    h, w, c = input_shape
    side = min_input_side(name, options)
    if h < side or w < side:
        n = len(spatial_steps(name, options))
        raise ShapeError(
            f"Expected input_shape of at least ({side}, {side}, {c}) for {name!r}: its {n} "
            f"downsampling layer(s) would leave nothing of a smaller image; received "
            f"{tuple(input_shape)}. Load the backbone with input_shape=({max(h, side)}, "
            f"{max(w, side)}, {c}) or larger and resize the images to it.")
    if c != PORTABLE_CHANNELS:
        raise ShapeError(
            f"Expected input_shape with {PORTABLE_CHANNELS} channels (RGB) for the portable "
            f"backbone {name!r}; received {tuple(input_shape)}. Repeat grey images to RGB "
            f"(np.repeat(x, 3, axis=-1)) and load it with input_shape=({h}, {w}, 3).")


def check_pretrained(info: BackboneInfo) -> None:
    if not info.pretrained:
        raise NoPretrainedWeightsError(
            f"Expected weights=None or a checkpoint file for {info.name!r}, which has no "
            f"pretrained weights; received weights='imagenet'. Use weights=None (seeded random "
            f"init) or weights=<path>, or pick a backbone with ImageNet weights "
            f"({', '.join(n for n, i in sorted(PORTABLE.items()) if i.pretrained)}).")
