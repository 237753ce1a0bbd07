"""Fuse in output space: an ensemble of tlbridge models, on any mix of backends.

tl.fuse(members, "mean" | "weighted") returns a FusedModel whose logits are a convex
combination of its members' (space="logit") or whose probabilities are (space="prob"). The
members run natively, each on its own backend; the combination is numpy, so a torch member
and a Keras member fuse into one model. Weights for "weighted" are fitted on validation data
by minimising the fused BCE over the simplex (convex in the weights, in both spaces).
"stack" fits a logistic regression per output on the members' logits (Wolpert's stacked
generalisation), from out-of-fold outputs only: computed here by k-fold fine-tuning of copies,
given by the caller, or a held-out set the members were not trained on.
"gate" weighs the members per input with a small network trained by tl.fine_tune: one native
model on one backend holding frozen copies of the members (tlbridge/gate.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from . import api, config, gate, inputs, losses, metrics, optim, validation
from . import weights as wio
from .errors import (ArgumentTypeError, CheckpointError, DataError, NoHeadError, NotPortableError,
                     ShapeError)
from .kinds import Composite
from .model import TransferModel
from .specs import ModelSpec
from .training import Checkpoint, fine_tune

METHODS = ("mean", "weighted", "stack", "gate")
GATE_RECIPE = {"epochs": 20, "optimizer": optim.Adam(1e-2), "batch_size": 64}
SPACES = ("logit", "prob")
FORMAT = "tlbridge.fused/1"
_EPS = 1e-12


@dataclass(repr=False)
class FusedModel(Composite):
    """Members plus fusion parameters. mean/weighted: `weights` (M,) sum to 1; stack:
    `weights` (M, K) and `bias` (K,), the logistic regression per output; gate: `gate`, the
    native gated model (its members are frozen copies, `members`), and `weights` None: they
    differ per input (fusion.gate_weights). `report` holds what fitting saw (members' and the
    fused model's loss on the data it was fitted on)."""

    members: list
    method: str
    space: str
    weights: np.ndarray | None
    report: dict = field(default_factory=dict)
    bias: np.ndarray | None = None
    gate: TransferModel | None = None
    gate_backbone: TransferModel | None = None
    preprocess: str | list | None = None   # None | "images" | one callable per member

    @property
    def num_outputs(self) -> int:
        return self.members[0].num_outputs

    @property
    def input_shape(self) -> tuple | None:
        """None when each member maps the input itself (preprocess= callables)."""
        return None if isinstance(self.preprocess, list) else self.members[0].input_shape

    @property
    def inputs(self) -> tuple | None:
        """The members' declared inputs (None when each member maps the input itself)."""
        return None if isinstance(self.preprocess, list) else self.members[0].inputs

    @property
    def dtype(self) -> str:
        return self.members[0].dtype

    @property
    def backends(self) -> list[str]:
        return [m.backend for m in self.members]

    @property
    def backend(self) -> str:
        return self.members[0].backend if len(set(self.backends)) == 1 else "mixed"

    def __repr__(self) -> str:
        names = ", ".join(f"{m.backbone_name}@{m.backend}" for m in self.members)
        if self.gate is not None:
            spec = self.gate.spec
            return (f"FusedModel(gate on {dict(spec.options)['gate_on']}, hidden="
                    f"{spec.head.hidden}, members=[{names}])")
        pre = "" if self.preprocess is None else (
            f", preprocess={self.preprocess!r}" if isinstance(self.preprocess, str)
            else ", preprocess=<per-member callables>")
        return (f"FusedModel({self.method}, space={self.space!r}, members=[{names}], "
                f"weights={np.round(self.weights, 4).tolist()}{pre})")

    # the model API's verbs (tlbridge/kinds.py Composite)
    def _logits(self, x, batch_size: int):
        return fused_logits(self, x, batch_size)

    def _probabilities(self, z):
        return metrics.sigmoid(z)

    def _save(self, path) -> None:
        save(self, path)

    def _convert(self, backend: str):
        return convert(self, backend)

    def _trained_model(self) -> TransferModel:
        if self.gate is None:
            raise DataError(
                f"fine_tune trains the gate of a gated fusion (method='gate'); received a "
                f"FusedModel with method={self.method!r}, whose weights tl.fuse fits. "
                f"Fine-tune the members before fusing them.")
        return self.gate

    def _evaluation(self, data):
        """Scored with BCE; images given for per-member preprocessing stay exact 0-255 floats."""
        if self.preprocess == "images" and isinstance(data, (tuple, list)) and len(data) == 2:
            data = (np.asarray(data[0]).astype(np.float32), data[1])
        return losses.Loss(), data


# ------------------------------------------------------------------------------- combining
def _logit(p):
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def member_logits(f: FusedModel, x, batch_size: int = 64) -> np.ndarray:
    """(M, N, K) float64: every member's logits on x; NaN or inf is refused, naming the member."""
    outs = []
    for i, m in enumerate(f.members):
        z = np.asarray(api.logits(m, member_input(f.preprocess, i, m, x), batch_size=batch_size),
                       np.float64)
        _check_finite(z, i, m)
        outs.append(z)
    return np.stack(outs)


def member_input(preprocess, i: int, m, x):
    """What member i is given for the fused model's input x: x itself (preprocess=None), its
    own normalisation of RGB images (preprocess="images", tl.preprocess(member, images)), or
    preprocess[i](x)."""
    if preprocess is None:
        return x
    if preprocess == "images":
        return api.preprocess(m, _as_uint8(x))
    return np.asarray(preprocess[i](x))


def _as_uint8(x):
    """RGB images as uint8; float arrays are accepted when they hold 0-255 integers (a
    tl.data dataset hands batches over as floats)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.number) and x.size and np.all(np.isfinite(x)) \
            and x.min() >= 0 and x.max() <= 255 and np.array_equal(x, np.round(x)):
        return x.astype(np.uint8)
    raise DataError(f"Expected RGB images as uint8 0-255 with preprocess='images' (each member "
                    f"normalises them its own way); received dtype {x.dtype}"
                    f"{'' if x.dtype.kind not in 'fc' else ' with values that are not 0-255 integers'}.")


def _check_preprocess(preprocess, n: int):
    if preprocess is None or preprocess == "images":
        return preprocess
    if isinstance(preprocess, (list, tuple)) and len(preprocess) == n \
            and all(callable(p) for p in preprocess):
        return list(preprocess)
    raise DataError(f"Expected preprocess as None (members take the input as it is), 'images' "
                    f"(uint8 RGB images, each member normalises them with tl.preprocess) or a "
                    f"list of {n} callables (one per member: fused input -> that member's "
                    f"input); received {preprocess!r}.")


def _check_finite(z, i, m):
    if not np.all(np.isfinite(z)):
        bad = int(np.sum(~np.isfinite(z)))
        raise DataError(f"Expected finite outputs from every member; member {i} "
                        f"({m.backbone_name} on {m.backend}) gave {bad} NaN/inf value(s). "
                        f"Check that member's weights (tl.get_weights) and the inputs.")


def combine(zs: np.ndarray, weights: np.ndarray, space: str, bias=None) -> np.ndarray:
    """The fused logits from members' logits (M, N, K)."""
    if bias is not None:                                   # stack: b_k + sum_i a_ik z_ik
        return np.einsum("mk,mnk->nk", np.asarray(weights, np.float64), zs) + bias
    w = np.asarray(weights, np.float64).reshape(-1, 1, 1)
    if space == "logit":
        return np.sum(w * zs, axis=0)
    return _logit(np.sum(w * metrics.sigmoid(zs), axis=0))


def fused_logits(f: FusedModel, x, batch_size: int = 64) -> np.ndarray:
    if f.gate is not None:
        return api.logits(f.gate, x, batch_size=batch_size)
    return combine(member_logits(f, x, batch_size), f.weights, f.space, f.bias).astype(f.dtype)


def fit_stacker(zs: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 100):
    """Per output k, L2-regularised logistic regression of y[:, k] on the members' logits
    zs[:, :, k] (bias unpenalised), by Newton's method: (M, K) coefficients and (K,) biases.
    The loss is the mean BCE + l2/2 ||a||^2, strictly convex, so Newton converges."""
    m, n, k = zs.shape
    coef, bias = np.zeros((m, k)), np.zeros(k)
    for j in range(k):
        X = np.concatenate([zs[:, :, j].T, np.ones((n, 1))], axis=1)      # (N, M + 1)
        t = y[:, j]
        theta = np.zeros(m + 1)
        reg = np.full(m + 1, l2)
        reg[-1] = 0.0
        for _ in range(iters):
            p = metrics.sigmoid(X @ theta)
            grad = X.T @ (p - t) / n + reg * theta
            hess = (X * (p * (1 - p))[:, None]).T @ X / n + np.diag(reg) + 1e-12 * np.eye(m + 1)
            delta = np.linalg.solve(hess, grad)
            theta -= delta
            if np.max(np.abs(delta)) < 1e-12:
                break
        coef[:, j], bias[j] = theta[:m], theta[m]
    return coef, bias


def _copy(m):
    return api._rebuild(m.spec, m.backend, api.get_weights(m), set(m.frozen), device=m.device)


def _recipes(fine_tune_kwargs, n: int) -> list[dict]:
    """One fine_tune recipe per member: a dict for all, or a list of n dicts."""
    if fine_tune_kwargs is None or isinstance(fine_tune_kwargs, dict):
        return [dict(fine_tune_kwargs or {})] * n
    if isinstance(fine_tune_kwargs, (list, tuple)) and len(fine_tune_kwargs) == n \
            and all(isinstance(k, dict) for k in fine_tune_kwargs):
        return [dict(k) for k in fine_tune_kwargs]
    raise DataError(f"Expected fine_tune_kwargs as a dict (one recipe for every member) or a "
                    f"list of {n} dicts (one per member); received {fine_tune_kwargs!r}.")


def _own_place(recipe: dict, place: str) -> dict:
    """The recipe with its checkpoint moved to a sub-directory of its own: every fold (and
    each final member) checkpoints and resumes only itself, never a run trained on other rows."""
    ck = recipe.get("checkpoint")
    if ck is None:
        return recipe
    ck = ck if isinstance(ck, Checkpoint) else Checkpoint(ck)
    return {**recipe, "checkpoint": Checkpoint(os.path.join(os.fspath(ck.directory), place),
                                               ck.resume)}


def out_of_fold(members, x, y, folds: int, fine_tune_kwargs, seed: int = 0,
                batch_size: int = 64, preprocess=None) -> np.ndarray:
    """(M, N, K) logits of every sample from copies of each member fine-tuned without it:
    k folds, a seeded permutation, each copy starting from the member's current weights."""
    n = inputs.length(x)
    if not (isinstance(folds, (int, np.integer)) and not isinstance(folds, bool)
            and 2 <= folds <= n):
        raise DataError(f"Expected folds as an int in [2, {n}] (samples); received {folds!r}.")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    recipes = _recipes(fine_tune_kwargs, len(members))
    out = np.zeros((len(members), n, y.shape[1]))
    for i, (m, kw) in enumerate(zip(members, recipes)):
        xi = member_input(preprocess, i, m, x)
        for k, held in enumerate(parts):
            keep = np.setdiff1d(np.arange(n), held)
            c = _copy(m)
            fine_tune(c, (inputs.rows(xi, keep), y[keep]),
                      **{"progress": False, **_own_place(kw, f"member{i}_fold{k}")})
            out[i, held] = api.logits(c, inputs.rows(xi, held), batch_size=batch_size)
        _check_finite(out[i], i, m)
    return out


# ------------------------------------------------------------------------------- fitting
def _loss_and_grad(zs, y, w, space):
    """Mean BCE of the fused output and its gradient with respect to the weights."""
    n = y.size
    if space == "logit":
        z = np.tensordot(w, zs, axes=1)
        loss = metrics.bce_from_logits(z, y)
        dz = (metrics.sigmoid(z) - y) / n
        return loss, np.tensordot(zs, dz, axes=([1, 2], [0, 1]))
    ps = metrics.sigmoid(zs)
    p = np.clip(np.tensordot(w, ps, axes=1), _EPS, 1.0 - _EPS)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    dp = (-(y / p) + (1 - y) / (1 - p)) / n
    return loss, np.tensordot(ps, dp, axes=([1, 2], [0, 1]))


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008, sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def fit_weights(zs: np.ndarray, y: np.ndarray, space: str, iters: int = 500,
                tol: float = 1e-12) -> np.ndarray:
    """Simplex weights minimising the fused validation BCE: projected gradient descent with
    backtracking, started at the best single member, so the result is never worse than it
    (each accepted step lowers the loss)."""
    m = zs.shape[0]
    member_losses = [_loss_and_grad(zs, y, np.eye(m)[i], space)[0] for i in range(m)]
    w = np.eye(m)[int(np.argmin(member_losses))]
    loss, grad = _loss_and_grad(zs, y, w, space)
    step = 1.0
    for _ in range(iters):
        while True:
            cand = project_simplex(w - step * grad)
            c_loss, c_grad = _loss_and_grad(zs, y, cand, space)
            if c_loss <= loss - 1e-4 * np.dot(grad, w - cand) or step < 1e-12:
                break
            step *= 0.5
        if c_loss > loss or loss - c_loss <= tol * max(1.0, abs(loss)):
            if c_loss <= loss:
                w, loss = cand, c_loss
            break
        w, loss, grad = cand, c_loss, c_grad
        step *= 2.0
    return w


# ------------------------------------------------------------------------------- checks
def check_model_list(models, arg: str, one: str, purpose: str) -> list:
    """A non-empty list of tlbridge models with heads (fuse's members, soup's ingredients)."""
    if isinstance(models, TransferModel) or not isinstance(models, (list, tuple)):
        raise ArgumentTypeError(f"Expected {arg} as a list of tlbridge models; received "
                                f"{type(models).__name__}.")
    models = list(models)
    if not models:
        raise DataError(f"Expected at least one {one} {purpose}; received an empty list.")
    for i, m in enumerate(models):
        if not isinstance(m, TransferModel):
            raise ArgumentTypeError(f"Expected every {one} to be a tlbridge TransferModel; "
                                    f"{one} {i} is {type(m).__name__}.")
        if m.spec.head is None:
            raise NoHeadError(f"Expected {one}s with a head; {one} {i} ({m.backbone_name}) "
                              f"has none. Call tl.replace_head on it first.")
        if m.spec.head.loss != "bce" and purpose == "to fuse":
            raise DataError(f"Expected members with bce heads (fusion combines sigmoid "
                            f"outputs); member {i} ({m.backbone_name}) has a "
                            f"{m.spec.head.loss!r} head.")
    return models


def _check_members(members, preprocess=None) -> list:
    members = check_model_list(members, "members", "member", "to fuse")
    first = members[0]
    for i, m in enumerate(members[1:], 1):
        if m.num_outputs != first.num_outputs:
            raise ShapeError(f"Expected every member to have {first.num_outputs} output(s) "
                             f"(member 0's); member {i} ({m.backbone_name} on {m.backend}) has "
                             f"{m.num_outputs}.")
        if isinstance(preprocess, (list, tuple)):
            continue                        # each member's callable makes its own input
        if tuple(m.input_shape) != tuple(first.input_shape):
            raise ShapeError(f"Expected every member to take images of shape "
                             f"{tuple(first.input_shape)} (member 0's); member {i} "
                             f"({m.backbone_name} on {m.backend}) takes {tuple(m.input_shape)}. "
                             f"Pass preprocess=[one callable per member] to map one input to "
                             f"each member's.")
    return members


def _check_weights(weights, m: int) -> np.ndarray:
    try:
        w = np.asarray(weights, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"Expected weights as {m} numbers; received {weights!r}.") from None
    if w.size != m:
        raise ShapeError(f"Expected {m} weights (one per member); received {w.size}.")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise DataError(f"Expected weights on the simplex (each >= 0, summing to 1); received "
                        f"{w.tolist()} (sum {w.sum():.6g}). Normalise them: w / sum(w).")
    return w / w.sum()


# ------------------------------------------------------------------------------- public
def fuse(members, method: str = "mean", *, val=None, space: str = "logit", weights=None,
         train=None, folds: int = 5, fine_tune_kwargs: dict | None = None, oof=None,
         force: bool = False, l2: float = 1e-3, seed: int = 0, batch_size: int = 64,
         gate_on="logits", hidden=(), dropout: float = 0.0, backend: str | None = None,
         preprocess=None) -> FusedModel:
    """An ensemble of `members` (tlbridge models on any backends, same outputs and input shape).

    method="mean": equal weights. method="weighted": `weights` as given (on the simplex), or
    fitted on `val=(x, y)` to minimise the fused BCE. space="logit" averages logits,
    space="prob" probabilities. With `val`, `report` holds every member's validation loss and
    the fused one.

    method="stack": a logistic regression per output on the members' logits, fitted on
    out-of-fold outputs from exactly one source: train=(x, y) with folds=k (a copy of each
    member per fold is fine-tuned with fine_tune_kwargs on the other folds and predicts the
    held-out one; then the member itself is fine-tuned on all of train, in place); oof=(outputs
    (M, N, K), y); or val=(x, y), refused when it is a member's own training data unless
    force=True. l2 regularises the coefficients.

    method="gate": softmax weights per input from a gate network (Linear layers, `hidden`
    widths, `dropout`) over the members' logits (gate_on="logits"), their backbone features
    ("features"), or the features of another model's backbone (gate_on=model). It runs as one
    native model on `backend` (default: the members' common backend, else the current one)
    holding frozen copies of the members (portable ones are converted); the gate starts as the
    mean. With train=(x, y) it is trained at once by tl.fine_tune with GATE_RECIPE updated by
    fine_tune_kwargs (val, early stopping, checkpoints: any fine_tune option); without, call
    tl.fine_tune(fused, ...) yourself. The members' own training data is refused as train
    unless force=True, as for "stack".

    preprocess: None (every member takes x as it is: same input shape), "images" (x are uint8
    RGB images; each member normalises them with its own tl.preprocess recipe, e.g. a Keras
    VGG16 checkpoint's caffe BGR beside torchvision's mean/std), or one callable per member
    mapping x to that member's input (members may then differ in input shape; such a fused
    model is not saved). Not with "gate", whose members share one native input.
    """
    n_members = len(members) if isinstance(members, (list, tuple)) else 0
    preprocess = _check_preprocess(preprocess, n_members)
    members = _check_members(members, preprocess)
    if method == "stack":
        if space != "logit":
            raise DataError(f"method='stack' combines logits; received space={space!r}.")
        return _stack(members, val=val, train=train, folds=folds, oof=oof, force=force,
                      fine_tune_kwargs=fine_tune_kwargs, l2=l2, seed=seed,
                      batch_size=batch_size, preprocess=preprocess)
    if method == "gate":
        _check_gate_arguments(preprocess, space, weights, oof)
        return _gate(members, train=train, val=val, gate_on=gate_on, hidden=hidden,
                     dropout=dropout, backend=backend, fine_tune_kwargs=fine_tune_kwargs,
                     force=force, seed=seed, batch_size=batch_size)
    return _average(members, method, space, weights, val, batch_size, preprocess)


def _check_gate_arguments(preprocess, space, weights, oof) -> None:
    if preprocess is not None:
        raise DataError("method='gate' runs its members as one native model on one input; "
                        "per-member preprocess= is not available with it. Preprocess the "
                        "inputs first, or use members that share one input.")
    if space != "logit":
        raise DataError(f"method='gate' sums logits; received space={space!r}.")
    if weights is not None or oof is not None:
        raise DataError("method='gate' learns its weights per input with fine_tune: pass "
                        "train=(x, y) (and val=) instead of weights= or oof=.")


def _average(members, method, space, weights, val, batch_size, preprocess) -> FusedModel:
    """mean / weighted: a convex combination of logits or probabilities; weights given, equal,
    or fitted on val."""
    if method not in METHODS:
        raise DataError(f"Unknown fusion method {method!r}. Expected one of {list(METHODS)}.")
    if space not in SPACES:
        raise DataError(f"Unknown fusion space {space!r}. Expected one of {list(SPACES)}.")
    n = len(members)
    if method == "mean":
        if weights is not None:
            raise DataError("method='mean' uses equal weights; pass weights= with "
                            "method='weighted'.")
        w = np.full(n, 1.0 / n)
    elif weights is not None:
        w = _check_weights(weights, n)
    elif val is None:
        raise DataError("method='weighted' needs val=(x_val, y_val) to fit the weights, or "
                        "weights=[...] on the simplex.")
    else:
        w = None
    f = FusedModel(members, method, space, np.full(n, 1.0 / n) if w is None else w,
                   preprocess=preprocess)
    if val is not None:
        x, y = _val_arrays(f, val)
        zs = member_logits(f, x, batch_size)
        if w is None:
            f.weights = fit_weights(zs, y, space)
        f.report = {"val_loss_members": [float(_loss_and_grad(zs, y, np.eye(n)[i], space)[0])
                                         for i in range(n)],
                    "val_loss": float(_loss_and_grad(zs, y, f.weights, space)[0])}
    return f


def _stack(members, *, val, train, folds, oof, force, fine_tune_kwargs, l2, seed, batch_size,
           preprocess=None):
    given = [k for k, v in (("train", train), ("oof", oof), ("val", val)) if v is not None]
    if len(given) != 1:
        raise DataError(f"Expected exactly one source of out-of-fold outputs for method='stack' "
                        f"(train=(x, y) with folds=k, oof=(outputs, y), or a held-out "
                        f"val=(x, y)); received {given or 'none'}.")
    f = FusedModel(members, "stack", "logit", np.zeros((len(members), members[0].num_outputs)),
                   preprocess=preprocess)
    if train is not None:
        x, y = _val_arrays(f, train, "train")
        recipes = _recipes(fine_tune_kwargs, len(members))
        zs = out_of_fold(members, x, y, folds, recipes, seed, batch_size, preprocess)
        for i, (m, kw) in enumerate(zip(members, recipes)):   # the final members: all of train
            fine_tune(m, (member_input(preprocess, i, m, x), y),
                      **{"progress": False, **_own_place(kw, f"member{i}_all")})
        source = f"out-of-fold ({folds} folds of {inputs.length(x)} samples)"
    elif oof is not None:
        if not (isinstance(oof, (tuple, list)) and len(oof) == 2):
            raise DataError("Expected oof as (outputs, y): outputs (M, N, K) logits, one (N, K) "
                            "block per member, and labels y (N, K).")
        zs = np.asarray(oof[0], np.float64)
        want = (len(members), len(zs[0]) if zs.ndim == 3 else -1, members[0].num_outputs)
        if zs.shape != want:
            raise ShapeError(f"Expected out-of-fold outputs of shape (members, N, outputs) = "
                             f"{want}; received {zs.shape}.")
        for i, m in enumerate(members):
            _check_finite(zs[i], i, m)
        y = np.asarray(validation.check_labels(oof[1], zs.shape[1], zs.shape[2], "float64"),
                       np.float64)
        source = "given out-of-fold outputs"
    else:
        x, y = _val_arrays(f, val)
        shares = _refuse_own_training_data(members, x, "val", "the stacker", force, preprocess)
        zs = member_logits(f, x, batch_size)
        forced = max(shares) > OVERLAP_MAX
        source = ("held-out val" if not forced else "val (forced: members' own training data)") \
            + f" ({_overlap_note(shares)})"
    f.weights, f.bias = fit_stacker(zs, y, l2)
    n = len(members)
    f.report = {"stack_source": source,
                "loss_members": [float(_loss_and_grad(zs, y, np.eye(n)[i], "logit")[0])
                                 for i in range(n)],
                "loss": metrics.bce_from_logits(combine(zs, f.weights, "logit", f.bias), y)}
    return f


def _gate(members, *, train, val, gate_on, hidden, dropout, backend, fine_tune_kwargs, force,
          seed, batch_size):
    gate.check_type(gate_on)
    if backend is None:     # the members' one backend, else the native-only members' one
        backends = {m.backend for m in members} if len({m.backend for m in members}) == 1 \
            else {m.backend for m in members if not m.portable}
        backend = backends.pop() if len(backends) == 1 else config.get_backend()
    backend = config.validate(backend)
    if fine_tune_kwargs is not None and not isinstance(fine_tune_kwargs, dict):
        raise DataError(f"Expected fine_tune_kwargs as one dict (the gate's recipe); received "
                        f"{type(fine_tune_kwargs).__name__}.")
    if fine_tune_kwargs and train is None:
        raise DataError("fine_tune_kwargs trains the gate and needs train=(x, y); received no "
                        "train. Pass train=, or call tl.fine_tune(fused, ...) later.")
    plain = FusedModel(members, "gate", "logit", None)     # shapes for the checks below
    if train is not None:
        x, y = _val_arrays(plain, train, "train")
        shares = _refuse_own_training_data(members, x, "train", "the gate", force)
    if val is not None:
        _val_arrays(plain, val)
    copies, gb, g = gate.build(members, backend=backend, gate_on=gate_on, hidden=hidden,
                               dropout=dropout, seed=seed)
    f = FusedModel(copies, "gate", "logit", None, gate=g, gate_backbone=gb)
    if train is not None:
        recipe = {"progress": False, **GATE_RECIPE, **(fine_tune_kwargs or {})}
        recipe.setdefault("val", val)
        history = fine_tune(f, (x, y), **recipe)
        f.report["history"] = history.epochs
        f.report["train_overlap"] = shares     # with each member's own training rows
    if val is not None:
        x, y = _val_arrays(f, val)
        zs = member_logits(f, x, batch_size)
        f.report.update({
            "val_loss_members": [metrics.bce_from_logits(z, y) for z in zs],
            "val_loss": metrics.bce_from_logits(fused_logits(f, x, batch_size), y),
            "val_gate_weights": gate_weights(f, x, batch_size).mean(axis=0).tolist()})
    return f


def gate_weights(f: FusedModel, x, batch_size: int = 64) -> np.ndarray:
    """(N, M): the weight a gated fusion gives each member on each input (rows sum to 1)."""
    if f.gate is None:
        raise DataError(f"gate_weights needs a gated fusion (method='gate'); received "
                        f"method={f.method!r}, whose weights are f.weights.")
    return gate.weights_per_input(f.gate, x, batch_size)


OVERLAP_MAX = 0.05      # the share of a member's training rows a "held-out" set may hold


def _refuse_own_training_data(members, x, what: str, who: str, force: bool,
                              preprocess=None) -> list:
    """Each member's overlap with x (the fraction of x's rows it was fine-tuned on, by content:
    a subset, another dtype or a reloaded copy are the same rows); refused above OVERLAP_MAX
    unless force=True."""
    shares = [inputs.overlap(member_input(preprocess, i, m, x), m.report.get("trained_rows"))
              for i, m in enumerate(members)]
    own = [i for i, share in enumerate(shares) if share > OVERLAP_MAX]
    if own and not force:
        raise DataError(
            f"Refusing to fit {who} on member(s) {own}'s own training data "
            f"({', '.join(f'{shares[i]:.1%}' for i in own)} of the {what} rows are rows "
            f"fine_tune trained them on; at most {OVERLAP_MAX:.0%} passes as held out): their "
            f"outputs there are "
            f"overconfident, and {who} would learn to trust them. Pass data the members never "
            f"saw (for 'stack' also train=(x, y) with folds=k, or oof=(outputs, y)); force=True "
            f"if you mean it.")
    return shares


def _overlap_note(shares: list) -> str:
    return f"overlap with members' training rows {', '.join(f'{s:.1%}' for s in shares)}"


def _val_arrays(f: FusedModel, val, what: str = "val"):
    if not (isinstance(val, (tuple, list)) and len(val) == 2):
        raise DataError(f"Expected {what} as an (x, y) pair of numpy arrays; received "
                        f"{type(val).__name__}.")
    if f.preprocess is None:
        x = validation.check_inputs(val[0], f.inputs, f.dtype, f"{what} x")
    elif f.preprocess == "images":
        x = _as_uint8(val[0])
        if x.ndim != 4 or x.shape[1:] != tuple(f.input_shape) or not len(x):
            raise ShapeError(f"Expected {what} x as RGB images of shape (N, "
                             f"{', '.join(map(str, f.input_shape))}) (the members' input); "
                             f"received {x.shape}.")
    else:
        x = np.asarray(val[0])
        if x.ndim == 0 or not len(x):
            raise ShapeError(f"Expected {what} x with N >= 1 samples; received shape {x.shape}.")
    y = validation.check_labels(val[1], inputs.length(x), f.num_outputs, "float64")
    return x, np.asarray(y, np.float64)


def _with_gate(members, gate_backbone, spec, head_weights, backend: str, report: dict):
    """A gated FusedModel around members (and gate backbone) already frozen on `backend`."""
    _, _, g = gate.build(members, backend=backend, gate_on=dict(spec.options)["gate_on"],
                         hidden=spec.head.hidden, dropout=spec.head.dropout, copy=False,
                         gate_backbone=gate_backbone)
    api.set_weights(g, head_weights, strict=False)
    return FusedModel(members, "gate", "logit", None, report, gate=g, gate_backbone=gate_backbone)


def convert(f: FusedModel, backend: str) -> FusedModel:
    if f.gate is not None:
        members = [api.convert(m, backend) for m in f.members]
        gb = None if f.gate_backbone is None else api.convert(f.gate_backbone, backend)
        return _with_gate(members, gb, f.gate.spec, gate.head_weights(f.gate), backend,
                          dict(f.report))
    return FusedModel([api.convert(m, backend) for m in f.members], f.method, f.space,
                      f.weights.copy(), dict(f.report),
                      None if f.bias is None else f.bias.copy(), preprocess=f.preprocess)


def save(f: FusedModel, path) -> None:
    """One safetensors file: every member's canonical weights under `member<i>/`, the fusion
    weights under `fusion/weights`, and each member's spec, backend and freeze state."""
    if isinstance(f.preprocess, list):
        raise DataError("Expected a fused model whose inputs can be stored (preprocess=None or "
                        "'images'); received one with per-member preprocess callables, which a "
                        "file cannot hold. Save the members (tl.save each) and fuse again after "
                        "loading them.")
    tensors = {}
    if f.weights is not None:
        tensors["fusion/weights"] = np.asarray(f.weights, np.float64)
    if f.bias is not None:
        tensors["fusion/bias"] = np.asarray(f.bias, np.float64)
    members = []
    for i, m in enumerate(f.members):
        tensors.update({f"member{i}/{k}": v for k, v in
                        {**api.get_weights(m), **api.report_tensors(m)}.items()})
        members.append({"backend": m.backend, "spec": m.spec.to_json(),
                        "frozen": sorted(m.frozen)})
    meta = {"format": FORMAT, "method": f.method, "space": f.space,
            "members": json.dumps(members), "report": json.dumps(f.report)}
    if f.preprocess is not None:
        meta["preprocess"] = f.preprocess
    if f.gate is not None:
        tensors.update({f"gate/{k}": v for k, v in gate.head_weights(f.gate).items()})
        meta["gate"] = f.gate.spec.to_json()
        if f.gate_backbone is not None:
            gb = f.gate_backbone
            tensors.update({f"gate_backbone/{k}": v for k, v in api.get_weights(gb).items()})
            meta["gate_backbone"] = json.dumps({"backend": gb.backend, "spec": gb.spec.to_json(),
                                                "frozen": sorted(gb.frozen)})
    wio.save_file(path, tensors, meta)


def load(path, tensors: dict, meta: dict, backend: str | None = None) -> FusedModel:
    """Each member on the backend it was saved from, unless `backend` says otherwise."""
    try:
        members = json.loads(meta["members"])
        method, space = meta["method"], meta["space"]
        weights = None if method == "gate" else np.asarray(tensors["fusion/weights"], np.float64)
        gate_spec = ModelSpec.from_json(meta["gate"]) if method == "gate" else None
        gb_info = json.loads(meta["gate_backbone"]) if "gate_backbone" in meta else None
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"The fused model stored in {path!r} is damaged: {exc}") from exc

    def rebuild(info, prefix, what):
        spec = ModelSpec.from_json(info["spec"])
        target = config.resolve(backend if backend is not None else info["backend"])
        if spec.native_backend is not None and spec.native_backend != target:
            raise NotPortableError(
                f"{what} of {path!r} is the {spec.native_backend}-native backbone "
                f"{spec.backbone!r}; it cannot be loaded on {target!r}. Load the fused model "
                f"without backend= (each member on its own backend).")
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return api._rebuild(spec, target, own, set(info["frozen"]))

    built = [rebuild(info, f"member{i}/", f"Member {i}") for i, info in enumerate(members)]
    report = json.loads(meta.get("report", "{}"))
    if gate_spec is not None:
        gb = None if gb_info is None else rebuild(gb_info, "gate_backbone/", "The gate's backbone")
        head = {k[5:]: v for k, v in tensors.items() if k.startswith("gate/")}
        return _with_gate(built, gb, gate_spec, head, built[0].backend, report)
    bias = tensors.get("fusion/bias")
    return FusedModel(built, method, space, weights, report,
                      None if bias is None else np.asarray(bias, np.float64),
                      preprocess=meta.get("preprocess"))


api.register_format(FORMAT, load)
