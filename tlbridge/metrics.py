"""Metrics in numpy, so both backends are scored by the same code."""
from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .numerics import elementwise, sigmoid

__all__ = ["sigmoid", "bce_from_logits", "accuracy", "entry_accuracy", "top1", "roc_auc",
           "macro_auc", "score_names", "same_shape", "scores"]


def bce_from_logits(z: np.ndarray, y: np.ndarray) -> float:
    """Mean over all entries of max(z, 0) - z*y + log(1 + exp(-|z|)) (stable)."""
    return float(np.mean(elementwise(np.asarray(z, np.float64), y, "bce")))


def accuracy(z: np.ndarray, y: np.ndarray) -> float:
    """BCE (independent sigmoids): one output, threshold 0.5 (logit 0); several outputs, exact
    match: every output of a row right at that threshold (docs/parity.md #18)."""
    return float(np.mean(np.all((z > 0) == (y > 0.5), axis=1)))


def entry_accuracy(z: np.ndarray, y: np.ndarray) -> float:
    """The fraction of the N x K outputs right at threshold 0.5 (flatters an all-zeros model
    when positives are rare: 0.9 at K = 10 one-hot)."""
    return float(np.mean((z > 0) == (y > 0.5)))


def top1(z: np.ndarray, y: np.ndarray) -> float:
    """Argmax accuracy, meaningful only when every label row is one-hot (single-label data
    under one-vs-rest BCE, as tl.data.image_folder makes for K > 2); NaN otherwise."""
    if not np.all(np.sum(y > 0.5, axis=1) == 1):
        return float("nan")
    return float(np.mean(np.argmax(z, 1) == np.argmax(y, 1)))


def macro_auc(z: np.ndarray, y: np.ndarray) -> float:
    """The mean of each output's ROC AUC over the outputs that have both classes."""
    aucs = [roc_auc(z[:, k], y[:, k]) for k in range(z.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); NaN with one class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):              # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def score_names(num_outputs: int) -> list[str]:
    """The keys of `scores` for a model with `num_outputs` BCE outputs."""
    if num_outputs == 1:
        return ["loss", "accuracy", "auc"]
    return ["loss", "accuracy", "entry_accuracy", "auc", "top1"]


def same_shape(z, y):
    """(z, y) as arrays, refused unless both are (N, K)."""
    z, y = np.asarray(z), np.asarray(y)
    if z.ndim != 2 or z.shape != y.shape:
        raise ShapeError(f"Expected logits and labels of the same shape (N, K); received logits "
                         f"{z.shape} and labels {y.shape}. Labels need one column per model output.")
    return z, y


def scores(z: np.ndarray, y: np.ndarray) -> dict:
    """BCE scores: loss and accuracy (exact match for K > 1); AUC (macro over outputs for
    K > 1); for K > 1 also per-entry accuracy and top-1 (NaN unless rows are one-hot)."""
    z, y = same_shape(z, y)
    out = {"loss": bce_from_logits(z, y), "accuracy": accuracy(z, y)}
    if z.shape[1] == 1:
        out["auc"] = roc_auc(z[:, 0], y[:, 0])
        return out
    out.update(entry_accuracy=entry_accuracy(z, y), auc=macro_auc(z, y), top1=top1(z, y))
    return out
