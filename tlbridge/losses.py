"""The losses a head trains with, written once in numpy: both backends follow these formulas
(torch.nn.functional and keras.ops compute the same), and tests hold them to them.

    bce: mean over all N*K entries of  max(z,0) - z*y + log(1 + e^-|z|)      (y in {0, 1})
    ce:  mean over N of  -sum_k q_k log softmax(z)_k,  q = (1 - eps) * y + eps / K
         (y one-hot or class probabilities, rows summing to 1; eps = label_smoothing, as
         torch's F.cross_entropy(label_smoothing=eps) and Keras' categorical_crossentropy)
    mse: mean over all N*K entries of (z - y)^2                             (y real)

Labels cross the boundary as one float array (N, K) for every loss; class indices become
one-hot rows here (`prepare_labels`), so data pipelines carry one layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics
from .errors import DataError, ShapeError
from .numerics import elementwise, log_softmax as _log_softmax, sigmoid

LOSSES = ("bce", "ce", "mse")


@dataclass(frozen=True)
class Loss:
    """Which loss, and its one option (label smoothing, CE only). Hashable: the Keras
    trainer keys its traced steps by it."""

    name: str = "bce"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.name not in LOSSES:
            raise DataError(f"Unknown loss {self.name!r}. Expected one of {list(LOSSES)}.")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 1.0:
            raise DataError(f"Expected label_smoothing as a number in [0, 1); received {eps!r}.")
        if eps and self.name != "ce":
            raise DataError(f"label_smoothing applies to loss='ce' (softmax cross-entropy); "
                            f"received label_smoothing={eps} with loss={self.name!r}.")
        object.__setattr__(self, "label_smoothing", float(eps))

    # what the trainer, evaluate and predict ask of any loss (multitask.MultiLoss answers too)
    needs_weights = False           # scores() needs the model's weights (uncertainty log-vars)

    def labels(self, y, n: int, k: int, dtype: str, what: str = "labels y") -> np.ndarray:
        if isinstance(y, dict):
            raise DataError(f"Expected {what} as an array; received a dict of task labels, "
                            f"which needs a multi-task head (tl.replace_heads).")
        return prepare_labels(y, n, k, self.name, dtype, what)

    def fit_dataset(self, ds, k: int, what: str):
        """ds with labels in this loss's form, (N, K) floats; class indices become one-hot
        rows in a shallow copy (the caller's dataset is left as it was)."""
        import copy
        indices = self.name == "ce" and ds.num_outputs == 1
        if ds.num_outputs != k and not indices:
            raise DataError(
                f"Expected {what} labels with {k} column(s) (the model's outputs); received "
                f"{ds.num_outputs}. Pass labels of shape (N, {k})"
                f"{' or (N,)' if k == 1 or indices else ''}, or give the model "
                f"{ds.num_outputs} outputs with tl.replace_head(m, {ds.num_outputs}).")
        y = prepare_labels(ds.labels, ds.num_samples, k, self.name, "float64", f"{what} labels")
        ds = copy.copy(ds)
        ds.labels, ds.num_outputs = y, y.shape[1]
        return ds

    def scores(self, z, y, weights: dict | None = None) -> dict:
        return scores(z, y, self)

    def score_names(self, k: int) -> list[str]:
        return score_names(k, self.name)

    def history_names(self) -> list[str]:
        """Training-side keys fine_tune adds per epoch beside "loss"."""
        return []

    def epoch_record(self, parts, weights: dict | None = None) -> dict:
        return {}

    def unused_params(self) -> set:
        """Parameters this loss leaves without a gradient (they need not train)."""
        return set()

    def probabilities(self, z):
        return probabilities(z, self.name)


@dataclass(frozen=True)
class TaskWeights:
    """How a multi-task head (tl.replace_heads) weighs its tasks: {task: weight} (the others
    1), or "uncertainty" (Kendall et al. 2018; tlbridge/multitask.py)."""

    weights: object = None

    def __post_init__(self):
        w = self.weights
        if isinstance(w, dict):
            object.__setattr__(self, "weights", tuple(w.items()))
        elif not (w is None or isinstance(w, (str, tuple))):
            raise DataError(f"Expected task weights as a dict {{task: weight}} or "
                            f"'uncertainty'; received {type(w).__name__}.")

    def as_given(self):
        """The dict (or "uncertainty", or None) the caller wrote."""
        return dict(self.weights) if isinstance(self.weights, tuple) else self.weights


_HEAD_KINDS: dict = {}      # head.loss -> loss builder, for kinds built on the API (multitask)


def register_head_loss(name: str, build) -> None:
    """A head kind whose loss is its own (multi-task: "multi") registers how to build it."""
    _HEAD_KINDS[name] = build


def of(head, loss=None, label_smoothing=None) -> Loss:
    """The loss a call uses: its own `loss=` (a name, a Loss, or a head kind's value such as
    TaskWeights) / `label_smoothing=`, else the head's."""
    if head.loss in _HEAD_KINDS:
        return _HEAD_KINDS[head.loss](head, loss)
    if isinstance(loss, TaskWeights):
        raise DataError(f"tl.losses.TaskWeights weighs the tasks of a multi-task head (tl.replace_heads); "
                        f"this model has one head ({head.num_outputs} output(s), loss "
                        f"{head.loss!r}). Drop the TaskWeights.")
    name = head.loss if loss is None else loss
    if isinstance(name, Loss):
        return name
    if not isinstance(name, str):
        raise DataError(f"Expected loss as one of {list(LOSSES)}; received {name!r}.")
    same = loss is None or name.lower() == head.loss      # the head's own loss keeps its eps
    eps = (head.label_smoothing if same else 0.0) if label_smoothing is None else label_smoothing
    out = Loss(name.lower(), eps)
    if out.name == "ce" and head.num_outputs < 2:
        raise DataError(f"Expected a head with at least 2 outputs for loss='ce' (a softmax over "
                        f"classes); received {head.num_outputs}. Use loss='bce' for one "
                        f"output, or tl.replace_head(m, num_classes, loss='ce').")
    return out


# ------------------------------------------------------------------------------- formulas
def value(z, y, loss: Loss) -> float:
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    if loss.name == "ce":
        q = (1.0 - loss.label_smoothing) * y + loss.label_smoothing / z.shape[1]
        return float(np.mean(-np.sum(q * _log_softmax(z), axis=1)))
    return float(np.mean(elementwise(z, y, loss.name)))


def grad_logits(z, y, loss: Loss) -> np.ndarray:
    """d loss / d z: (sigmoid(z) - y)/(N K), (softmax(z) - q)/N, 2 (z - y)/(N K)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    if loss.name == "bce":
        return (sigmoid(z) - y) / z.size
    if loss.name == "ce":
        q = (1.0 - loss.label_smoothing) * y + loss.label_smoothing / z.shape[1]
        return (np.exp(_log_softmax(z)) - q) / len(z)
    return 2.0 * (z - y) / z.size


def probabilities(z, loss_name: str) -> np.ndarray:
    """What tl.predict returns: sigmoid (bce), softmax over outputs (ce), the values (mse)."""
    z = np.asarray(z)
    if loss_name == "bce":
        return sigmoid(z)
    if loss_name == "ce":
        return np.exp(_log_softmax(np.asarray(z, np.float64))).astype(z.dtype)
    return z


# ------------------------------------------------------------------------------- labels
def prepare_labels(y, n: int, k: int, loss_name: str, dtype: str = "float64",
                   what: str = "labels y") -> np.ndarray:
    """(N, K) float labels for `loss_name`, checked: bce {0, 1}; ce class indices in [0, K)
    (shape (N,) or (N, 1), made one-hot) or rows of K non-negative numbers summing to 1; mse
    finite numbers."""
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"Expected numeric {what}; received dtype {y.dtype}.")
    if loss_name == "ce" and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and k > 1)):
        idx = y.reshape(-1)
        if len(idx) != n:
            raise ShapeError(f"Expected {what} with one class index per sample ({n}); received "
                             f"{len(idx)}.")
        bad = ~np.isfinite(idx.astype(np.float64)) | (idx != np.round(idx)) | (idx < 0) | (idx >= k)
        if bad.any():
            raise DataError(f"Expected class indices in [0, {k}) for loss='ce' ({k} outputs); "
                            f"received {int(bad.sum())} outside it, e.g. "
                            f"{np.unique(idx[bad])[:5].tolist()}.")
        return np.ascontiguousarray(np.eye(k, dtype=dtype)[idx.astype(np.int64)])
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.shape != (n, k):
        raise ShapeError(
            f"Expected {what} of shape ({n}, {k}) (one column per model output"
            f"{', or (N,) for one output' if k == 1 else ''}"
            f"{', or (N,) class indices' if loss_name == 'ce' else ''}); received {y.shape}.")
    y64 = y.astype(np.float64)
    if not np.all(np.isfinite(y64)):
        raise DataError(f"Expected finite {what}; received {int(np.sum(~np.isfinite(y64)))} "
                        f"NaN/inf value(s).")
    if loss_name == "bce":
        bad = ~((y64 == 0) | (y64 == 1))
        if bad.any():
            raise DataError(
                f"Expected labels in {{0, 1}} for binary cross-entropy"
                f"{'' if what == 'labels y' else f' ({what})'}; received "
                f"{int(bad.sum())} value(s) outside it, e.g. {np.unique(y64[bad])[:5].tolist()}. "
                f"One-hot encode class indices first (np.eye(K)[y]), or use loss='ce' for "
                f"classes or loss='mse' for real values.")
    elif loss_name == "ce":
        rows = y64.sum(axis=1)
        bad = (y64 < 0).any(axis=1) | (np.abs(rows - 1.0) > 1e-6)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"Expected {what} rows of {k} non-negative numbers summing to 1 "
                            f"(one-hot or class probabilities) for loss='ce'; received "
                            f"{int(bad.sum())} row(s) that do not, e.g. row {i} sums to "
                            f"{rows[i]:.6g}. Pass class indices (N,) instead, or normalise.")
        # rows within 1e-6 of 1 are made exact: torch's gradient is softmax * sum(q) - q,
        # TensorFlow's softmax - q, equal only for normalised targets
        return np.ascontiguousarray((y64 / rows[:, None]).astype(dtype))
    return np.ascontiguousarray(y.astype(dtype))


# ------------------------------------------------------------------------------- metrics
def score_names(k: int, loss_name: str = "bce") -> list[str]:
    """The keys of `scores` for a head with k outputs trained with `loss_name`."""
    if loss_name == "mse":
        return ["loss", "mae"]
    if loss_name == "ce":
        return ["loss", "accuracy"] + (["top5"] if k > 5 else [])
    return metrics.score_names(k)


def scores(z, y, loss: Loss) -> dict:
    """loss; bce: accuracy (logit 0 / argmax), ROC AUC for one output; ce: accuracy (argmax of
    z against argmax of y) and top-5 accuracy when K > 5; mse: mean absolute error."""
    if loss.name == "bce":
        return metrics.scores(z, y)
    z, y = metrics.same_shape(z, y)
    out = {"loss": value(z, y, loss)}
    if loss.name == "mse":
        out["mae"] = float(np.mean(np.abs(np.asarray(z, np.float64) - y)))
        return out
    if loss.name == "ce":
        target = np.argmax(y, axis=1)
        out["accuracy"] = float(np.mean(np.argmax(z, axis=1) == target))
        if z.shape[1] > 5:
            top = np.argsort(-np.asarray(z, np.float64), axis=1, kind="stable")[:, :5]
            out["top5"] = float(np.mean(np.any(top == target[:, None], axis=1)))
    return out
