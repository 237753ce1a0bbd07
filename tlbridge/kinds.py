"""Model kinds: what the model API and the trainer ask of a model beyond "a backbone and one
head", so neither imports the kinds built on top of them (dependencies flow one way).

Two ways in:
- A TransferModel of a special kind (the gated model inside a fusion; adapters next) is
  answered for by a `Kind` registered here by the module that builds it.
- A model made of TransferModels (tl.fuse's FusedModel) subclasses `Composite` and answers
  the API's verbs (logits, predict, save, convert, fine_tune, evaluate) itself.
A loss with its own labels and metrics (multi-task heads) speaks through the loss value's
methods (tlbridge/losses.py `Loss`), registered with losses.register_head_loss.
"""
from __future__ import annotations


class Kind:
    """The default kind: a backbone and a head, every parameter free to train."""

    name = "model"

    def claims(self, m) -> bool:
        return True

    def check_rebuildable(self, m, what: str) -> None:
        """tl.convert / tl.save rebuild a model from its spec; refuse what cannot be."""

    def check_trainable(self, m, trainable_per_epoch) -> None:
        """(epoch, trainable names) per epoch of a fine_tune plan: refuse what must not train."""

    def resume_key(self, m) -> dict:
        """What a fine_tune checkpoint must have been trained from to be resumed into m."""
        return {"backbone": m.backbone_name}


_DEFAULT = Kind()
_KINDS: list[Kind] = []


def register(kind: Kind) -> None:
    _KINDS.append(kind)


def of(m) -> Kind:
    return next((k for k in _KINDS if k.claims(m)), _DEFAULT)


class Composite:
    """A model made of TransferModels that answers the API's verbs itself."""

    def _logits(self, x, batch_size: int):
        raise NotImplementedError

    def _probabilities(self, z):
        raise NotImplementedError

    def _save(self, path) -> None:
        raise NotImplementedError

    def _convert(self, backend: str):
        raise NotImplementedError

    def _trained_model(self):
        """The TransferModel tl.fine_tune trains for it."""
        raise NotImplementedError

    def _evaluation(self, data):
        """(the loss it is scored with, data as its members take it) for tl.evaluate."""
        raise NotImplementedError
