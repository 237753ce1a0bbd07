"""The house, read from the source: dependencies flow one way (no import cycle among the
project's modules, function-level imports included), no function over 60 lines, fine_tune
takes at most 17 parameters, and the model API and the trainer import no model kind."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = {"tlbridge.fusion", "tlbridge.gate", "tlbridge.multitask", "tlbridge.soup",
         "tlbridge.fewshot"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for top, package in (("tlbridge", "tlbridge"), ("backends", "tlbridge.backends")):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT / top).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rsplit(".", 1)[0]
                base = parent + ("." + base if base else "")
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t in mods and t != name and not name.startswith(t + ".")
            and not (t == package and mods[t].name == "__init__.py")}


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_the_model_api_and_the_trainer_import_no_model_kind():
    graph = _graph()
    for name, targets in graph.items():
        if name == "tlbridge.api" or name.startswith("tlbridge.training"):
            assert not targets & KINDS, f"{name} imports {sorted(targets & KINDS)}"


def test_no_function_over_60_lines_and_fine_tune_takes_at_most_17_parameters():
    long, fine_tune = [], None
    for top in ("tlbridge", "backends", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if node.end_lineno - node.lineno + 1 > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
                    if node.name == "fine_tune" and top == "tlbridge":
                        a = node.args
                        n = len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                        fine_tune = max(fine_tune or 0, n)   # the CLI's fine_tune(args) too
    assert not long, long
    assert fine_tune is not None and fine_tune <= 17, fine_tune
