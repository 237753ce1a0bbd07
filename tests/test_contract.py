"""The backend contract (backends/contract.py): every installed backend implements each of its
functions with the contract's signature (names, kinds, defaults), the two backends agree with
each other, `__all__` is the contract's names, make_trainer's Trainer has every Trainer member,
and no backend module reaches up into tlbridge.api."""
from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import types

import pytest
from helpers import both_backends, small_model

from tlbridge import losses, optim, registry
from tlbridge.backends import contract

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUNCTIONS = [n for n in contract.REQUIRED if inspect.isfunction(getattr(contract.Backend, n, None))]
OPTIONAL = sorted({n for names in contract.OPTIONAL.values() for n in names})


def _shape(fn) -> list[tuple]:
    return contract.shape(inspect.signature(fn))


def test_importing_the_contract_imports_no_framework():
    code = ("import sys, tlbridge.backends.contract; "
            "print([m for m in ('torch','tensorflow','keras','jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _backend_calls(source: str) -> set[str]:
    """Names used on a backend module: `be.X`, `<obj>.be.X`, `_be(...).X`, `api._be(...).X`,
    `registry.load(...).X`."""
    called = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if (isinstance(base, ast.Name) and base.id == "be") or (
                isinstance(base, ast.Attribute) and base.attr == "be"):
            called.add(node.attr)
        elif isinstance(base, ast.Call) and ast.unparse(base.func) in (
                "_be", "api._be", "registry.load"):
            called.add(node.attr)
    return called


def test_every_function_tlbridge_calls_is_in_the_contract():
    """Each backend call in tlbridge/ names a contract member, so the contract is the whole
    list of what a backend must provide."""
    called = set().union(*(_backend_calls(path.read_text())
                           for path in (ROOT / "tlbridge").rglob("*.py")))
    assert {"make_trainer", "apply_freeze", "to_device"} <= called, "the scan is broken"
    assert called - set(contract.REQUIRED) - set(OPTIONAL) == set()
    assert _backend_calls("run.be.fit(m)\nregistry.load('x').go()\n_be(b).f") == {"fit", "go", "f"}


def test_every_trainer_member_tlbridge_uses_is_in_the_contract():
    used = set()
    for path in (ROOT / "tlbridge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                    (isinstance(node.value, ast.Name) and node.value.id == "trainer")
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "trainer")):
                used.add(node.attr)
    assert {"step", "state_dict"} <= used, "the scan is broken"
    assert used - set(contract.TRAINER) == set()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_backend_implements_each_function_with_the_contracts_signature(backend, name):
    be = registry.load(backend)
    assert callable(getattr(be, name, None)), f"{be.__name__} lacks {name}"
    assert _shape(getattr(be, name)) == contract.shape(
        contract.expected_signature(contract.Backend, name)), name


def test_backend_is_a_backend_and_its_name_is_its_registry_name(backend):
    be = registry.load(backend)
    assert isinstance(be, contract.Backend)
    assert be.NAME == backend


def test_all_is_the_required_names_plus_the_optional_parts_claimed_in_full(backend):
    be = registry.load(backend)
    parts = contract.claimed(be)
    assert "DataParallel" in parts            # both backends fine-tune data-parallel
    want = set(contract.REQUIRED).union(*(contract.OPTIONAL[p] for p in parts))
    assert set(be.__all__) == want and len(be.__all__) == len(want)
    for part in parts:
        assert isinstance(be, contract.PARTS[part])
        for name in contract.OPTIONAL[part]:
            assert _shape(getattr(be, name)) == contract.shape(
                contract.expected_signature(contract.PARTS[part], name)), name
    assert contract.mismatches(be) == []


@both_backends
@pytest.mark.parametrize("name", FUNCTIONS + OPTIONAL)
def test_both_backends_have_identical_signatures(name):
    torch_be, keras_be = registry.load("torch"), registry.load("keras")
    if not (hasattr(torch_be, name) and hasattr(keras_be, name)):
        pytest.skip(f"{name} is optional and one backend does not implement it")
    assert _shape(getattr(torch_be, name)) == _shape(getattr(keras_be, name))


def test_make_trainer_returns_a_trainer_with_every_member(backend):
    be = registry.load(backend)
    m = small_model(backend, input_shape=(16, 16, 3), widths=(4, 8))
    trainer = be.make_trainer(m, optim.OptimizerConfig(), [(0.1, be.param_names(m))], None, None,
                              losses.Loss())
    try:
        assert isinstance(trainer, contract.Trainer)
        assert trainer.last_parts is None
        for name in contract.TRAINER:
            if inspect.isfunction(getattr(contract.Trainer, name, None)):
                assert _shape(getattr(type(trainer), name))[1:] == contract.shape(
                    contract.expected_signature(contract.Trainer, name)), name
        assert contract.mismatches(be, type(trainer)) == []
    finally:
        trainer.close()


def test_to_device_moves_in_place_or_answers_false_and_leaves_the_model(backend):
    be = registry.load(backend)
    m = small_model(backend, input_shape=(16, 16, 3), widths=(4, 8))
    assert be.to_device(m, "cpu") is True and m.device == "cpu"     # already there
    m.state["device"] = "cuda:0"            # as if it lived on a GPU
    native = m.native
    moved = be.to_device(m, "cpu")
    assert moved in (True, False)
    if moved:
        assert m.device == "cpu"
    else:                                   # the caller (tlbridge/api.py) rebuilds it
        assert m.device == "cuda:0" and m.native is native


