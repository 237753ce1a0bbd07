"""Multi-task heads on one shared backbone: the numbers both backends follow.

A multi-task head is one head per task side by side; the model's logits are the tasks'
logits concatenated in task order (N, sum of K_t), so features, the feature cache, checkpoints
and conversion see one (N, K) model. Labels travel the same way: a dict {task: labels} is
packed into one (N, sum K_t) float array (class indices become one-hot blocks) in which NaN
marks a missing label (-1 for a CE class index); a missing label leaves its task's loss.

    L_t = mean over the task's present labels (entries for bce/mse, rows for ce) of its loss
          (tlbridge/losses.py); h_t = 1 if the batch holds any, else 0 (and L_t = 0)
    total = sum_t w_t L_t                       (TaskWeights({task: w}), default 1 each)
    total = sum_t h_t (exp(-s_t) L_t + s_t)     (TaskWeights("uncertainty"))
The second is Kendall, Gal & Cipolla (2018) in the form most implementations use (one
s_t = log sigma_t^2 per task, without their 1/2 for regression): the s_t are the canonical
parameter `task_log_vars` (T,), which only an uncertainty-weighted loss uses (under other
weights its gradient is zero and it does not move). h_t keeps a batch without a task's labels
from pulling s_t down (d/ds_t of a bare s_t is 1).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from . import api, init, losses
from .errors import DataError, ShapeError
from .specs import HeadSpec

LOG_VARS = "task_log_vars"


@dataclass(frozen=True)
class MultiLoss:
    """Tasks as (name, loss, K, label_smoothing), per-task weights, or uncertainty weighting.
    Hashable: the Keras trainer keys its traced steps by it."""

    tasks: tuple
    weights: tuple
    uncertainty: bool = False

    @property
    def name(self) -> str:
        return "multi"

    def slices(self) -> dict:
        out, start = {}, 0
        for name, _, k, _ in self.tasks:
            out[name] = (start, start + k)
            start += k
        return out

    def task_loss(self, t: int) -> losses.Loss:
        _, loss, _, eps = self.tasks[t]
        return losses.Loss(loss, eps)

    # what the trainer, evaluate and predict ask of any loss (as losses.Loss answers them)
    @property
    def needs_weights(self) -> bool:
        return self.uncertainty

    def labels(self, y, n: int, k: int, dtype: str, what: str = "labels y") -> np.ndarray:
        if not isinstance(y, dict):
            raise DataError(f"Expected {what} as a dict {{task: labels}} for a multi-task head "
                            f"(tasks {[t[0] for t in self.tasks]}); received "
                            f"{type(y).__name__}.")
        return pack_labels(y, n, self.tasks, dtype, what)

    def fit_dataset(self, ds, k: int, what: str):
        if ds.num_outputs != k:
            raise DataError(f"Expected {what} labels with {k} columns (the tasks' outputs side "
                            f"by side); received {ds.num_outputs}. Pass labels as a dict "
                            f"{{task: labels}}.")
        check_packed(ds.labels, self, f"{what} labels")
        return ds

    def scores(self, z, y, weights: dict | None = None) -> dict:
        return scores(z, y, self, None if weights is None else weights[LOG_VARS])

    def score_names(self, k: int) -> list[str]:
        return score_names(self)

    def history_names(self) -> list[str]:
        return history_names(self)

    def epoch_record(self, parts, weights: dict | None = None) -> dict:
        """Per-task training losses of the epoch (NaN where no batch had a task's labels) and,
        under uncertainty weighting, each task's log-variance."""
        if not len(parts):
            return {}
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(np.asarray(parts), axis=0)
        out = {f"loss_{t[0]}": float(v) for t, v in zip(self.tasks, means)}
        if self.uncertainty:
            out.update({f"log_var_{t[0]}": float(v) for t, v in zip(self.tasks, weights[LOG_VARS])})
        return out

    def unused_params(self) -> set:
        return set() if self.uncertainty else {LOG_VARS}

    def probabilities(self, z) -> dict:
        """{task: its probabilities (or values)}."""
        return {name: losses.probabilities(block, loss) for (name, loss, _, _), block in
                zip(self.tasks, split(z, self.tasks).values())}


def replace_heads(m, tasks: dict, *, hidden=(), dropout: float = 0.0, seed: int | None = None):
    """A new model sharing `m`'s backbone with one head per task: tasks = {name: (loss, K)}
    or (loss, K, label_smoothing), loss "bce", "ce" or "mse" (tlbridge/losses.py). Canonical
    names heads.<task>.weight / .bias (hidden layers heads.<task>.0, .3, ...) and the tasks'
    log-variances `task_log_vars` (T,) for loss=tl.losses.TaskWeights("uncertainty"). Logits
    are the tasks' side by side in task order; labels a dict {task: labels}, NaN (or -1 for a
    CE class index) where missing."""
    api._check_model(m)
    checked = check_tasks(tasks)
    if not 0.0 <= float(dropout) < 1.0:
        raise DataError(f"Expected 0 <= dropout < 1; received {dropout}.")
    head = HeadSpec(sum(t[2] for t in checked), api._check_hidden(hidden), float(dropout), "multi",
                    0.0, checked)

    def draw(feature_dim: int) -> dict:     # one head per task, in task order; log-variances 0
        rng, w = np.random.default_rng(seed), {}
        for name, _, k, _ in head.tasks:
            w.update(init.linear_head([feature_dim, *head.hidden, k], rng,
                                      head.layer_names(f"heads.{name}")))
        w[LOG_VARS] = np.zeros(len(head.tasks))
        return w
    return api.attach_head(m, head, draw)


def check_tasks(tasks) -> tuple:
    """{name: (loss, K)} (or (loss, K, label_smoothing)) -> ((name, loss, K, eps), ...)."""
    if not isinstance(tasks, dict) or not tasks:
        raise DataError(f"Expected tasks as a non-empty dict {{name: (loss, outputs)}}, e.g. "
                        f"{{'digit': ('ce', 10), 'odd': ('bce', 1)}}; received {tasks!r}.")
    out = []
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise DataError(f"Expected task names as identifiers (letters, digits, _); received "
                            f"{name!r}.")
        if not (isinstance(spec, (tuple, list)) and len(spec) in (2, 3)):
            raise DataError(f"Expected task {name!r} as (loss, outputs) or (loss, outputs, "
                            f"label_smoothing); received {spec!r}.")
        loss, k = spec[0], spec[1]
        eps = spec[2] if len(spec) == 3 else 0.0
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ShapeError(f"Expected task {name!r} outputs as an int >= 1; received {k!r}.")
        checked = losses.Loss(loss, eps)
        if checked.name == "ce" and k < 2:
            raise DataError(f"Expected at least 2 outputs for task {name!r} with loss='ce'; "
                            f"received {k}.")
        out.append((name, checked.name, int(k), checked.label_smoothing))
    return tuple(out)


def of(head, loss=None) -> MultiLoss:
    """The loss of a multi-task head under `loss`: None (every task weighs 1) or
    losses.TaskWeights (a dict {task: w}, or "uncertainty")."""
    if loss is not None and not isinstance(loss, losses.TaskWeights):
        raise DataError(f"A multi-task head's losses are set per task by tl.replace_heads "
                        f"({', '.join(f'{n}: {lo}' for n, lo, _, _ in head.tasks)}); received "
                        f"loss={loss!r}. Weigh the tasks with "
                        f"loss=tl.losses.TaskWeights({{task: weight}} or 'uncertainty') instead.")
    task_weights = None if loss is None else loss.as_given()
    names = [t[0] for t in head.tasks]
    if task_weights is None:
        return MultiLoss(head.tasks, tuple(1.0 for _ in names))
    if isinstance(task_weights, str):
        if task_weights != "uncertainty":
            raise DataError(f"Expected task_weights as a dict {{task: weight}} or "
                            f"'uncertainty'; received {task_weights!r}.")
        return MultiLoss(head.tasks, tuple(1.0 for _ in names), True)
    if not isinstance(task_weights, dict):
        raise DataError(f"Expected task_weights as a dict {{task: weight}} or 'uncertainty'; "
                        f"received {type(task_weights).__name__}.")
    unknown = [t for t in task_weights if t not in names]
    if unknown:
        raise DataError(f"Unknown task(s) {unknown} in TaskWeights. Expected names among "
                        f"{names}.")
    weights = []
    for t in names:
        w = task_weights.get(t, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise DataError(f"Expected task weight for {t!r} as a finite number >= 0; "
                            f"received {w!r}.")
        weights.append(float(w))
    return MultiLoss(head.tasks, tuple(weights))


# ------------------------------------------------------------------------------- labels
def pack_labels(y, n: int, tasks: tuple, dtype: str = "float64", what: str = "labels") -> np.ndarray:
    """{task: labels} -> (N, sum K_t) floats with NaN for missing labels, checked per task."""
    names = [t[0] for t in tasks]
    if not isinstance(y, dict):
        raise DataError(f"Expected {what} as a dict {{task: labels}} for a multi-task head "
                        f"(tasks {names}); received {type(y).__name__}.")
    unknown = [t for t in y if t not in names]
    if unknown:
        raise DataError(f"Unknown task(s) {unknown} in {what}. Expected names among {names}.")
    missing = [t for t in names if t not in y]
    if missing:
        raise DataError(f"Expected {what} for every task {names}; received none for "
                        f"{missing}. Mark a missing label NaN (or -1 for a CE class index) "
                        f"instead of leaving its task out.")
    blocks = []
    for name, loss, k, _ in tasks:
        blocks.append(_task_block(np.asarray(y[name]), n, k, loss, f"{what}[{name!r}]"))
    return np.ascontiguousarray(np.concatenate(blocks, axis=1).astype(dtype))


def _task_block(y, n, k, loss, what):
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"Expected numeric {what}; received dtype {y.dtype}.")
    y = y.astype(np.float64)
    if loss == "ce" and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and k > 1)):
        idx = y.reshape(-1)
        if len(idx) != n:
            raise ShapeError(f"Expected {what} with one class index per sample ({n}); "
                             f"received {len(idx)}.")
        gone = np.isnan(idx) | (idx == -1)
        out = np.full((n, k), np.nan)
        if (~gone).any():
            present = idx[~gone]
            bad = (present != np.round(present)) | (present < 0) | (present >= k)
            if bad.any():
                raise DataError(f"Expected class indices in [0, {k}) (or -1 / NaN for a missing "
                                f"label) in {what}; received {np.unique(present[bad])[:5].tolist()}.")
            out[~gone] = losses.prepare_labels(present.astype(np.int64), int((~gone).sum()), k,
                                               "ce", "float64", what)
        return out
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.shape != (n, k):
        raise ShapeError(f"Expected {what} of shape ({n}, {k}){' or (N,)' if k == 1 else ''}"
                         f"{' or class indices (N,)' if loss == 'ce' else ''}; received {y.shape}.")
    return check_block(y, loss, what)


