"""Canonical weight dicts: layout checks and safetensors I/O (never pickle)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import BackendNotInstalledError, CheckpointError, WeightsMismatchError


def _list(items, limit=8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def check_layout(expected: dict[str, tuple], received: dict, what: str = "weights") -> None:
    """Raise WeightsMismatchError unless `received` has exactly the expected keys and shapes."""
    if not isinstance(received, dict):
        raise WeightsMismatchError(f"Expected {what} as a dict of name -> array; "
                                   f"received {type(received).__name__}.")
    missing = [k for k in expected if k not in received]
    unexpected = [k for k in received if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k])}, received {tuple(np.shape(received[k]))}"
        for k in expected
        if k in received and tuple(np.shape(received[k])) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys [{_list(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_list(unexpected)}]")
        if mismatched:
            parts.append(f"mis-shaped keys [{_list(mismatched, 4)}]")
        raise WeightsMismatchError(
            f"The {what} do not fit this model (another architecture or head?): "
            + "; ".join(parts)
            + f". Expected {len(expected)} tensors in tlbridge's canonical layout "
              "(tl.get_weights(model) shows it); the model was left unchanged.",
            missing, unexpected, mismatched)
    dtypes = {k: np.asarray(received[k]).dtype for k in expected}
    non_numeric = [f"{k}: {dtypes[k]}" for k in expected if dtypes[k].kind not in "biuf"]
    if non_numeric:
        raise WeightsMismatchError(
            f"Expected {what} of a real numeric dtype (float32 or float64; ints and bools are "
            f"cast to the model's dtype); received [{_list(non_numeric, 4)}]. Pass numeric "
            f"arrays, e.g. as tl.get_weights(model) returns them; the model was left unchanged.")
    bad = [k for k in expected if not np.all(np.isfinite(np.asarray(received[k], dtype=np.float64)))]
    if bad:
        raise WeightsMismatchError(
            f"Expected finite {what}; received NaN/inf in [{_list(bad)}]. The model was left unchanged.")


def _safetensors_numpy():
    try:
        import safetensors.numpy as stnp
    except ImportError as exc:
        raise BackendNotInstalledError(
            "Reading and writing weights needs the safetensors package, which is not installed. "
            'Install it with: pip install safetensors (it comes with "tlbridge[torch]" and '
            '"tlbridge[keras]").') from exc
    return stnp


def save_file(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    stnp = _safetensors_numpy()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        # np.ascontiguousarray would turn 0-d arrays (optimizer step counts) into shape (1,)
        stnp.save_file({k: np.array(v, order="C", copy=True) for k, v in tensors.items()}, tmp,
                       metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata; a bad file raises CheckpointError."""
    _safetensors_numpy()
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Expected a safetensors file; received {path!r}, which does not exist.")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"Expected a complete safetensors file; could not read {path!r} ({size} bytes): {exc}. "
            "The file is truncated or not safetensors (tl.save writes safetensors; a torch .pth "
            "checkpoint goes through load_backbone(weights=...)).") from exc
    return tensors, metadata
