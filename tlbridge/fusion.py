"""Fuse in output space: an ensemble of tlbridge models, on any mix of backends.

tl.fuse(members, "mean" | "weighted") returns a FusedModel whose logits are a convex
combination of its members' (space="logit") or whose probabilities are (space="prob"). The
members run natively, each on its own backend; the combination is numpy, so a torch member
and a Keras member fuse into one model. Weights for "weighted" are fitted on validation data
by minimising the fused BCE over the simplex (convex in the weights, in both spaces).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .errors import (ArgumentTypeError, CheckpointError, DataError, NoHeadError, NotPortableError,
                     ShapeError)
from .model import TransferModel

METHODS = ("mean", "weighted")
PLANNED = ("stack", "gate")
SPACES = ("logit", "prob")
FORMAT = "tlbridge.fused/1"
_EPS = 1e-12


@dataclass
class FusedModel:
    """Members plus fusion parameters. `weights` sum to 1; `report` holds what fitting saw
    (members' and the fused model's validation loss when `val` was given)."""

    members: list
    method: str
    space: str
    weights: np.ndarray
    report: dict = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return self.members[0].num_outputs

    @property
    def input_shape(self) -> tuple:
        return self.members[0].input_shape

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
        return (f"FusedModel({self.method}, space={self.space!r}, members=[{names}], "
                f"weights={np.round(self.weights, 4).tolist()})")


# ------------------------------------------------------------------------------- combining
def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logit(p):
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def member_logits(f: FusedModel, x, batch_size: int = 64) -> np.ndarray:
    """(M, N, K) float64: every member's logits on x; NaN or inf is refused, naming the member."""
    from . import api
    outs = []
    for i, m in enumerate(f.members):
        z = np.asarray(api.logits(m, x, batch_size=batch_size), np.float64)
        _check_finite(z, i, m)
        outs.append(z)
    return np.stack(outs)


def _check_finite(z, i, m):
    if not np.all(np.isfinite(z)):
        bad = int(np.sum(~np.isfinite(z)))
        raise DataError(f"Expected finite outputs from every member; member {i} "
                        f"({m.backbone_name} on {m.backend}) gave {bad} NaN/inf value(s). "
                        f"Check that member's weights (tl.get_weights) and the inputs.")


def combine(zs: np.ndarray, weights: np.ndarray, space: str) -> np.ndarray:
    """The fused logits from members' logits (M, N, K)."""
    w = np.asarray(weights, np.float64).reshape(-1, 1, 1)
    if space == "logit":
        return np.sum(w * zs, axis=0)
    return _logit(np.sum(w * _sigmoid(zs), axis=0))


def fused_logits(f: FusedModel, x, batch_size: int = 64) -> np.ndarray:
    return combine(member_logits(f, x, batch_size), f.weights, f.space).astype(f.dtype)


