"""Few-shot learning on a pretrained backbone: heads from a handful of examples per class.

prototype_head: Prototypical Networks (Snell et al. 2017). A class's prototype is the mean of
its support features; squared-Euclidean scoring -||f - mu_k||^2 = 2 mu_k.f - ||mu_k||^2 - ||f||^2,
and the last term is the same for every class, so the softmax over classes is that of a linear
head W = 2 mu, b = -||mu||^2: a CE head in closed form, which saves, converts and fine-tunes
like any head. Cosine: W = scale * mu / ||mu||, b = 0 (the score is scale * ||f|| cos(f, mu_k):
the cosine's argmax, with a per-sample temperature, as a linear head can only give).
linear_probe: a logistic-regression head fitted on the features by scikit-learn (L-BFGS), the
same features and so the same head on both backends.
few_shot_eval: mean accuracy over episodes (tl.data.episodes) and its 95% confidence interval.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import inputs, optim
from .errors import ArgumentTypeError, DataError, ShapeError
from .model import TransferModel

METRICS = ("euclidean", "cosine")
METHODS = ("prototype", "probe", "finetune")


def _class_indices(y, n: int, what: str = "support_y", num_classes: int | None = None):
    """Class indices (N,) from indices or one-hot rows; K = num_classes or max + 1."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
            raise DataError(f"Expected {what} as class indices (N,) or one-hot rows; received "
                            f"rows that are not one-hot.")
        k = y.shape[1] if num_classes is None else num_classes
        y = np.argmax(y, axis=1)
    else:
        y = y.reshape(-1)
        k = None
    if len(y) != n:
        raise ShapeError(f"Expected one {what} label per image ({n}); received {len(y)}.")
    if not (np.issubdtype(y.dtype, np.number) and np.all(np.isfinite(y.astype(float)))
            and np.array_equal(y, np.round(y)) and (len(y) == 0 or y.min() >= 0)):
        raise DataError(f"Expected {what} as non-negative integer class indices; received "
                        f"{np.unique(y)[:5].tolist()}.")
    y = y.astype(np.int64)
    k = int(y.max()) + 1 if k is None and num_classes is None else (k or num_classes)
    if len(y) and y.max() >= k:
        raise DataError(f"Expected {what} class indices in [0, {k}); received {int(y.max())}.")
    counts = np.bincount(y, minlength=k)
    empty = np.nonzero(counts == 0)[0].tolist()
    if empty:
        raise DataError(f"Expected at least one support example for every class 0..{k - 1}; "
                        f"received none for class(es) {empty}. Add examples, or renumber the "
                        f"classes without gaps.")
    return y, k


