"""The few stable formulas that losses and metrics share, in numpy (foundations import nothing
of the project): one place, so a loss and the metric that reports it can never disagree."""
from __future__ import annotations

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z) without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def elementwise(z, y, name: str) -> np.ndarray:
    """BCE (stable, from logits) or squared error per entry: what "bce" and "mse" average."""
    if name == "bce":
        return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    return (z - y) ** 2
