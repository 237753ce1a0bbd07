"""Progress of a run: a tqdm bar per epoch, or one plain line per epoch without tqdm."""
from __future__ import annotations

import sys


class Progress:
    """A tqdm bar per epoch; without tqdm (an install that left it out), one plain line per
    epoch on stderr, so progress=True never needs an optional package."""

    def __init__(self, enabled, total, desc):
        self.bar = None
        self.text = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.text, self.steps = desc, 0
            else:
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)

    def update(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.text is not None:
            self.steps += 1

    def close(self, **info):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()})
            self.bar.close()
            self.bar = None
        elif self.text is not None:
            parts = [f"{self.steps} steps"] + [f"{k}={v:.4f}" for k, v in info.items()]
            print(f"{self.text}: {', '.join(parts)}", file=sys.stderr, flush=True)
            self.text = None