def prototypes(features: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """(K, D) class means of float64 features."""
    f = np.asarray(features, np.float64)
    out = np.zeros((k, f.shape[1]))
    np.add.at(out, y, f)
    return out / np.bincount(y, minlength=k)[:, None]


def prototype_weights(mu: np.ndarray, metric: str = "euclidean", scale: float = 10.0):
    """(W, b) of the linear head that scores like the prototypes."""
    if metric == "euclidean":
        return 2.0 * mu, -np.sum(mu * mu, axis=1)
    norm = np.linalg.norm(mu, axis=1, keepdims=True)
    return scale * mu / np.maximum(norm, 1e-12), np.zeros(len(mu))


def _check_metric(metric, scale):
    if metric not in METRICS:
        raise DataError(f"Unknown metric {metric!r}. Expected one of {list(METRICS)}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise DataError(f"Expected scale as a positive number; received {scale!r}.")


def _features(m, x, batch_size: int = 64):
    from . import api
    return np.asarray(api.features(m, x, batch_size=batch_size), np.float64)


def _with_linear_head(m, w: np.ndarray, b: np.ndarray, loss: str):
    """A new model sharing m's backbone, with a linear head holding (w, b) and `loss`."""
    from . import api
    new = api.replace_head(m, len(w), loss=loss, seed=0)
    api.set_weights(new, {"head.weight": w, "head.bias": b}, strict=False)
    return new


def prototype_head(m: TransferModel, support_x, support_y, *, metric: str = "euclidean",
                   scale: float = 10.0, num_classes: int | None = None) -> TransferModel:
    """A new model sharing m's backbone with a CE head of one output per class, set in closed
    form from the support set's class means (see the module docstring)."""
    from . import api, validation
    api._check_model(m)
    _check_metric(metric, scale)
    x = validation.check_inputs(support_x, m.inputs, m.dtype, "support_x")
    y, k = _class_indices(support_y, inputs.length(x), "support_y", num_classes)
    if k < 2:
        raise DataError(f"Expected at least 2 classes in the support set; received {k}.")
    w, b = prototype_weights(prototypes(_features(m, x), y, k), metric, float(scale))
    return _with_linear_head(m, w, b, "ce")


def fit_probe(f: np.ndarray, y: np.ndarray, k: int, l2: float, binary: bool = False):
    """(W, b) minimising mean CE (or BCE when binary) + l2/2 ||W||^2 on features f, with
    scikit-learn's L-BFGS (its C is 1 / (l2 N)). Two classes are one binary fit w, returned as
    CE rows [-w/2, w/2]: the same probabilities, and an l2 that acts on w (= 2 l2 on the rows)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:     # pragma: no cover - scikit-learn is in every extra
        from .errors import BackendNotInstalledError
        raise BackendNotInstalledError(
            'tl.linear_probe needs scikit-learn, which is not installed. Install it with pip '
            'install scikit-learn, or pip install "tlbridge[torch]" / "tlbridge[keras]", which '
            'bring it.') from exc
    f = np.asarray(f, np.float64)
    clf = LogisticRegression(C=1.0 / (l2 * len(f)), tol=1e-10, max_iter=5000)
    clf.fit(f, y)
    w, b = clf.coef_, clf.intercept_
    if binary:
        return w, b
    if k == 2:                     # sklearn's one row a.f + c for two classes: softmax of
        return np.concatenate([-w, w]) / 2, np.concatenate([-b, b]) / 2   # [-s/2, s/2] is sigmoid(s)
    return w, b


def linear_probe(m: TransferModel, x, y, *, l2: float = 1e-3, loss: str | None = None,
                 num_classes: int | None = None) -> TransferModel:
    """A new model sharing m's backbone with a logistic-regression head fitted in numpy
    (scikit-learn) on its features: multinomial (loss="ce", class indices or one-hot y, the
    default) or one binary output (loss="bce", y in {0, 1} of shape (N,) or (N, 1))."""
    from . import api, validation
    api._check_model(m)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
        raise DataError(f"Expected l2 as a positive number; received {l2!r}.")
    x = validation.check_inputs(x, m.inputs, m.dtype, "x")
    y_arr = np.asarray(y)
    if loss is None:
        loss = "ce"
    if loss == "bce":
        yb = validation.check_labels(y_arr, inputs.length(x), 1, "float64")[:, 0]
        if len(np.unique(yb)) < 2:
            raise DataError("Expected both classes 0 and 1 among the labels for a binary probe.")
        w, b = fit_probe(_features(m, x), yb.astype(np.int64), 2, float(l2), binary=True)
        return _with_linear_head(m, w, b, "bce")
    if loss != "ce":
        raise DataError(f"Expected loss 'ce' (classes) or 'bce' (one binary output) for a "
                        f"linear probe; received {loss!r}.")
    yi, k = _class_indices(y_arr, inputs.length(x), "y", num_classes)
    if k < 2:
        raise DataError(f"Expected at least 2 classes for a probe; received {k}.")
    w, b = fit_probe(_features(m, x), yi, k, float(l2))
    return _with_linear_head(m, w, b, "ce")


# ------------------------------------------------------------------------------- evaluation
def _accuracy(w, b, fq, yq) -> float:
    return float(np.mean(np.argmax(fq @ w.T + b, axis=1) == yq))


def few_shot_eval(m: TransferModel, episodes, method: str = "prototype", *,
                  metric: str = "euclidean", scale: float = 10.0, l2: float = 1e-3,
                  fine_tune_kwargs: dict | None = None, batch_size: int = 64) -> dict:
    """Mean query accuracy over episodes and its 95% confidence interval (1.96 standard
    errors), per Snell et al. / Chen et al.'s protocol.

    prototype: class means of support features, queries scored by the closed-form head;
    probe: a logistic-regression head on support features (l2); finetune: the prototype head
    on a copy of m, then tl.fine_tune on the support set (fine_tune_kwargs; default 10 epochs
    of SGD, lr 0.01, head only) and scored on the queries. Features for prototype and probe
    are computed once per distinct image (episodes share images).
    """
    from . import api
    from .data import Episodes
    api._check_model(m)
    if method not in METHODS:
        raise DataError(f"Unknown method {method!r}. Expected one of {list(METHODS)}.")
    if not isinstance(episodes, Episodes):
        raise ArgumentTypeError(f"Expected episodes from tl.data.episodes(...); received "
                                f"{type(episodes).__name__}.")
    _check_metric(metric, scale)
    accs = []
    if method in ("prototype", "probe"):
        used = np.unique(np.concatenate([np.concatenate([e.support, e.query])
                                         for e in episodes]))
        got = _features(m, inputs.cast(inputs.rows(episodes.x, used), m.dtype), batch_size)
        feats = np.zeros((inputs.length(episodes.x), got.shape[1]))
        feats[used] = got
        for e in episodes:
            fs, fq = feats[e.support], feats[e.query]
            if method == "prototype":
                w, b = prototype_weights(prototypes(fs, e.support_y, e.n_way), metric, scale)
            else:
                w, b = fit_probe(fs, e.support_y, e.n_way, l2)
            accs.append(_accuracy(w, b, fq, e.query_y))
    else:
        from .fusion import _copy
        from .training import fine_tune
        kw = {"epochs": 10, "optimizer": optim.SGD(0.01), "batch_size": 32, "progress": False,
              **(fine_tune_kwargs or {})}
        for e in episodes:
            c = _copy(m)
            xs = inputs.cast(inputs.rows(episodes.x, e.support), m.dtype)
            h = prototype_head(c, xs, e.support_y, metric=metric, scale=scale)
            if "unfreeze" not in kw:
                api.freeze(h, "backbone")
            fine_tune(h, (xs, e.support_y), **kw)
            z = api.logits(h, inputs.cast(inputs.rows(episodes.x, e.query), m.dtype),
                           batch_size=batch_size)
            accs.append(float(np.mean(np.argmax(z, axis=1) == e.query_y)))
    accs = np.asarray(accs)
    half = 1.96 * accs.std(ddof=1) / np.sqrt(len(accs)) if len(accs) > 1 else float("nan")
    return {"accuracy": float(accs.mean()), "ci95": float(half), "episodes": len(accs),
            "per_episode": accs.tolist()}


def transfer_labels(m: TransferModel, source_classes, target_classes, mapping: dict | None = None,
                    *, seed: int | None = None) -> TransferModel:
    """A new model sharing m's backbone (and hidden head layers) whose last head layer has
    one row per target class: a target class that matches a source class (same name, or
    mapping[target] = source) keeps that class's row, so it scores exactly as before; the
    others start from torch.nn.Linear's default init drawn with `seed`."""
    from . import api
    api._check_model(m)
    api._need_head(m, "transfer_labels")
    if m.spec.head.tasks:
        raise DataError("Expected a model with one head for transfer_labels; received a "
                        "multi-task model. Transfer a task's classes by building its head "
                        "with tl.replace_head first.")
    source, target = [list(map(str, c)) for c in (source_classes, target_classes)]
    head = m.spec.head
    if len(source) != head.num_outputs:
        raise ShapeError(f"Expected {head.num_outputs} source classes (the head's outputs); "
                         f"received {len(source)}: {source[:5]}.")
    for name, classes in (("source_classes", source), ("target_classes", target)):
        if len(set(classes)) != len(classes) or not classes:
            raise DataError(f"Expected {name} as distinct class names; received {classes}.")
    mapping = {str(k): str(v) for k, v in (mapping or {}).items()}
    bad_t = [t for t in mapping if t not in target]
    bad_s = [s for s in mapping.values() if s not in source]
    if bad_t or bad_s:
        raise DataError(f"Expected mapping from target classes {target} to source classes "
                        f"{source}; received unknown "
                        + (f"target(s) {bad_t}" if bad_t else "")
                        + (" and " if bad_t and bad_s else "")
                        + (f"source(s) {bad_s}" if bad_s else "") + ".")
    rows = {t: source.index(mapping.get(t, t)) for t in target
            if mapping.get(t, t) in source}
    if head.loss == "ce" and len(target) < 2:
        raise DataError("Expected at least 2 target classes for a CE head.")
    new_head = replace(head, num_outputs=len(target))
    new = api.attach_head(m, new_head, api.linear_init(new_head, seed))
    old, fresh = api.get_weights(m), api.get_weights(new)
    last = head.layer_names()[-1]
    w, b = fresh[last + ".weight"].copy(), fresh[last + ".bias"].copy()
    for i, t in enumerate(target):
        if t in rows:
            w[i], b[i] = old[last + ".weight"][rows[t]], old[last + ".bias"][rows[t]]
    update = {k: v for k, v in old.items() if k.startswith("head.") and not k.startswith(last + ".")}
    update.update({last + ".weight": w, last + ".bias": b})
    api.set_weights(new, update, strict=False)
    new.report["transferred"] = {t: source[r] for t, r in rows.items()}
    return new
