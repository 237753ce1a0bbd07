"""The plan of a run, settled before any work: which parameters each epoch trains (gradual
unfreezing), the learning rate at every step, data-parallel or not, and the checks that only
the whole plan can answer (every epoch trains something; a frozen backbone for the cache)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import api, freezing, kinds, optim, parallel, registry
from ..errors import DataError, DistributedError, FreezeSpecError


@dataclass
class Plan:
    epochs: int
    steps: int                  # optimizer steps per epoch
    groups: list                # [(base lr, [names])]
    factor: object              # schedule: factor(global step, total steps)
    frozen_at: list | None      # the frozen set of every epoch (None: the model's own)
    names: list

    def lrs(self, epoch: int, step: int) -> list[float]:
        total = self.epochs * self.steps
        return [base * self.factor(epoch * self.steps + step, total) for base, _ in self.groups]

    def frozen_per_epoch(self, m, saved_frozen, start: int):
        for e in range(start, self.epochs):
            if self.frozen_at is not None:
                yield e, self.frozen_at[e]
            else:
                yield e, m.frozen if saved_frozen is None else saved_frozen


def make(m, opt, unfreeze, epochs: int, steps: int) -> Plan:
    names = api._param_names(m)
    return Plan(epochs, steps, opt.param_groups(names), optim.make_schedule(opt.schedule, steps),
                unfreeze_plan(names, unfreeze, epochs), names)


def _plan_key(k) -> int:
    """An epoch key of an unfreeze plan: an int, or an int-like string (plans read from JSON)."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        epoch = int(k)
    elif isinstance(k, str) and k.strip().lstrip("+").isdigit():
        epoch = int(k)
    else:
        raise DataError(f"Expected unfreeze plan keys as epoch numbers (ints >= 0, or int-like "
                        f"strings such as '2'); received {k!r}.")
    if epoch < 0:
        raise DataError(f"Expected unfreeze plan keys as epoch numbers >= 0; received {k!r}.")
    return epoch


def unfreeze_plan(names: list[str], plan, epochs: int):
    """Frozen set per epoch: with a plan, epoch e trains the union of specs with key <= e."""
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise DataError(f"Expected unfreeze as a dict {{epoch: spec}}, e.g. {{0: 'head', 2: "
                        f"'backbone.layer4', 4: 'all'}}; received {type(plan).__name__}.")
    normalised = {}
    for k, spec in plan.items():
        e = _plan_key(k)
        if e in normalised:
            raise DataError(f"Expected each epoch once in the unfreeze plan; received epoch {e} "
                            f"twice (keys {[key for key in plan if _plan_key(key) == e]}).")
        normalised[e] = spec
    keys = sorted(normalised)
    if not keys or keys[0] != 0:
        raise DataError(f"Expected an unfreeze plan starting at epoch 0, e.g. {{0: 'head.*', 2: "
                        f"'backbone.layer4.*', 4: 'all'}}; received keys {keys}.")
    opened = {e: freezing.resolve(spec, names) for e, spec in normalised.items()}  # all checked
    frozen_at, trainable = [], set()
    for e in range(epochs):
        trainable |= opened.get(e, set())
        frozen_at.append(set(names) - trainable)
    return frozen_at


def check(plan: Plan, m, loss, saved_frozen, start: int, feature_cache, ds) -> None:
    """Every epoch trains something (torch would fail in backward, Keras train nothing), the
    model's kind accepts what trains (a gate's members stay frozen), and feature_cache=True
    gets what it needs."""
    used = [n for n in plan.names if n not in loss.unused_params()]
    for e, frozen in plan.frozen_per_epoch(m, saved_frozen, start):
        if all(n in frozen for n in used):
            how = ("the unfreeze plan opens nothing by then" if plan.frozen_at is not None
                   else "the model is frozen entirely")
            raise FreezeSpecError(
                f"Expected at least one trainable parameter in every epoch; received all "
                f"{len(used)} parameters frozen in epoch {e} ({how}). Unfreeze some first, e.g. "
                f"tl.unfreeze(m, 'head'), or pass unfreeze={{0: 'head', ...}}.")
    kinds.of(m).check_trainable(m, ((e, [n for n in plan.names if n not in fr])
                                    for e, fr in plan.frozen_per_epoch(m, saved_frozen, start)))
    if feature_cache is True:
        _check_feature_cache(plan, m, ds, saved_frozen, start)


def _check_feature_cache(plan: Plan, m, ds, saved_frozen, start: int) -> None:
    """feature_cache=True trains the head on features computed once, un-augmented, from a
    frozen backbone: anything else would silently train on other data."""
    if ds.augment is not None:
        raise DataError(f"Expected no augmentation with feature_cache=True (features are computed "
                        f"once, from un-augmented images); received train data with "
                        f"augment={ds.augment!r}. Pass feature_cache='auto' (caches only without "
                        f"augmentation) or False, or drop the augmentation.")
    for e, frozen in plan.frozen_per_epoch(m, saved_frozen, start):
        open_ = [n for n in plan.names if n.startswith("backbone.") and n not in frozen]
        if open_:
            raise DataError(
                f"Expected the whole backbone frozen in every epoch with feature_cache=True; "
                f"received {len(open_)} trainable backbone parameter(s) in epoch {e} (e.g. "
                f"{open_[0]!r}). Freeze it with tl.freeze(m, 'backbone'), or pass "
                f"feature_cache='auto' (caches only the epochs with a frozen backbone).")


def check_feature_cache_option(feature_cache) -> None:
    if not (feature_cache == "auto" or feature_cache is True or feature_cache is False):
        raise DataError(f"Expected feature_cache 'auto', True or False; received {feature_cache!r}.")


def parallel_plan(m, par):
    """Data-parallel or not, from the launch (torchrun's WORLD_SIZE) and tl.Parallel."""
    if par.replicas is not None:
        if m.backend != "keras":
            raise DataError(f"Expected replicas= with a Keras model (tf.distribute); received a "
                            f"{m.backend} model. Launch torch runs with torchrun "
                            f"--nproc_per_node=N instead.")
        return registry.load("keras").replica_plan(par.replicas, par.bn_sync)
    env = parallel.torch_env() if par.distributed is not False else None
    if env is None:
        if par.distributed:
            raise DistributedError(
                "Expected a torchrun launch for distributed=True (WORLD_SIZE, RANK, MASTER_ADDR "
                "set); received none. Launch with: torchrun --nproc_per_node=N your_script.py, "
                "or pass parallel=tl.Parallel(replicas=N) with a Keras model.")
        return None
    if m.backend != "torch":
        if par.distributed:
            raise DistributedError(f"Expected a torch model under torchrun; received a "
                                   f"{m.backend} model. Keras trains data-parallel in one "
                                   f"process: fine_tune(..., parallel=tl.Parallel(replicas=N)).")
        return None
    return parallel.Plan(env[0], env[1], par.bn_sync)
