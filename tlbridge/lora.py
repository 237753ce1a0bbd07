"""LoRA adapters (docs/lora.md): low-rank updates beside frozen Linear / Conv2d layers, the same
on both backends, merged exactly, saved in peft's file layout.

Built on the model API: the adapters live in the spec (ModelSpec.adapters: (module, rank, alpha,
dropout) per adapted layer), so every rebuild (save/load, convert, to_device) recreates them
through the backend's build_backbone; the API and the trainer never import this module. The
numbers both backends must share are drawn and merged here in numpy:
- A: torch nn.Linear's default init (kaiming-uniform, a = sqrt(5): U(+-1/sqrt(fan_in))), drawn
  from numpy with `seed`; B = 0, so the adapted model starts exactly as the base (peft's default);
- output = base(x) + B(A(dropout(x))) * alpha / rank; a conv adapter is peft's factorisation, a
  k x k conv cin -> r (the base's stride and padding) then a 1x1 conv r -> cout;
- merged weight = W + alpha / rank * B @ A (conv: B's 1x1 kernel composed with A's k x k kernel).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import replace

import numpy as np

from . import api, kinds
from .errors import AdapterError, ArgumentTypeError
from .model import TransferModel

LEAVES = ("lora_A.weight", "lora_B.weight")


class LoraKind(kinds.Kind):
    """A model with adapters: a resumed fine_tune checkpoint must have the same adapters."""

    name = "lora"

    def claims(self, m) -> bool:
        return bool(getattr(m.spec, "adapters", ()))

    def resume_key(self, m) -> dict:
        return {"backbone": m.backbone_name, "adapters": [list(a) for a in m.spec.adapters]}


kinds.register(LoraKind())


def is_adapter(name: str) -> bool:
    return name.endswith(LEAVES)


def _is_head(name: str) -> bool:
    return name.startswith(("head.", "heads.")) or name == "task_log_vars"


def add_lora(m: TransferModel, rank: int = 8, alpha: float = 16, targets=None,
             dropout: float = 0.0, seed: int | None = None) -> TransferModel:
    """Wrap the backbone's Linear / Conv2d layers named by `targets` with LoRA adapters, in
    place (m is returned). Afterwards only the adapters and the head train: every other
    parameter is frozen (tl.freeze's meaning: BatchNorm runs on its running statistics).

    targets: None (every Linear and groups=1 Conv2d of the backbone), or a name / a list of
    names over canonical module names: an exact name, a glob ("*.attention.self.*"), or a
    last part as peft writes target_modules ("query", "value"). The same seed draws the same
    adapters on both backends.
    """
    m = _model(m, "add_lora")
    rank, alpha, dropout = _check_settings(rank, alpha, dropout, seed)
    layers = api._be(m.backend).lora_layers(m)
    chosen = _resolve(targets, layers, m)
    _check_rank(rank, chosen, layers)
    added = tuple((name, rank, alpha, dropout) for name in chosen)
    return adapt(m, added, draw(added, layers, seed))


def adapt(m: TransferModel, added: tuple, tensors: dict) -> TransferModel:
    """m rebuilt in place with the adapters `added` (checked) starting from `tensors` (their
    lora_A / lora_B, and any other weight to replace); every parameter but the adapters and
    the head frozen."""
    names = api._param_names(m)
    frozen = {n for n in names if not is_adapter(n) and not _is_head(n)}
    spec = replace(m.spec, adapters=tuple(m.spec.adapters) + tuple(added))
    weights = {**api.get_weights(m), **api.report_tensors(m), **tensors}
    _install(m, api._rebuild(spec, m.backend, weights, frozen, device=m.device))
    return m


def merge_lora(m: TransferModel) -> TransferModel:
    """Fold every adapter into its layer's weight (W + alpha / rank * B A), in place: the model
    computes the same function with no adapter left (a plain model; its freeze state kept)."""
    m = _model(m, "merge_lora")
    if not m.spec.adapters:
        raise AdapterError(
            f"Expected a model with LoRA adapters to merge; received {m.backbone_name!r} with "
            f"none. Add them first with tl.add_lora(m, ...), or skip the merge.")
    tensors = {**merged(api.get_weights(m), m.spec.adapters, m.dtype), **api.report_tensors(m)}
    frozen = {n for n in m.frozen if not is_adapter(n)}
    _install(m, api._rebuild(replace(m.spec, adapters=()), m.backend, tensors, frozen,
                             device=m.device))
    return m


def merged(weights: dict, adapters, dtype: str) -> dict:
    """The weights with each adapter folded into its base weight (float64 arithmetic)."""
    out = dict(weights)
    for name, rank, alpha, _ in adapters:
        a = np.asarray(out.pop(f"{name}.lora_A.weight"), np.float64)
        b = np.asarray(out.pop(f"{name}.lora_B.weight"), np.float64)
        if a.ndim == 2:
            delta = b @ a
        else:                                   # (out, r, 1, 1) after (r, cin, kh, kw)
            delta = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
        base = np.asarray(out[f"{name}.weight"], np.float64)
        out[f"{name}.weight"] = (base + (alpha / rank) * delta).astype(dtype)
    return out


def draw(adapters, layers: dict, seed) -> dict:
    """A ~ U(+-1/sqrt(fan_in)) (nn.Linear's default init), B = 0, drawn in name order."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, rank, _, _ in sorted(adapters):
        kind, fan_in, fan_out, kh, kw, _ = layers[name]
        shape_a = (rank, fan_in) if kind == "linear" else (rank, fan_in, kh, kw)
        bound = 1.0 / np.sqrt(fan_in * kh * kw)
        out[f"{name}.lora_A.weight"] = rng.uniform(-bound, bound, size=shape_a)
        out[f"{name}.lora_B.weight"] = np.zeros((fan_out, rank) if kind == "linear"
                                                else (fan_out, rank, 1, 1))
    return out


def _model(m, what: str) -> TransferModel:
    if not isinstance(m, TransferModel):
        raise ArgumentTypeError(
            f"Expected a tlbridge TransferModel for {what} (from tl.load_backbone); received "
            f"{type(m).__name__}. A fused model's members take adapters one by one, before "
            f"tl.fuse.")
    kinds.of(m).check_rebuildable(m, what)
    return m


def _install(m: TransferModel, new: TransferModel) -> None:
    """m becomes `new` (rebuilt on the same backend and device); m.report is kept."""
    m.native, m.state, m.spec, m.frozen = new.native, new.state, new.spec, set(new.frozen)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_settings(rank, alpha, dropout, seed):
    if not _is_int(rank) or rank < 1:
        raise AdapterError(f"Expected rank as an int >= 1 (peft's r; 8 is usual); received "
                           f"rank={rank!r}. The model was left unchanged.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or \
            not np.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"Expected alpha as a number > 0 (the update is scaled by "
                           f"alpha / rank); received alpha={alpha!r}. The model was left unchanged.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or \
            not 0.0 <= float(dropout) < 1.0:
        raise AdapterError(f"Expected 0 <= dropout < 1; received dropout={dropout!r}. The "
                           f"model was left unchanged.")
    if seed is not None and not _is_int(seed):
        raise ArgumentTypeError(f"Expected seed as an int or None; received {seed!r}.")
    return int(rank), float(alpha), float(dropout)


def _matches(entry: str, names) -> list[str]:
    """An exact name, a glob over full names, or peft's rule: the name ends with '.' + entry."""
    if any(ch in entry for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, entry)]
    return [n for n in names if n == entry or n.endswith("." + entry)]


def _closest(entry: str, names) -> list[str]:
    """The module names (or their last parts) nearest `entry`, for the error message."""
    parts = {".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))}
    near = difflib.get_close_matches(entry, sorted(parts), n=4, cutoff=0.5)
    return near or difflib.get_close_matches(entry, list(names), n=4, cutoff=0.0)


def _resolve(targets, layers: dict, m) -> list[str]:
    """The adapted layers `targets` names, in the model's order; every entry must match."""
    if targets is None:
        chosen = [n for n, info in layers.items() if info[5] == 1]
    else:
        entries = [targets] if isinstance(targets, str) else targets
        if not isinstance(entries, (list, tuple, set, frozenset)) or not entries or \
                not all(isinstance(e, str) for e in entries):
            raise ArgumentTypeError(
                f"Expected targets as None, a module name or glob, or a list of them; received "
                f"{type(targets).__name__} {targets!r}. Example: targets=['query', 'value'].")
        hit: set[str] = set()
        for entry in entries:
            found = _matches(entry, layers)
            if not found:
                raise AdapterError(
                    f"Expected targets naming Linear or Conv2d layers of the backbone; "
                    f"{entry!r} matches none. Closest module names: {_closest(entry, layers)}. "
                    f"Write a full canonical module name, a glob, or a last part such as "
                    f"'query'. The model was left unchanged.")
            hit.update(found)
        chosen = [n for n in layers if n in hit]
    if not chosen:
        raise AdapterError(
            f"Expected at least one Linear or groups=1 Conv2d layer in the backbone of "
            f"{m.backbone_name!r} to adapt; received none on {m.backend}. On Keras, LoRA needs "
            f"a portable backbone (tl.list_backbones(portable=True)); a keras.applications "
            f"model has no tlbridge mirror to rebuild with adapters.")
    _check_layers(chosen, layers, m)
    return chosen


def _check_layers(chosen: list[str], layers: dict, m) -> None:
    grouped = [n for n in chosen if layers[n][5] != 1]
    if grouped:
        raise AdapterError(
            f"Expected Linear or groups=1 Conv2d layers; received grouped or depthwise convs "
            f"{grouped[:4]}{' ...' if len(grouped) > 4 else ''}. LoRA is refused there, as "
            f"peft does (peft#2202): a rank-r adapter on a depthwise conv has more parameters "
            f"than the layer itself. Narrow targets to exclude them (targets=None skips them). "
            f"The model was left unchanged.")
    twice = sorted(set(chosen) & {a[0] for a in m.spec.adapters})
    if twice:
        raise AdapterError(
            f"Expected layers without an adapter; received {twice[:4]}, which already have "
            f"one. Merge first (tl.merge_lora(m)) to adapt them again, or leave them out of "
            f"targets. The model was left unchanged.")


def _check_rank(rank: int, chosen: list[str], layers: dict) -> None:
    """rank <= min(fan_in, fan_out) of each layer (a larger rank adds nothing a full update
    would not, at more cost)."""
    bound = {n: min(layers[n][1] * layers[n][3] * layers[n][4], layers[n][2]) for n in chosen}
    tight = min(bound, key=bound.get)
    if rank > bound[tight]:
        raise AdapterError(
            f"Expected rank <= min(in, out) of every adapted layer; received rank={rank}, but "
            f"{tight!r} allows at most {bound[tight]} (kind {layers[tight][0]}, in "
            f"{layers[tight][1] * layers[tight][3] * layers[tight][4]}, out {layers[tight][2]}). "
            f"Lower the rank or leave that layer out of targets. The model was left unchanged.")
