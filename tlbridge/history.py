"""History: per-epoch metrics of a fine_tune run, JSON-friendly, with a matplotlib plot."""
from __future__ import annotations

import json
import math


class History:
    def __init__(self, epochs: list[dict] | None = None):
        self.epochs: list[dict] = list(epochs or [])
        self.ema_weights: dict | None = None      # fine_tune(ema=...): the moving average

    def append(self, record: dict) -> None:
        self.epochs.append(dict(record))

    def __getitem__(self, key: str) -> list:
        return [e.get(key, math.nan) for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.epochs:
            seen.update(dict.fromkeys(e))
        return list(seen)

    def to_json(self) -> str:
        return json.dumps(self.epochs)

    @classmethod
    def from_json(cls, text: str) -> "History":
        return cls(json.loads(text))

    def plot(self, path, *, keys=("loss", "val_loss"), title: str | None = None) -> str:
        """Write a PNG of the chosen metrics per epoch; returns the path."""
        try:
            import matplotlib
        except ImportError:
            from .errors import BackendNotInstalledError
            raise BackendNotInstalledError(
                "History.plot needs matplotlib; received an environment without it. Install it "
                'with `pip install matplotlib` (the "tlbridge[torch]" and "tlbridge[keras]" '
                "extras include it).") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        x = [e.get("epoch", i) + 1 for i, e in enumerate(self.epochs)]
        for key in keys:
            if key in self.keys():
                ax.plot(x, self[key], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("BCE")
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)

    def __repr__(self) -> str:
        last = self.epochs[-1] if self.epochs else {}
        return f"History({len(self)} epochs, last={last})"
