"""Adaptive fusion: a gate network weighs the members per input (tl.fuse(..., method="gate")).

The gated model is one native model per backend (backends/<name>/gate.py): the frozen members
side by side compute u = [gate input | member logits z_1..z_M]; the gated head computes
    a = gate(u[:, :D])          (Linear layers, ReLU between, as any tlbridge head)
    w = softmax(a) over members,  logit = sum_m w_m * z_m
`forward` below is that formula in numpy: both backends follow it op for op, and tests hold
them to it. The gate's last layer starts at zero, so an untrained gate is the mean ensemble.
It is a TransferModel whose only trainable parameters are `head.gate.*`: tl.fine_tune trains
it (schedules, checkpoints, early stopping, a feature cache of u) like any head.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from . import api, init, kinds
from .errors import ArgumentTypeError, DataError, NotPortableError, ShapeError
from .model import TransferModel
from .specs import HeadSpec, ModelSpec

NAME = "fused_gate"                 # the composite's backbone name (checkpoints record it)
GATE_ON = ("logits", "features")    # or a TransferModel: its backbone's features
PREFIX = "head.gate"


def layer_names(hidden: tuple) -> list[str]:
    return HeadSpec(1, tuple(hidden)).layer_names(PREFIX)


def init_weights(gate_dim: int, members: int, hidden: tuple, rng) -> dict[str, np.ndarray]:
    """torch.nn.Linear's default init for hidden layers; the last layer zero (uniform weights)."""
    names = layer_names(hidden)
    w = init.linear_head([gate_dim, *hidden, members], rng, names)
    w[names[-1] + ".weight"] = np.zeros_like(w[names[-1] + ".weight"])
    w[names[-1] + ".bias"] = np.zeros_like(w[names[-1] + ".bias"])
    return w


def forward(u: np.ndarray, weights: dict, gate_dim: int, members: int, outputs: int,
            hidden: tuple = ()):
    """(per-input member weights (N, M), fused logits (N, K)) from u, in inference mode."""
    u = np.asarray(u, np.float64)
    h = u[:, :gate_dim]
    z = u[:, gate_dim:].reshape(len(u), members, outputs)
    names = layer_names(hidden)
    for i, name in enumerate(names):
        h = h @ np.asarray(weights[name + ".weight"], np.float64).T \
            + np.asarray(weights[name + ".bias"], np.float64)
        if i < len(names) - 1:
            h = np.maximum(h, 0.0)
    a = h - h.max(axis=1, keepdims=True)
    w = np.exp(a)
    w /= w.sum(axis=1, keepdims=True)
    return w, np.einsum("nm,nmk->nk", w, z)


def gate_kind(gate_on) -> str:
    if isinstance(gate_on, TransferModel):
        return "backbone"
    if gate_on in GATE_ON:
        return gate_on
    raise DataError(f"Expected gate_on as one of {list(GATE_ON)} or a tlbridge model (its "
                    f"backbone's features feed the gate); received {gate_on!r}.")


def _frozen_copy(m: TransferModel, backend: str, what: str, head: bool = True) -> TransferModel:
    """An independent copy on `backend`, every parameter frozen (the composite shares its
    native layers, so the caller's model is never touched)."""
    if m.backend != backend and not m.portable:
        raise NotPortableError(
            f"Expected every model of a gated fusion on one backend (the gate runs natively); "
            f"{what} is the {m.backend}-native backbone {m.backbone_name!r}, which cannot run "
            f"on {backend!r}. Pass backend={m.backend!r}, or use portable backbones.")
    weights = api.get_weights(m)
    spec = m.spec
    if not head:
        spec = replace(spec, head=None)
        weights = {k: v for k, v in weights.items() if k.startswith("backbone.")}
    c = api._rebuild(spec, backend, weights, set(),
                     device=m.device if m.backend == backend else "cpu")
    c.frozen = set(api._param_names(c))
    api._be(backend).apply_freeze(c)
    return c


