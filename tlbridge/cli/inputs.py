"""Data from the command line: an image folder (tl.data.image_folder) or a CSV/JSONL of texts
and labels (tl.data.texts), opened for a given model."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from .usage import UsageError

TEXT_FILES = (".csv", ".jsonl")


def is_text(path: str) -> bool:
    return os.fspath(path).lower().endswith(TEXT_FILES)


def check_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what} {path!r} does not exist; expected an image folder "
                         f"(root/<class>/<image>) or a {'/'.join(TEXT_FILES)} file of texts and labels")


def read_table(path: str, text_column: str, label_column: str | None) -> tuple[list, list | None]:
    """(texts, labels or None) from a CSV (header row) or JSONL (one object per line)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f)) if path.lower().endswith(".csv") else \
            [json.loads(line) for line in f if line.strip()]
    if not rows or text_column not in rows[0]:
        found = sorted(rows[0]) if rows else []
        raise UsageError(f"{path!r} has no column {text_column!r} (found {found}); name the "
                         f"column with --text-column")
    texts = [str(r[text_column]) for r in rows]
    if label_column is None or label_column not in rows[0]:
        return texts, None
    return texts, [str(r[label_column]) for r in rows]


def label_matrix(labels: list, classes: list | None = None) -> tuple[np.ndarray, list]:
    """String labels -> (labels as tl.data takes them, class names): 2 classes (N, 1), the
    second positive, as image_folder; more classes one-hot."""
    classes = classes or sorted(set(labels))
    if len(classes) < 2:
        raise UsageError(f"expected at least 2 distinct labels; received {classes}")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise UsageError(f"labels {unknown[:5]} are not among the model's classes {classes}")
    idx = np.array([classes.index(v) for v in labels])
    y = (idx == 1)[:, None].astype(np.float64) if len(classes) == 2 else np.eye(len(classes))[idx]
    return y, classes


def dataset(tl, m, path: str, recipe: dict, *, shuffle: bool, augment: bool = False,
            classes: list | None = None):
    """(a tl.data Dataset over `path` for model m, class names)."""
    check_exists(path, "data")
    bs = recipe["batch_size"]
    if is_text(path):
        texts, labels = read_table(path, recipe["text_column"], recipe["label_column"])
        if labels is None:
            raise UsageError(f"{path!r} has no label column {recipe['label_column']!r}; name it "
                             f"with --label-column")
        y, classes = label_matrix(labels, classes)
        return tl.data.texts(texts, y, model=m, max_length=recipe.get("max_length"),
                             batch_size=bs, shuffle=shuffle, seed=recipe.get("seed", 0)), classes
    size = m.inputs[0].shape[:2]
    ds = tl.data.image_folder(path, size, classes=classes, batch_size=bs, shuffle=shuffle,
                              seed=recipe.get("seed", 0),
                              augment=tl.data.Augment() if augment else None,
                              preprocess=lambda b: tl.preprocess(m, np.round(b).astype("uint8")))
    return ds, ds.classes


def unlabelled(tl, m, path: str, text_column: str) -> tuple[object, list]:
    """(model input, sample names) for predict: texts of a table, or every image of a folder
    (class sub-folders or images directly)."""
    check_exists(path, "data")
    if is_text(path):
        texts, _ = read_table(path, text_column, None)
        return tl.tokenize(m, texts), [str(i) for i in range(len(texts))]
    from ..data import IMG_EXTENSIONS, _decode
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path, followlinks=True)
                   for f in names if f.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise UsageError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {path!r}")
    size = m.inputs[0].shape[:2]
    x = tl.preprocess(m, np.stack([_decode(f, size) for f in files]))
    return x, [os.path.relpath(f, path) for f in files]
