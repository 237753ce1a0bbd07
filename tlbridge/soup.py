"""Fuse in weight space: model soups (Wortsman et al. 2022) of one architecture, fine-tuned
from one starting point, on any backends — canonical weights make a torch ingredient and a
Keras ingredient averageable."""
from __future__ import annotations

import warnings

import numpy as np

from . import inputs, losses
from .errors import AdapterError, DataError, WeightsMismatchError
from .fusion import check_model_list

METHODS = ("uniform", "greedy")
BN_MODES = ("average", "recompute")


def _check_ingredients(models) -> list:
    models = check_model_list(models, "models", "ingredient", "to make a soup of")
    first = models[0]
    adapted = [i for i, m in enumerate(models) if m.spec.adapters]
    if adapted:
        raise AdapterError(
            f"Expected ingredients without LoRA adapters; ingredients {adapted} have unmerged "
            f"adapters, and averaging lora_A and lora_B apart is not averaging the updates "
            f"B A. Merge each first: tl.merge_lora(m) (docs/lora.md).")
    ref = (first.backbone_name, dict(first.spec.options), tuple(first.input_shape))
    for i, m in enumerate(models[1:], 1):
        mine = (m.backbone_name, dict(m.spec.options), tuple(m.input_shape))
        if mine != ref:
            raise WeightsMismatchError(
                f"Expected one architecture in a soup; ingredient {i} is {mine[0]} "
                f"{mine[1] or ''} at {mine[2]}, ingredient 0 is {ref[0]} {ref[1] or ''} at "
                f"{ref[2]}. Average only models fine-tuned from one starting point.")
        if m.spec.head != first.spec.head:
            raise WeightsMismatchError(
                f"Expected one head in a soup; ingredient {i} has {m.spec.head}, ingredient 0 "
                f"has {first.spec.head}.")
    return models


def _images(data, m):
    from . import validation
    x = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
    return validation.check_inputs(x, m.inputs, m.dtype, "data")


def recompute_batchnorm(m: TransferModel, data, batch_size: int = 64) -> None:
    """Running statistics re-estimated on `data` in train mode: pass k uses momentum 1/k, so
    the result is the equal-weight average of the batches' statistics (torch's momentum=None),
    whatever the statistics were before. Weights, freeze state and momenta are restored."""
    from . import api, registry
    be = registry.load(m.backend)
    x = _images(data, m)
    weights, frozen = api.get_weights(m), set(m.frozen)
    m.frozen = set()
    be.apply_freeze(m)
    saved = be.swap_batchnorm_momentum(m, 1.0)
    try:
        for k, i in enumerate(range(0, inputs.length(x), batch_size), 1):
            be.swap_batchnorm_momentum(m, 1.0 / k)
            xb = inputs.rows(x, slice(i, i + batch_size))   # labels do not matter: only the
            be.loss_and_grads(m, api.validation.check_inputs(xb, m.inputs, m.dtype),  # forward
                              np.zeros((inputs.length(xb), m.num_outputs), m.dtype), True,
                              losses.Loss())
    finally:
        be.swap_batchnorm_momentum(m, saved)
        stats = {k: v for k, v in api.get_weights(m).items()
                 if k.endswith(("running_mean", "running_var"))}
        api.set_weights(m, {**weights, **stats})
        m.frozen = frozen
        be.apply_freeze(m)


def soup(models, method: str = "uniform", *, val=None, bn: str = "average", data=None,
         batch_size: int = 64, warn: bool = True) -> TransferModel:
    """A new model whose canonical weights are the mean of the chosen ingredients'.

    uniform: all of them. greedy: ingredients sorted by validation loss, each added only if
    the soup's validation loss goes down (so never worse than the best ingredient on val).
    bn="average" averages BatchNorm running statistics with the weights; "recompute"
    re-estimates them on `data` after averaging (a soup of one ingredient keeps its own). The result is on ingredient 0's backend;
    `result.report` lists the ingredients chosen and every step's score.
    """
    from . import api
    from .training import evaluate
    models = _check_soup_call(models, method, val, bn, data, batch_size)
    base = models[0]
    ws = [api.get_weights(m) for m in models]
    out = api._rebuild(base.spec, base.backend, ws[0], set(base.frozen), device=base.device)
    make = _soup_maker(out, ws, bn, data, val, batch_size)
    scores = None if val is None else [evaluate(m, val, batch_size=batch_size)["loss"]
                                       for m in models]
    if method == "uniform":
        chosen = list(range(len(models)))
        loss = make(chosen)
        steps = [{"ingredients": chosen, "val_loss": loss, "kept": True}]
    else:
        chosen, loss, steps = _greedy(make, scores)
    out.report = {"method": method, "bn": bn, "ingredients": chosen, "val_loss": loss,
                  "val_loss_ingredients": scores, "steps": steps}
    if warn and scores is not None and loss > min(scores):
        warnings.warn(f"The {method} soup's validation loss {loss:.4g} is worse than its best "
                      f"ingredient's ({min(scores):.4g}, ingredient {int(np.argmin(scores))}); "
                      f"try method='greedy' or bn='recompute'.", stacklevel=2)
    return out


def _check_soup_call(models, method, val, bn, data, batch_size) -> list:
    """Everything soup can check before averaging anything: the ingredients, the options,
    and that `data` and `val` fit the models."""
    from .training import evaluate
    models = _check_ingredients(models)
    if method not in METHODS:
        raise DataError(f"Unknown soup method {method!r}. Expected one of {list(METHODS)}.")
    if bn not in BN_MODES:
        raise DataError(f"Unknown bn={bn!r}. Expected one of {list(BN_MODES)}.")
    if method == "greedy" and val is None:
        raise DataError("method='greedy' needs val=(x_val, y_val) to score each soup.")
    if bn == "recompute":
        if data is None:
            raise DataError("bn='recompute' needs data= (images, or an (x, y) pair) to "
                            "re-estimate the BatchNorm statistics on.")
        _images(data, models[0])
    if val is not None:
        evaluate(models[0], val, batch_size=batch_size)      # the data fits, before any work
    return models


def _soup_maker(out, ws, bn, data, val, batch_size):
    """make(chosen): `out` set to the mean of those ingredients' weights (averaged in float64),
    BatchNorm recomputed if asked; returns its validation loss (None without val)."""
    from . import api
    from .training import evaluate

    def make(chosen):
        mean = {k: np.mean([np.asarray(ws[i][k], np.float64) for i in chosen], axis=0)
                for k in ws[0]}
        api.set_weights(out, {k: v.astype(ws[0][k].dtype) for k, v in mean.items()})
        if bn == "recompute" and len(chosen) > 1:   # one ingredient keeps its own statistics
            recompute_batchnorm(out, data, batch_size)
        return None if val is None else evaluate(out, val, batch_size=batch_size)["loss"]
    return make


def _greedy(make, scores) -> tuple[list, float, list]:
    """Greedy soup: ingredients best first, each kept only if the validation loss goes down;
    returns (chosen, the final soup's loss, every step). The soup is remade from the kept
    ingredients at the end, as the last candidate tried may have been dropped."""
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    chosen = [order[0]]
    loss = make(chosen)
    steps = [{"ingredients": list(chosen), "val_loss": loss, "kept": True}]
    for i in order[1:]:
        cand = make(chosen + [i])
        kept = cand < loss
        steps.append({"ingredients": chosen + [i], "val_loss": cand, "kept": bool(kept)})
        if kept:
            chosen, loss = chosen + [i], cand
    loss = make(chosen)
    return chosen, loss, steps