def build(members: list, *, backend: str, gate_on="logits", hidden=(), dropout: float = 0.0,
          seed: int = 0, copy: bool = True, gate_backbone: TransferModel | None = None):
    """(members on `backend`, the gated TransferModel). copy=False uses the given members
    (already frozen copies on `backend`, as load and convert make them)."""
    kind = gate_kind(gate_on) if gate_backbone is None else "backbone"
    if kind == "backbone" and gate_backbone is None:
        gate_backbone = gate_on
    first = members[0]
    for i, m in enumerate(members):
        if len(m.inputs) != 1 or m.inputs[0].kind != "image":
            raise DataError(f"Expected image members for a gated fusion (its native model takes "
                            f"one image input); member {i} takes {[s.name for s in m.inputs]}. "
                            f"Fuse such members with method='mean', 'weighted' or 'stack'.")
        if m.dtype != first.dtype:
            raise DataError(f"Expected every member in one dtype for a gated fusion; member 0 "
                            f"is {first.dtype}, member {i} is {m.dtype}.")
    if gate_backbone is not None:
        if tuple(gate_backbone.input_shape) != tuple(first.input_shape) \
                or gate_backbone.dtype != first.dtype:
            raise ShapeError(
                f"Expected the gate's backbone to take the members' input "
                f"{tuple(first.input_shape)} in {first.dtype}; received "
                f"{tuple(gate_backbone.input_shape)} in {gate_backbone.dtype}.")
    if copy:
        members = [_frozen_copy(m, backend, f"member {i}") for i, m in enumerate(members)]
        if gate_backbone is not None:
            gate_backbone = _frozen_copy(gate_backbone, backend, "the gate's backbone", head=False)
    hidden = api._check_hidden(hidden)
    if not 0.0 <= float(dropout) < 1.0:
        raise DataError(f"Expected 0 <= dropout < 1; received {dropout}.")
    be = api._be(backend)
    where = {m.device for m in members} | ({gate_backbone.device} if gate_backbone else set())
    if len(where) != 1:
        raise DataError(f"Expected every model of a gated fusion on one device; received "
                        f"{sorted(where)}. Move them with tl.to_device first.")
    device = where.pop()
    with be.device_scope(device):
        native, state = be.build_gate(members, kind, gate_backbone)
    spec = ModelSpec(NAME, (("gate_on", kind), ("members", len(members))), tuple(first.input_shape),
                     first.dtype, None, backend)
    base = TransferModel(backend, native, spec, False, set(), state)
    be.place_built(base, device)
    head = HeadSpec(first.num_outputs, hidden, float(dropout))
    with be.device_scope(device):
        native, state = be.attach_head(base, head)
    g = TransferModel(backend, native, replace(spec, head=head), False, set(), state)
    be.place_built(g, device)
    gi = state["gate"]
    be.set_weights(g, api._cast(init_weights(gi["gate_dim"], gi["members"], hidden,
                                             np.random.default_rng(seed)), first.dtype))
    g.frozen = {n for n in api._param_names(g) if n.startswith("backbone.")}
    be.apply_freeze(g)
    return members, gate_backbone, g


def head_weights(g: TransferModel) -> dict[str, np.ndarray]:
    return {k: v for k, v in api.get_weights(g).items() if k.startswith(PREFIX + ".")}


def weights_per_input(g: TransferModel, x, batch_size: int = 64) -> np.ndarray:
    """(N, M): how much the gate trusts each member on each input (rows sum to 1)."""
    gi = g.state["gate"]
    u = api.features(g, x, batch_size=batch_size)
    w, _ = forward(u, head_weights(g), gi["gate_dim"], gi["members"], gi["outputs"],
                   g.spec.head.hidden)
    return w


def check_members_stay_frozen(m: TransferModel, trainable_per_epoch) -> None:
    """The members of a gated fusion are frozen: only head.gate.* may train."""
    for epoch, names in trainable_per_epoch:
        opened = [n for n in names if not n.startswith(PREFIX + ".")]
        if opened:
            raise DataError(
                f"Expected only the gate ({PREFIX}.*) to train in a gated fusion; received "
                f"{len(opened)} trainable member parameter(s) in epoch {epoch} (e.g. "
                f"{opened[0]!r}). Members stay frozen: fine-tune them before fusing, and drop "
                f"unfreeze= / tl.unfreeze on the fused model.")


def check_type(gate_on) -> None:
    if not (isinstance(gate_on, (str, TransferModel))):
        raise ArgumentTypeError(f"Expected gate_on as a string or a tlbridge model; received "
                                f"{type(gate_on).__name__}.")


class GateKind(kinds.Kind):
    """The gated model inside a FusedModel: only its gate trains, and it is rebuilt (convert,
    save) only through its FusedModel, which holds the members."""

    name = "gate"

    def claims(self, m) -> bool:
        return m.backbone_name == NAME

    def check_rebuildable(self, m, what: str) -> None:
        raise ArgumentTypeError(
            f"Expected a model tl.{what} can rebuild; received the gated model inside a "
            f"FusedModel (fused.gate), which needs its members. Call tl.{what} on the "
            f"FusedModel itself.")

    def check_trainable(self, m, trainable_per_epoch) -> None:
        check_members_stay_frozen(m, trainable_per_epoch)

    def resume_key(self, m) -> dict:
        """The members (a fingerprint of their frozen weights and statistics: the same on
        either backend), what the gate sees and the gate's layer shapes."""
        w = api.get_weights(m)
        h = hashlib.sha1()
        for k in sorted(w):
            if k.startswith("backbone."):
                h.update(f"{k}{w[k].shape}{w[k].dtype}".encode())
                h.update(np.ascontiguousarray(w[k]).tobytes())
        return {"backbone": NAME, "gate_on": dict(m.spec.options)["gate_on"],
                "members": h.hexdigest()[:16],
                "gate": {k: list(v.shape) for k, v in sorted(w.items()) if k.startswith(PREFIX)}}


kinds.register(GateKind())