# ------------------------------------------------------------------------------- fitting
def _loss_and_grad(zs, y, w, space):
    """Mean BCE of the fused output and its gradient with respect to the weights."""
    n = y.size
    if space == "logit":
        z = np.tensordot(w, zs, axes=1)
        loss = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
        dz = (_sigmoid(z) - y) / n
        return loss, np.tensordot(zs, dz, axes=([1, 2], [0, 1]))
    ps = _sigmoid(zs)
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
def _check_members(members) -> list:
    if isinstance(members, TransferModel) or not isinstance(members, (list, tuple)):
        raise ArgumentTypeError(f"Expected members as a list of tlbridge models; received "
                                f"{type(members).__name__}.")
    members = list(members)
    if not members:
        raise DataError("Expected at least one member to fuse; received an empty list.")
    for i, m in enumerate(members):
        if not isinstance(m, TransferModel):
            raise ArgumentTypeError(f"Expected every member to be a tlbridge TransferModel; "
                                    f"member {i} is {type(m).__name__}.")
        if m.spec.head is None:
            raise NoHeadError(f"Expected members with a head; member {i} ({m.backbone_name}) "
                              f"has none. Call tl.replace_head on it first.")
    first = members[0]
    for i, m in enumerate(members[1:], 1):
        if m.num_outputs != first.num_outputs:
            raise ShapeError(f"Expected every member to have {first.num_outputs} output(s) "
                             f"(member 0's); member {i} ({m.backbone_name} on {m.backend}) has "
                             f"{m.num_outputs}.")
        if tuple(m.input_shape) != tuple(first.input_shape):
            raise ShapeError(f"Expected every member to take images of shape "
                             f"{tuple(first.input_shape)} (member 0's); member {i} "
                             f"({m.backbone_name} on {m.backend}) takes {tuple(m.input_shape)}.")
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
         batch_size: int = 64) -> FusedModel:
    """An ensemble of `members` (tlbridge models on any backends, same outputs and input shape).

    method="mean": equal weights. method="weighted": `weights` as given (on the simplex), or
    fitted on `val=(x, y)` to minimise the fused BCE. space="logit" averages logits,
    space="prob" probabilities. With `val`, `report` holds every member's validation loss and
    the fused one.
    """
    members = _check_members(members)
    if method in PLANNED:
        raise DataError(f"method={method!r} is not available yet; expected one of "
                        f"{list(METHODS)}.")
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
    f = FusedModel(members, method, space, np.full(n, 1.0 / n) if w is None else w)
    if val is not None:
        x, y = _val_arrays(f, val)
        zs = member_logits(f, x, batch_size)
        if w is None:
            f.weights = fit_weights(zs, y, space)
        f.report = {"val_loss_members": [float(_loss_and_grad(zs, y, np.eye(n)[i], space)[0])
                                         for i in range(n)],
                    "val_loss": float(_loss_and_grad(zs, y, f.weights, space)[0])}
    return f


def _val_arrays(f: FusedModel, val):
    from . import validation
    if not (isinstance(val, (tuple, list)) and len(val) == 2):
        raise DataError(f"Expected val as an (x, y) pair of numpy arrays; received "
                        f"{type(val).__name__}.")
    x = validation.check_images(val[0], f.input_shape, f.dtype, "val x")
    y = validation.check_labels(val[1], len(x), f.num_outputs, "float64")
    return x, np.asarray(y, np.float64)


def convert(f: FusedModel, backend: str) -> FusedModel:
    from . import api
    return FusedModel([api.convert(m, backend) for m in f.members], f.method, f.space,
                      f.weights.copy(), dict(f.report))


def save(f: FusedModel, path) -> None:
    """One safetensors file: every member's canonical weights under `member<i>/`, the fusion
    weights under `fusion/weights`, and each member's spec, backend and freeze state."""
    from . import api
    from . import weights as wio
    tensors = {"fusion/weights": np.asarray(f.weights, np.float64)}
    members = []
    for i, m in enumerate(f.members):
        tensors.update({f"member{i}/{k}": v for k, v in api.get_weights(m).items()})
        members.append({"backend": m.backend, "spec": m.spec.to_json(),
                        "frozen": sorted(m.frozen)})
    meta = {"format": FORMAT, "method": f.method, "space": f.space,
            "members": json.dumps(members), "report": json.dumps(f.report)}
    wio.save_file(path, tensors, meta)


def load(path, tensors: dict, meta: dict, backend: str | None = None) -> FusedModel:
    """Each member on the backend it was saved from, unless `backend` says otherwise."""
    from . import api, config
    from .specs import ModelSpec
    try:
        members = json.loads(meta["members"])
        weights = np.asarray(tensors["fusion/weights"], np.float64)
        method, space = meta["method"], meta["space"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"The fused model stored in {path!r} is damaged: {exc}") from exc
    built = []
    for i, info in enumerate(members):
        spec = ModelSpec.from_json(info["spec"])
        target = config.resolve(backend if backend is not None else info["backend"])
        if spec.native_backend is not None and spec.native_backend != target:
            raise NotPortableError(
                f"Member {i} of {path!r} is the {spec.native_backend}-native backbone "
                f"{spec.backbone!r}; it cannot be loaded on {target!r}. Load the fused model "
                f"without backend= (each member on its own backend).")
        prefix = f"member{i}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        built.append(api._rebuild(spec, target, own, set(info["frozen"])))
    return FusedModel(built, method, space, weights, json.loads(meta.get("report", "{}")))
