"""fine_tune checkpoints: one safetensors file per run directory with the weights, the
optimizer state, the L2-SP anchors, the EMA, early stopping's state and the history, plus
what the run was trained with, so a resume that would continue another run is refused."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

from .. import api, kinds
from .. import weights as wio
from ..errors import CheckpointError
from ..history import History
from .snapshot import Snapshot
from .state import Run

CHECKPOINT_FORMAT = "tlbridge.checkpoint/1"
_FRESH = "or start afresh with resume=False or another checkpoint directory"


def identity(run: Run) -> dict:
    """What a resume must match, as the checkpoint's metadata holds it (computed once a run:
    a gated fusion's fingerprints its members' weights)."""
    opt = {k: v for k, v in run.opt.describe().items() if k != "ema"}
    return {"optimizer": json.dumps(opt), "seed": str(run.seed),
            "early_stopping": json.dumps(None if run.stop is None else run.stop.config()),
            "ema": json.dumps(None if run.ema is None else run.ema.decay),
            "loss": json.dumps(_loss_id(run.loss)),
            "kind": json.dumps(kinds.of(run.m).resume_key(run.m))}


def _loss_id(loss) -> dict:
    return json.loads(json.dumps(asdict(loss)))


def save(run: Run, epoch: int) -> None:
    m = run.m
    tensors = {f"model/{k}": v for k, v in api.get_weights(m).items()}
    tensors.update({f"optim/{k}": v for k, v in run.trainer.state_dict().items()})
    if run.anchors:
        tensors.update({f"anchor/{k}": v for k, v in run.anchors.items()})
    meta = {"format": CHECKPOINT_FORMAT, "backend": m.backend, "spec": m.spec.to_json(),
            "frozen": json.dumps(sorted(m.frozen)), "epoch": str(epoch),
            "history": run.history.to_json(), **run.identity}
    if run.ema_w is not None:
        tensors.update({f"ema/{k}": v for k, v in run.ema_w.items()})
    if run.stop is not None:
        best = run.best
        state = {"best_value": best["value"], "best_epoch": best["epoch"], "stopped": run.stopped}
        if best["weights"] is not None:
            tensors.update({f"best/{k}": v for k, v in best["weights"].weights().items()})
            state["best_frozen"] = sorted(best["weights"].frozen)
        meta["early_stopping_state"] = json.dumps(state)
    wio.save_file(run.checkpoint.path, tensors, meta)


def _check_same(path: str, meta: dict, asked: dict) -> None:
    """Refuse a checkpoint trained with other settings than this call's."""
    what = {"optimizer": "optimizer", "seed": "seed", "early_stopping": "early_stopping",
            "ema": "ema", "loss": "loss", "kind": "model"}
    for key, name in what.items():
        if key not in meta:         # older checkpoints record less
            continue
        stored, want = json.loads(meta[key]), json.loads(asked[key])
        if key == "seed":
            stored, want = int(stored), int(want)
            if stored != want:
                raise CheckpointError(
                    f"Expected seed={stored} (the seed the checkpoint {path!r} was trained with); "
                    f"received seed={want}. The remaining epochs would shuffle differently from "
                    f"the run being resumed: pass seed={stored}, {_FRESH}.")
        if stored == want:
            continue
        if isinstance(stored, dict) and isinstance(want, dict):
            diff = ", ".join(f"{k} {stored.get(k)!r} -> {want.get(k)!r}" for k in want
                             if stored.get(k) != want.get(k))
        else:
            diff = f"{stored!r} -> {want!r}"
        if key == "kind":
            raise CheckpointError(
                f"Expected the model the checkpoint {path!r} was trained from; received another "
                f"({diff}). A gated fusion resumes only over the same members (their weights' "
                f"fingerprint), gate input and gate shapes. Use another checkpoint directory, "
                f"or fuse the members the checkpoint was trained with.")
        raise CheckpointError(
            f"Expected the {name} the checkpoint {path!r} was trained with ({stored}); received "
            f"{want} ({diff}). A resumed run continues that run: resume with the same settings, "
            f"{_FRESH}.")


def read(run: Run) -> dict:
    """Read and check a checkpoint before anything is changed: the same model, optimizer,
    seed, loss, EMA and early stopping as this call (else the resumed run could not be the
    run it continues). The backend may differ: checkpoints are portable."""
    path = run.checkpoint.path
    tensors, meta = wio.load_file(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"Expected a fine_tune checkpoint ({CHECKPOINT_FORMAT}) in {path!r}; "
                              f"received format {meta.get('format')!r}.")
    spec = json.loads(meta["spec"])
    if spec["backbone"] != run.m.backbone_name:
        raise CheckpointError(f"The checkpoint {path!r} is of backbone {spec['backbone']!r}; this "
                              f"model is {run.m.backbone_name!r}. Use another checkpoint directory.")
    _check_same(path, meta, run.identity)
    out = {"tensors": tensors, "meta": meta, "epoch": int(meta["epoch"]),
           "ema": {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")} or None,
           "frozen": set(json.loads(meta["frozen"])),
           "best": {"value": math.nan, "weights": None, "epoch": -1}, "stopped": False}
    if run.stop is not None and "early_stopping_state" in meta:
        state = json.loads(meta["early_stopping_state"])
        weights = None
        if "best_frozen" in state:
            weights = Snapshot.of_weights(
                run.m, run.be, {k[5:]: v for k, v in tensors.items() if k.startswith("best/")},
                state["best_frozen"])
        out["best"] = {"value": float(state["best_value"]), "weights": weights,
                       "epoch": int(state["best_epoch"])}
        out["stopped"] = bool(state["stopped"])
    return out


def apply(run: Run, saved: dict) -> None:
    """Put the run where the checkpoint left it: weights, freeze state, optimizer state,
    anchors, history and early stopping's state."""
    m, tensors = run.m, saved["tensors"]
    api.set_weights(m, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    m.frozen = set(saved["frozen"])
    run.be.apply_freeze(m)
    run.trainer.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("optim/")})
    saved_anchors = {k[7:]: v for k, v in tensors.items() if k.startswith("anchor/")}
    if run.opt.regularizer is not None and saved_anchors:
        run.anchors = saved_anchors
        run.trainer.set_anchors(saved_anchors)
    run.history = History.from_json(saved["meta"]["history"])
    if saved["best"]["epoch"] >= 0:
        run.history.best_epoch = saved["best"]["epoch"]
    if run.stop is not None:
        run.best, run.stopped = saved["best"], saved["stopped"]