# -- the checks themselves, on a fake backend built from the contract ---------------------------

def _conforming(parts=("DataParallel",)) -> types.ModuleType:
    fake = types.ModuleType("fake_backend")
    names = list(contract.REQUIRED) + [n for p in parts for n in contract.OPTIONAL[p]]
    for name in names:
        protocol = next(p for p in (contract.Backend, *contract.PARTS.values())
                        if name in contract.members(p))
        if inspect.isfunction(getattr(protocol, name, None)):
            def fn(*args, **kwargs):
                return None
            fn.__signature__ = contract.expected_signature(protocol, name)
            setattr(fake, name, fn)
        else:
            setattr(fake, name, "fake")
    fake.__all__ = list(dict.fromkeys(names))
    return fake


def _renamed(fn, old: str, new: str):
    sig = inspect.signature(fn)
    params = [p.replace(name=new) if p.name == old else p for p in sig.parameters.values()]
    out = lambda *a, **k: None  # noqa: E731
    out.__signature__ = sig.replace(parameters=params)
    return out


def test_a_missing_function_or_a_changed_parameter_is_caught():
    fake = _conforming()
    assert contract.mismatches(fake) == []
    del fake.logits
    fake.make_trainer = _renamed(fake.make_trainer, "precision", "dtype")
    fake.set_weights = _renamed(fake.set_weights, "w", "weights")
    problems = "\n".join(contract.mismatches(fake))
    assert "fake_backend.logits is missing" in problems
    assert "fake_backend.make_trainer" in problems and "dtype" in problems
    assert "fake_backend.set_weights" in problems
    for name in ("logits", "make_trainer", "set_weights"):    # the per-backend test's check
        fn = getattr(fake, name, None)
        assert fn is None or _shape(fn) != contract.shape(
            contract.expected_signature(contract.Backend, name))


def test_a_changed_default_or_a_half_claimed_part_is_caught():
    fake = _conforming()
    sig = inspect.signature(fake.make_trainer)
    fake.make_trainer = lambda *a, **k: None
    fake.make_trainer.__signature__ = sig.replace(parameters=[
        p.replace(default="bf16") if p.name == "precision" else p for p in sig.parameters.values()])
    fake.__all__.append("cpu_replicas")             # claims Replicas, lacks replica_plan
    problems = "\n".join(contract.mismatches(fake))
    assert "make_trainer" in problems and "bf16" in problems
    assert "fake_backend.replica_plan is missing" in problems
    assert "replica_plan" in problems.split("__all__")[1]


def test_a_trainer_without_a_method_is_caught():
    class Partial:
        last_parts = None

        def step(self, x, y, lrs):
            return 0.0, 0.0

        def head_step(self, features, y, lrs):      # renamed parameter
            return 0.0, 0.0

    problems = "\n".join(contract.mismatches(_conforming(), Partial))
    assert ".Partial.head_step" in problems and ".Partial.close is missing" in problems
    assert "Partial.step" not in problems


# -- layering: a backend never imports the layer that calls it -----------------------------------

def _imports(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, function-level ones included:
    `import X` gives X, `from X import y` gives X.y (relative X resolved within `package`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _package_of(path: pathlib.Path) -> str:
    """The package a file's relative imports start from (an __init__.py: its own)."""
    rel = path.relative_to(ROOT / "backends").with_suffix("").parts
    return ".".join(["tlbridge", "backends", *rel[:-1]])


def _reaches_api(name: str) -> bool:
    """tlbridge.api itself, or tlbridge's public namespace, which is api's (`import tlbridge`,
    `from tlbridge import fine_tune`); `from tlbridge import devices` (a module) is not."""
    if name in ("tlbridge", "tlbridge.api") or name.startswith("tlbridge.api."):
        return True
    head, _, rest = name.partition(".")
    if head != "tlbridge" or "." in rest or rest == "backends":
        return False
    return not ((ROOT / "tlbridge" / f"{rest}.py").exists() or (ROOT / "tlbridge" / rest).is_dir())


def test_no_backend_module_imports_tlbridge_api():
    """tlbridge.api calls the backends; a backend importing it (even inside a function) would
    make the layers a cycle. Where a backend cannot do something alone (Keras moving a model),
    the contract has it answer so and tlbridge/api.py does the rest."""
    found = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sorted((ROOT / "backends").rglob("*.py"))
             for line, name in _imports(path, _package_of(path)) if _reaches_api(name)]
    assert found == []


def test_the_import_scan_sees_function_level_relative_and_public_api_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tlbridge import api\n"
                      "def g():\n    from ... import api as a\n"
                      "import tlbridge.api\nfrom tlbridge import devices, fine_tune\n"
                      "from . import training\n")
    names = [n for _, n in _imports(sample, "tlbridge.backends.keras")]
    assert names.count("tlbridge.api") == 3
    flagged = sorted(n for n in names if _reaches_api(n))
    assert flagged == ["tlbridge.api"] * 3 + ["tlbridge.fine_tune"]
    assert "tlbridge.devices" in names and "tlbridge.backends.keras.training" in names


def test_the_optional_parts_are_named_and_replicas_extends_data_parallel():
    assert contract.OPTIONAL["DataParallel"] == ("init_parallel",)
    assert set(contract.OPTIONAL["Replicas"]) == {"init_parallel", "replica_plan", "cpu_replicas"}
    assert not set(OPTIONAL) & set(contract.REQUIRED)
    assert all(contract.Backend.__dict__[n].__doc__ for n in FUNCTIONS)
