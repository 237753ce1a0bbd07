"""Scoring a model on a data set, one batch at a time, with its loss's metrics."""
from __future__ import annotations

import numpy as np

from .. import api, data as tldata
from ..errors import DataError
from ..kinds import Composite
from .feed import as_dataset, check_data


def evaluate(m, data, *, batch_size: int = 64, loss=None) -> dict:
    """The head's loss (or `loss=`: a name, tl.losses.Loss, or tl.losses.TaskWeights for a
    multi-task head) and its metrics (tlbridge/losses.py, `scores`): bce: accuracy (0.5
    threshold / argmax) and ROC AUC for one output; ce: accuracy and top-5 accuracy (K > 5);
    mse: mean absolute error. A FusedModel is scored with BCE. A multi-task head: the weighted
    total and every task's loss and metrics ("<task>_<metric>")."""
    if isinstance(m, Composite):
        spec, data = m._evaluation(data)
    else:
        m = api._check_model(m)
        api._need_head(m, "evaluate")
        spec = api.loss_spec(m, loss)
    ds = check_data(m, as_dataset(data, batch_size, False, 0, m.dtype, "data", m, spec),
                    "data", spec)
    return evaluate_dataset(m, ds, batch_size, spec)


def evaluate_dataset(m, ds: tldata.Dataset, batch_size: int, loss) -> dict:
    """Scores over the whole set, computed one batch at a time (no full decoded copy)."""
    zs, ys = [], []
    for _, xb, yb in ds.indexed_batches():
        zs.append(api.logits(m, xb, batch_size=batch_size))
        ys.append(yb)
    if not zs:
        raise DataError(f"Expected at least one readable image; received none of "
                        f"{ds.num_samples} (see ds.skipped).")
    z, y = np.concatenate(zs), np.concatenate(ys)
    return loss.scores(z, y, api.get_weights(m) if loss.needs_weights else None)
