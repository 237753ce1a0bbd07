"""Resolve freeze specs ("backbone", "all", glob, list) to canonical parameter names."""
from __future__ import annotations

import fnmatch

from .errors import FreezeSpecError, FreezeSpecTypeError

_GLOB = set("*?[")


def _match_one(spec: str, names: list[str]) -> list[str]:
    if spec == "all":
        return list(names)
    if spec == "backbone":
        return [n for n in names if n.startswith("backbone.")]
    if spec == "head":      # a head, or a multi-task model's heads and task_log_vars
        return [n for n in names if n.startswith(("head.", "heads.")) or n == "task_log_vars"]
    if any(ch in spec for ch in _GLOB):
        return [n for n in names if fnmatch.fnmatchcase(n, spec)]
    # an exact name or a module prefix like "backbone.layer4"
    return [n for n in names if n == spec or n.startswith(spec + ".")]


def resolve(spec, names: list[str]) -> set[str]:
    """Names matched by `spec`; each part of it must match at least one parameter."""
    if not isinstance(spec, (str, list, tuple, set, frozenset)):
        raise FreezeSpecTypeError(
            f"Expected a freeze spec: 'backbone', 'head', 'all', a glob such as "
            f"'backbone.layer4.*', or a list of those; received {type(spec).__name__} {spec!r}. "
            f"To freeze nothing, skip the call (or tl.unfreeze(m, 'all') to undo a freeze).")
    parts = [spec] if isinstance(spec, str) else list(spec)
    if not parts:
        raise FreezeSpecError("Expected a freeze spec ('backbone', 'all', a glob or a list); "
                              "received an empty list.")
    matched: set[str] = set()
    for part in parts:
        if not isinstance(part, str):
            raise FreezeSpecTypeError(f"Expected freeze spec entries as strings; received "
                                      f"{type(part).__name__} {part!r} in {spec!r}. Name "
                                      f"parameters by their canonical names (tl.get_weights(m)).")
        hits = _match_one(part, names)
        if not hits:
            examples = ", ".join(names[:3] + (["…"] if len(names) > 3 else []) + names[-2:])
            raise FreezeSpecError(
                f"Freeze spec {part!r} matches no parameter. Expected 'backbone', 'head', 'all', "
                f"a glob such as 'backbone.layer4.*', or exact names; this model's "
                f"{len(names)} parameters are named like: {examples}.")
        matched.update(hits)
    return matched