def check_block(y: np.ndarray, loss: str, what: str) -> np.ndarray:
    """A task's (N, K) block with NaN for missing labels: present values fit the loss."""
    if np.isinf(y).any():
        raise DataError(f"Expected finite {what} (NaN marks a missing label); received inf.")
    if loss == "ce":
        partial = np.isnan(y).any(axis=1) & ~np.isnan(y).all(axis=1)
        if partial.any():
            raise DataError(f"Expected each row of {what} either complete or all NaN (missing); "
                            f"received {int(partial.sum())} partly missing row(s).")
        rows = ~np.isnan(y).any(axis=1)
        if rows.any():
            y = y.copy()
            y[rows] = losses.prepare_labels(y[rows], int(rows.sum()), y.shape[1], "ce",
                                            "float64", what)
    elif loss == "bce":
        present = y[~np.isnan(y)]
        bad = ~((present == 0) | (present == 1))
        if bad.any():
            raise DataError(f"Expected {what} in {{0, 1}} (or NaN for missing) for binary "
                            f"cross-entropy; received {np.unique(present[bad])[:5].tolist()}.")
    return y


def check_packed(y: np.ndarray, ml: MultiLoss, what: str) -> np.ndarray:
    for (name, loss, _, _), (a, b) in zip(ml.tasks, ml.slices().values()):
        check_block(np.asarray(y[:, a:b], np.float64), loss, f"{what} of task {name!r}")
    return y


