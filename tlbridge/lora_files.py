"""Adapter files in peft's layout (docs/lora.md): `adapter_model.safetensors` with peft's key
names for tlbridge's torch module (`base_model.model.<canonical name>`: the adapters and, as
peft's modules_to_save, the head) and `adapter_config.json` (peft_type "LORA", r, lora_alpha,
target_modules, lora_dropout, bias "none"). peft's PeftModel.from_pretrained reads them onto
the torch model; tl.load_adapters reads them (or peft's own files) onto either backend.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import re

import numpy as np

from . import api, lora, weights as wio
from .errors import AdapterError
from .model import TransferModel

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapters(m: TransferModel, directory) -> None:
    """Write m's adapters (and its head, which trains with them) in peft's layout."""
    m = lora._model(m, "save_adapters")
    if not m.spec.adapters:
        raise AdapterError(f"Expected a model with LoRA adapters to save; received "
                           f"{m.backbone_name!r} with none. Add them with tl.add_lora(m, ...).")
    w = api.get_weights(m)
    keep = {k: v for k, v in w.items() if lora.is_adapter(k) or lora._is_head(k)}
    folder = pathlib.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    wio.save_file(folder / WEIGHTS, {PREFIX + k: np.ascontiguousarray(v) for k, v in keep.items()},
                  {"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(_config(m, keep), indent=2, sort_keys=True))


def _config(m: TransferModel, keep: dict) -> dict:
    """peft's LoraConfig fields: the most common rank and alpha, the others per module."""
    adapters = m.spec.adapters
    rank = collections.Counter(a[1] for a in adapters).most_common(1)[0][0]
    alpha = collections.Counter(a[2] for a in adapters).most_common(1)[0][0]
    heads = sorted({k.split(".")[0] for k in keep if lora._is_head(k) and "." in k})
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
            "target_modules": [a[0] for a in adapters], "lora_dropout": adapters[0][3],
            "bias": "none", "modules_to_save": heads or None,
            "rank_pattern": {a[0]: a[1] for a in adapters if a[1] != rank},
            "alpha_pattern": {a[0]: a[2] for a in adapters if a[2] != alpha},
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "use_rslora": False, "use_dora": False, "task_type": None,
            "base_model_name_or_path": None}     # a name would send peft to the Hub


def load_adapters(m: TransferModel, directory) -> TransferModel:
    """Put the adapters of a peft-layout directory (tl.save_adapters', or peft's own for
    tlbridge's torch module) on m, in place: m must be the same base (same layer shapes) with
    no adapters on those layers; a head saved with them replaces m's head weights."""
    m = lora._model(m, "load_adapters")
    cfg, tensors = _read(directory)
    layers = api._be(m.backend).lora_layers(m)
    added, new = [], {}
    for name in _order({k.rsplit(".", 2)[0] for k in tensors if lora.is_adapter(k)}, cfg, layers):
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        _check_pair(name, a, b, layers, directory)
        rank = int(a.shape[0])
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
        added.append((name, rank, alpha, float(cfg.get("lora_dropout", 0.0))))
        new[f"{name}.lora_A.weight"], new[f"{name}.lora_B.weight"] = a, b
    if not added:
        raise AdapterError(f"Expected LoRA tensors (*.lora_A.weight / *.lora_B.weight) in "
                           f"{directory}/{WEIGHTS}; received none.")
    lora._check_layers([a[0] for a in added], layers, m)
    head = {k: v for k, v in tensors.items() if lora._is_head(k)}
    _check_head(m, head, directory)
    return lora.adapt(m, tuple(added), {**new, **head})


def _order(names: set, cfg: dict, layers: dict) -> list[str]:
    """The order adapters were added in (the saved target_modules), else the model's order."""
    listed = cfg.get("target_modules")
    first = {n: i for i, n in enumerate(listed)} if isinstance(listed, list) else {}
    where = {n: i for i, n in enumerate(layers)}
    return sorted(names, key=lambda n: (first.get(n, len(first)), where.get(n, -1), n))


def _pattern(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern rule: a key matches the module name or its tail."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _read(directory) -> tuple[dict, dict]:
    folder = pathlib.Path(directory)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise AdapterError(f"Expected an adapter directory holding {CONFIG} and {WEIGHTS} "
                           f"(tl.save_adapters or peft's save_pretrained); received "
                           f"{os.fspath(directory)!r}.")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or \
            cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("fan_in_fan_out"):
        raise AdapterError(
            f"Expected a plain LoRA adapter (peft_type 'LORA', bias 'none', no DoRA, no rsLoRA, "
            f"fan_in_fan_out false); received {CONFIG} with peft_type={cfg.get('peft_type')!r}, "
            f"bias={cfg.get('bias')!r}, use_dora={cfg.get('use_dora')}, use_rslora="
            f"{cfg.get('use_rslora')}, fan_in_fan_out={cfg.get('fan_in_fan_out')}.")
    raw, _ = wio.load_file(folder / WEIGHTS)
    return cfg, {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}


def _check_pair(name: str, a, b, layers: dict, directory) -> None:
    """Both tensors there, the module in this model, and shapes that fit its base layer."""
    if name not in layers:
        raise AdapterError(
            f"Expected adapters for layers of this model; {directory} has one for {name!r}, "
            f"which is not a Linear or Conv2d of its backbone (closest: "
            f"{lora._closest(name, layers)}). Load them onto the base they were trained on.")
    kind, fan_in, fan_out, kh, kw, _ = layers[name]
    if a is None or b is None:
        raise AdapterError(f"Expected both lora_A and lora_B for {name!r} in {directory}; "
                           f"one is missing. The file is incomplete: save it again.")
    r = int(a.shape[0])
    want_a = (r, fan_in) if kind == "linear" else (r, fan_in, kh, kw)
    want_b = (fan_out, r) if kind == "linear" else (fan_out, r, 1, 1)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise AdapterError(
            f"Expected adapters that fit this model's base layer {name!r} ({kind}, in {fan_in}, "
            f"out {fan_out}): lora_A {want_a}, lora_B {want_b}; received lora_A "
            f"{tuple(a.shape)}, lora_B {tuple(b.shape)}. The adapters were trained on another "
            f"base (other widths); load them onto that base. The model was left unchanged.")


def _check_head(m: TransferModel, head: dict, directory) -> None:
    if not head:
        return
    shapes = api._be(m.backend).canonical_shapes(m)
    wrong = {k: tuple(v.shape) for k, v in head.items() if shapes.get(k) != tuple(v.shape)}
    if wrong:
        k = next(iter(wrong))
        raise AdapterError(
            f"Expected the head saved with the adapters to fit this model's head; {directory} "
            f"has {k} of shape {wrong[k]}, the model {shapes.get(k, 'no such tensor')}. Give "
            f"m the same head first (tl.replace_head(m, num_outputs=...)). The model was left "
            f"unchanged.")
