"""Weights fine_tune keeps to go back to: the last good epoch's (a divergence restores them) and
the best epoch's (early stopping). Taken every epoch, so they stay in the backend's own layout
(no transposes to the canonical one: on Keras that conversion was 5% of a MiniLM epoch) and are
made canonical only when a checkpoint writes them."""
from __future__ import annotations

from .. import api


class Snapshot:
    """A model's weights and frozen set at one moment: in the backend's layout (`take`), or
    canonical (`of_weights`, read back from a checkpoint)."""

    def __init__(self, m, be, frozen, native=None, weights=None):
        self.m, self.be, self.frozen = m, be, set(frozen)
        self._native, self._weights = native, weights

    @classmethod
    def take(cls, m, be) -> Snapshot:
        return cls(m, be, m.frozen, native=be.snapshot(m))

    @classmethod
    def of_weights(cls, m, be, weights: dict, frozen) -> Snapshot:
        return cls(m, be, frozen, weights=weights)

    def weights(self) -> dict:
        """Canonical name -> array, as api.get_weights gives them."""
        if self._weights is None:
            self._weights = self.be.snapshot_weights(self.m, self._native)
        return self._weights

    def restore(self) -> None:
        """The model's weights and frozen set back to this moment."""
        if self._native is not None:
            self.be.restore(self.m, self._native)
        else:
            api.set_weights(self.m, self._weights)
        self.m.frozen = set(self.frozen)
        self.be.apply_freeze(self.m)
