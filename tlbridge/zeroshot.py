"""Zero-shot classification with a text encoder: a cosine head from class descriptions.

Each class's row is the normalised mean of its prompts' normalised embeddings, and the
backbone L2-normalises its sentence embedding (the `normalize` option, sentence-transformers'
Normalize module), so logit_k = scale * cos(f, row_k) exactly. The head is an ordinary CE head:
it predicts without training, saves and converts, and fine-tuning starts from it (the
zero-shot head as the initial classifier, as WiSE-FT and FLYP do).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import text
from .errors import DataError
from .model import TransferModel
from .specs import freeze_options


def _classes(classes) -> tuple[list[str], list[list[str]]]:
    if not isinstance(classes, dict) or len(classes) < 2:
        got = f"{len(classes)} class(es)" if isinstance(classes, dict) else type(classes).__name__
        raise DataError(f"Expected classes as a dict {{class name: [prompt, ...]}} with at least "
                        f"2 classes; received {got}. Example: {{'sport': ['a text about sport'], "
                        f"'politics': ['a text about politics']}}.")
    names, prompts = [], []
    for name, value in classes.items():
        items = [value] if isinstance(value, str) else value
        names.append(str(name))
        prompts.append(text.check_texts(items, f"the prompts of class {name!r}"))
    return names, prompts


def normalized(m: TransferModel) -> TransferModel:
    """m's backbone with an L2-normalised sentence embedding (the same weights; m itself when it
    already normalises)."""
    from . import api
    options = dict(m.spec.options)
    if options.get("normalize"):
        return m
    spec = replace(m.spec, options=freeze_options({**options, "normalize": True}), head=None)
    weights = {k: v for k, v in api.get_weights(m).items() if k.startswith("backbone.")}
    frozen = {n for n in m.frozen if n.startswith("backbone.")}
    return api._rebuild(spec, m.backend, weights, frozen, m.device)


def class_rows(m: TransferModel, prompts: list, max_length=None) -> np.ndarray:
    """(K, D) unit rows: per class, the normalised mean of its prompts' unit embeddings."""
    from . import api
    rows = []
    for items in prompts:
        f = np.asarray(api.features(m, text.tokenize(m, items, max_length)), np.float64)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        mean = f.mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.stack(rows)


def zero_shot_head(m: TransferModel, classes: dict, *, scale: float = 20.0,
                   max_length: int | None = None) -> TransferModel:
    """A new model: m's text backbone (normalised embedding) with a CE head of one output per
    class, logits scale * cos(text, class); `report["classes"]` lists the class names in
    output order. scale=20 is the temperature sentence-transformers trains with."""
    from . import api, fewshot
    api._check_model(m)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise DataError(f"Expected scale as a positive number; received {scale!r}.")
    names, prompts = _classes(classes)
    text.tokenizer(m)                  # a text model with its tokenizer, before any rebuild
    base = normalized(m)
    rows = class_rows(base, prompts, max_length)
    new = fewshot._with_linear_head(base, float(scale) * rows, np.zeros(len(rows)), "ce")
    new.report["classes"] = names
    return new
