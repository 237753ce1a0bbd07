"""The fine-tune recipe: defaults, then a YAML or JSON file (-c), then flags (timm's train.py
habit). The resolved recipe is printed by --print-config and saved beside the model."""
from __future__ import annotations

import argparse
import json
import os

from .usage import UsageError, command

# key: (default, type for a flag or None for a non-flag, help)
KEYS = {
    "backbone": (None, str, "a name from `tlbridge backbones` (required)"),
    "weights": (None, str, "imagenet | pretrained | a checkpoint file (default: random, seeded)"),
    "backend": (None, str, "torch | keras (default: TLBRIDGE_BACKEND, else torch if installed)"),
    "engine": (None, str, "Keras engine: tensorflow or jax (default: KERAS_BACKEND)"),
    "data": (None, str, "an image folder (root/<class>/<image>) or a CSV/JSONL of texts and labels (required)"),
    "val_data": (None, str, "held-out data, the same kind as --data"),
    "image_size": (224, int, "images are resized to this square size"),
    "max_length": (None, int, "texts: tokens kept per text"),
    "text_column": ("text", str, "CSV/JSONL column of the texts"),
    "label_column": ("label", str, "CSV/JSONL column of the labels"),
    "hidden": ([], None, "head hidden widths (recipe file only), e.g. [256]"),
    "dropout": (0.0, float, "head dropout"),
    "loss": ("auto", str, "bce | ce | auto (bce for 2 classes, ce for more)"),
    "freeze": ("backbone", str, "backbone | none | a glob of weight names frozen at the start"),
    "unfreeze": ({}, str, "epoch:spec pairs, e.g. '2:backbone.layer4,4:all'"),
    "optimizer": ("sgd", str, "sgd | adam | adamw"),
    "lr": (1e-3, float, "learning rate"),
    "momentum": (0.9, float, "SGD momentum"),
    "weight_decay": (0.0, float, "weight decay"),
    "schedule": ("constant", str, "constant | cosine"),
    "warmup_steps": (0, int, "linear warm-up steps before the schedule"),
    "epochs": (1, int, "epochs"),
    "batch_size": (32, int, "batch size"),
    "augment": (False, None, "random flips and crops of the images (flag --augment)"),
    "seed": (0, int, "data order and head init"),
    "checkpoint": (None, str, "directory for a checkpoint after every epoch"),
    "resume": (False, None, "continue from --checkpoint (flag --resume)"),
    "out": ("model.safetensors", str, "the model file; history, loss curve and recipe go beside it"),
}
CHOICES = {"backend": (None, "torch", "keras"), "engine": (None, "tensorflow", "jax"),
           "optimizer": ("sgd", "adam", "adamw"), "schedule": ("constant", "cosine"),
           "loss": ("auto", "bce", "ce")}
REQUIRED = ("backbone", "data")


def add_arguments(p) -> None:
    p.add_argument("-c", "--config", help="a YAML or JSON recipe; flags given override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for key, (default, kind, text) in KEYS.items():
        flag = "--" + key.replace("_", "-")
        if key in ("augment", "resume"):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        elif kind is not None:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} (default: {default})")
    p.set_defaults(run=command("fine_tune"))


def read_file(path: str) -> dict:
    """A recipe file: YAML (.yaml/.yml, needs PyYAML) or JSON; a mapping of recipe keys."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist; expected a YAML or JSON recipe")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise UsageError("a YAML recipe needs PyYAML (pip install pyyaml); or write the recipe as JSON") from None
    except ValueError as exc:   # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise UsageError(f"config file {path!r} does not parse: {' '.join(str(exc).split())}") from None
    except Exception as exc:     # noqa: BLE001  yaml.YAMLError is not a ValueError
        raise UsageError(f"config file {path!r} does not parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of recipe keys; received "
                         f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(args) -> dict:
    """defaults < file < flags, every key known, required ones present, choices checked."""
    out = {k: v[0] for k, v in KEYS.items()}
    given = read_file(args.config) if args.config else {}
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise UsageError(f"unknown config key(s) {unknown} in {args.config}; accepted: {sorted(KEYS)}")
    out.update(given)
    out.update({k: getattr(args, k) for k in KEYS if hasattr(args, k)})
    out["unfreeze"] = _unfreeze(out["unfreeze"])
    for key, allowed in CHOICES.items():
        if out[key] not in allowed:
            raise UsageError(f"{key} {out[key]!r} is not accepted; expected one of "
                             f"{[a for a in allowed if a is not None]}")
    missing = [k for k in REQUIRED if not out[k]]
    if missing and not args.print_config:
        raise UsageError(f"the recipe lacks {missing}: give --{missing[0].replace('_', '-')} or "
                         f"put it in the config file")
    if out["engine"] is not None and out["backend"] not in (None, "keras"):
        raise UsageError(f"--engine {out['engine']} applies to --backend keras; received backend {out['backend']!r}")
    return out


def _unfreeze(value) -> dict:
    """'2:backbone.layer4,4:all' or {2: spec} -> {epoch (int): spec}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, str):
        items = [part.split(":", 1) if ":" in part else (part, None)
                 for part in value.split(",") if part.strip()]
    else:
        items = None
    try:
        out = {int(k): str(v) for k, v in items if v}
        if items is not None and len(out) == len(list(items)):
            return out
    except (TypeError, ValueError):
        pass
    raise UsageError(f"unfreeze {value!r} is not accepted; expected epoch:spec pairs such as "
                     f"'2:backbone.layer4,4:all' (or a mapping in the recipe file)")


def dumps(recipe: dict) -> str:
    return json.dumps(recipe, indent=2, sort_keys=False)