# ------------------------------------------------------------------------------- numpy formulas
def task_losses(z, y, ml: MultiLoss) -> np.ndarray:
    """(T,) L_t over present labels (0 for a task with none)."""
    return task_losses_and_presence(z, y, ml)[0]


def task_losses_and_presence(z, y, ml: MultiLoss):
    """((T,) L_t, (T,) h_t): each task's loss over its present labels, and whether it has any."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    out, has = [], []
    for t, (a, b) in enumerate(ml.slices().values()):
        zt, yt = z[:, a:b], y[:, a:b]
        loss = ml.task_loss(t)
        if loss.name == "ce":
            rows = ~np.isnan(yt).any(axis=1)
            out.append(losses.value(zt[rows], yt[rows], loss) if rows.any() else 0.0)
            has.append(float(rows.any()))
        else:
            present = ~np.isnan(yt)
            has.append(float(present.any()))
            if not present.any():
                out.append(0.0)
                continue
            per = losses.elementwise(zt, np.where(present, yt, 0.0), loss.name)
            out.append(float(per[present].sum() / present.sum()))
    return np.asarray(out), np.asarray(has)


def total(parts: np.ndarray, ml: MultiLoss, log_vars=None, has=None) -> float:
    if ml.uncertainty:
        s = np.asarray(log_vars, np.float64)
        h = np.ones_like(s) if has is None else np.asarray(has, np.float64)
        return float(np.sum(h * (np.exp(-s) * parts + s)))
    return float(np.dot(ml.weights, parts))


def split(z, ml_or_tasks) -> dict:
    """{task: its columns of z}."""
    tasks = ml_or_tasks.tasks if isinstance(ml_or_tasks, MultiLoss) else ml_or_tasks
    out, start = {}, 0
    for name, _, k, _ in tasks:
        out[name] = z[:, start:start + k]
        start += k
    return out


def scores(z, y, ml: MultiLoss, log_vars=None) -> dict:
    """{"loss": total, "<task>_loss", "<task>_<metric>" ...}: each task scored on its present
    labels by losses.scores (NaN metrics for a task without labels in the data)."""
    parts, has = task_losses_and_presence(z, y, ml)
    out = {"loss": total(parts, ml, log_vars, has)}
    for t, ((name, _, k, _), (a, b)) in enumerate(zip(ml.tasks, ml.slices().values())):
        zt, yt = np.asarray(z)[:, a:b], np.asarray(y)[:, a:b]
        loss = ml.task_loss(t)
        rows = ~np.isnan(yt).any(axis=1)     # metrics: the rows with every label present
        if rows.any():
            s = losses.scores(zt[rows], yt[rows], loss)
        else:
            s = {key: float("nan") for key in losses.score_names(k, loss.name)}
        s["loss"] = float(parts[t]) if has[t] else float("nan")   # no labels: no loss to report
        out.update({f"{name}_{key}": v for key, v in s.items()})
    return out


def history_names(ml: MultiLoss) -> list[str]:
    """The training-side keys fine_tune adds per epoch."""
    names = [f"loss_{t[0]}" for t in ml.tasks]
    return names + ([f"log_var_{t[0]}" for t in ml.tasks] if ml.uncertainty else [])


def score_names(ml: MultiLoss) -> list[str]:
    names = ["loss"]
    for t, (name, loss, k, _) in enumerate(ml.tasks):
        names += [f"{name}_{key}" for key in losses.score_names(k, loss)]
    return names


losses.register_head_loss("multi", of)
