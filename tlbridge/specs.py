"""Frozen dataclasses describing backbones and heads: the data both backends build from."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UnknownOptionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 RGB images become model input: x = (img[..., order] * scale - mean) / std.

    torchvision's convention is the default (RGB, [0, 1], ImageNet mean/std); weights
    trained by keras.applications' VGG16 use CAFFE below (BGR, [0, 255], mean-centred).
    """

    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    color: str = "RGB"
    scale: float = 1.0 / 255.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(tuple(d["mean"]), tuple(d["std"]), d["color"], float(d["scale"]))


TORCHVISION = Preprocessing()
CAFFE = Preprocessing(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), color="BGR", scale=1.0)


@dataclass(frozen=True)
class InputSpec:
    """One named input of a model: its per-sample shape (None: any length) and dtype ("float":
    the model's float dtype; "int64" for token ids and masks) and kind, which says which checks
    apply ("image": NHWC, finite, already normalised; "tokens": ids in [0, vocab); "mask": 0/1)."""

    name: str
    shape: tuple
    dtype: str = "float"
    kind: str = "image"
    high: int | None = None       # tokens: the vocabulary size (ids must be below it)
    longest: int | None = None    # tokens: the most positions the model has (L must not exceed it)

    @property
    def is_float(self) -> bool:
        return self.dtype == "float"


@dataclass(frozen=True)
class BackboneInfo:
    """A catalog entry. `portable` entries exist on both backends with identical function."""

    name: str
    portable: bool
    family: str = ""
    defaults: tuple = ()          # (key, value) pairs of builder options
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    doc: str = ""
    pretrained: bool = True       # weights="imagenet" exists for it
    inputs: str = "image"         # "image": one NHWC input; "tokens": input_ids + attention_mask

    def options(self, overrides: dict | None = None) -> dict:
        opts = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in opts:
                expected = f"one of {sorted(opts)}" if opts else "no options"
                raise UnknownOptionError(
                    f"load_backbone({self.name!r}) got an unknown option {key!r}. "
                    f"Expected {expected}; received {key}={value!r}. Remove it, or check "
                    f"its spelling."
                )
            opts[key] = value
        return opts


@dataclass(frozen=True)
class HeadSpec:
    """Linear layers with ReLU (and dropout) between them; emits logits.

    Canonical names follow the torch module: `head` when there is no hidden layer,
    else an nn.Sequential of Linear, ReLU, Dropout triples: `head.0`, `head.3`, ...
    `loss` is what fine_tune trains it with by default (tlbridge/losses.py) and decides what
    tl.predict returns (sigmoid, softmax, or the values).
    """

    num_outputs: int = 1
    hidden: tuple = ()
    dropout: float = 0.0
    loss: str = "bce"
    label_smoothing: float = 0.0
    tasks: tuple = ()             # multi-task: ((name, loss, K, label_smoothing), ...), loss "multi"

    def layer_names(self, prefix: str = "head") -> list[str]:
        if not self.hidden:
            return [prefix]
        return [f"{prefix}.{3 * i}" for i in range(len(self.hidden) + 1)]

    def dims(self, in_features: int) -> list[int]:
        return [in_features, *self.hidden, self.num_outputs]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a TransferModel on either backend (saved as JSON)."""

    backbone: str
    options: tuple = ()           # (key, value) pairs, JSON-friendly
    input_shape: tuple = (224, 224, 3)
    dtype: str = "float32"
    head: HeadSpec | None = None
    native_backend: str | None = None   # set for native-only backbones
    preprocessing: Preprocessing | None = None   # None: the catalog's default for the backbone
    adapters: tuple = ()          # LoRA: ((module, rank, alpha, dropout), ...) (tlbridge/lora.py)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["options"] = {k: v for k, v in self.options}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        head = data.get("head")
        return cls(
            backbone=data["backbone"],
            options=freeze_options(data.get("options", {})),
            input_shape=tuple(data["input_shape"]),
            dtype=data["dtype"],
            head=None if head is None else HeadSpec(head["num_outputs"], tuple(head["hidden"]),
                                                    float(head["dropout"]),
                                                    head.get("loss", "bce"),
                                                    float(head.get("label_smoothing", 0.0)),
                                                    tuple((str(n), str(lo), int(k), float(e))
                                                          for n, lo, k, e in head.get("tasks", ()))),
            native_backend=data.get("native_backend"),
            preprocessing=(Preprocessing.from_dict(data["preprocessing"])
                           if data.get("preprocessing") else None),
            adapters=tuple((str(n), int(r), float(a), float(d))
                           for n, r, a, d in data.get("adapters", ())),
        )


def freeze_options(options: dict) -> tuple:
    """Dict of builder options -> hashable, JSON-stable tuple of pairs (lists become tuples)."""
    def fix(v):
        return tuple(fix(i) for i in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, fix(v)) for k, v in options.items()))
