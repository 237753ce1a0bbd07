"""Texts to token batches with the model's own tokenizer (HF `tokenizers`, offline), outside
the backends: both frameworks get the same integer arrays.

Batches are padded to their longest text, not to max_length, so short texts cost short steps;
padding never changes a sentence's features (the encoder masks padded keys and pools over the
mask).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from . import bert
from .errors import ArgumentTypeError, BackendNotInstalledError, CheckpointError, DataError
from .model import TransferModel

_CACHE: dict = {}       # tokenizer directory -> (tokenizers.Tokenizer, pad id)


def check_texts(texts, what: str = "texts") -> list[str]:
    """A non-empty list of str, or a DataError naming the first item that is not one."""
    if isinstance(texts, (str, bytes)):
        raise DataError(f"Expected {what} as a list of strings; received one {type(texts).__name__}. "
                        f"Wrap a single text in a list: [text].")
    try:
        items = list(texts)
    except TypeError:
        raise DataError(f"Expected {what} as a list of strings; received "
                        f"{type(texts).__name__}.") from None
    if not items:
        raise DataError(f"Expected {what} with at least one text; received an empty list.")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            hint = " Decode bytes first (t.decode('utf-8'))." if isinstance(t, bytes) else (
                " Drop or fill missing texts first." if t is None else "")
            raise DataError(f"Expected {what} as strings; item {i} is {type(t).__name__} "
                            f"{t!r:.40}.{hint}")
    return items


def tokenizer(m):
    """(the model's tokenizers.Tokenizer, its pad id), loaded once per directory."""
    if not isinstance(m, TransferModel):
        raise ArgumentTypeError(f"Expected a tlbridge text model (tl.load_backbone('minilm_l6', "
                                f"weights='pretrained')); received {type(m).__name__}.")
    options = dict(m.spec.options)
    if "tokenizer" not in options:
        raise ArgumentTypeError(f"Expected a text model (minilm_l6, bert) for tl.tokenize; "
                                f"received the {m.spec.backbone!r} model, which takes "
                                f"{[s.name for s in m.inputs]}.")
    directory = bert.tokenizer_dir(options["tokenizer"], m.spec.backbone)
    if directory is None:
        raise CheckpointError(f"Expected a model loaded with its tokenizer (weights='pretrained' "
                              f"or a BERT directory); received {m.spec.backbone!r} built without "
                              f"one (weights=None). Tokenize with your own tokenizer, or load "
                              f"from a directory holding tokenizer.json or vocab.txt.")
    key = str(directory)
    if key not in _CACHE:
        _CACHE[key] = _load(directory)
    return _CACHE[key]


def _load(directory: pathlib.Path):
    try:
        import tokenizers
    except ImportError as exc:
        raise BackendNotInstalledError("Tokenizing texts needs the `tokenizers` package: pip "
                                       "install tokenizers (part of tlbridge[torch] and "
                                       "tlbridge[keras]).") from exc
    if (directory / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        lower = _config(directory / "tokenizer_config.json").get("do_lower_case", True)
        tok = tokenizers.BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lower)
    else:
        raise CheckpointError(f"Expected the tokenizer beside the weights: tokenizer.json or "
                              f"vocab.txt in {str(directory)!r}; found neither. Copy the "
                              f"tokenizer files of the model there.")
    pad = tok.token_to_id("[PAD]")
    return tok, 0 if pad is None else int(pad)


def _config(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def encode(m, texts, max_length=None) -> tuple[list[list[int]], int]:
    """(token ids per text, truncated to max_length, special tokens included; the pad id)."""
    items = check_texts(texts)
    limit = _max_length(m, max_length)
    tok, pad = tokenizer(m)
    tok.no_padding()
    tok.enable_truncation(limit)
    return [e.ids for e in tok.encode_batch(items)], pad


def _max_length(m, max_length) -> int:
    longest = dict(m.spec.options).get("max_position_embeddings")
    if max_length is None:
        max_length = int(m.spec.input_shape[0])
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise DataError(f"Expected max_length as an int >= 2 (room for [CLS] and [SEP]); "
                        f"received {max_length!r}.")
    if longest is not None and max_length > longest:
        raise DataError(f"Expected max_length <= {longest} for {m.spec.backbone!r} (its position "
                        f"table has {longest} rows); received max_length={max_length}.")
    return int(max_length)


def pad(ids: list, pad_id: int) -> dict:
    """{"input_ids", "attention_mask"} (N, longest) int64 from token id lists."""
    longest = max(len(i) for i in ids)
    out = np.full((len(ids), longest), pad_id, np.int64)
    mask = np.zeros((len(ids), longest), np.int64)
    for row, seq in enumerate(ids):
        out[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return {"input_ids": out, "attention_mask": mask}


def tokenize(m, texts, max_length=None) -> dict:
    """{"input_ids", "attention_mask"} int64 arrays from the model's own tokenizer, padded to
    the longest text of `texts` and truncated at max_length (default: the model's input_shape
    L, 128 unless loaded otherwise). The same arrays on both backends."""
    ids, pad_id = encode(m, texts, max_length)
    return pad(ids, pad_id)
