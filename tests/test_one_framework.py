"""With only one framework installed, tlbridge works on it and says clearly what the other
needs. The missing framework is hidden from a subprocess: torch by a meta-path finder that
answers "not installed" (scipy's array-api helpers break on a None entry in sys.modules),
TensorFlow by a None entry in sys.modules (torch's dynamo asks find_spec about it)."""
import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import BACKENDS

ROOT = pathlib.Path(__file__).resolve().parents[1]

HIDE_BY_FINDER = textwrap.dedent("""
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {hidden!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}")
            return None
    sys.meta_path.insert(0, Hide())
""")
HIDE_IN_SYS_MODULES = textwrap.dedent("""
    import sys
    for name in {hidden!r}:
        sys.modules[name] = None
""")


def _run(hidden, body, how):
    code = how.format(hidden=hidden) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


@pytest.mark.skipif("keras" not in BACKENDS, reason="needs keras")
def test_keras_only(tmp_path):
    lines = _run(["torch", "torchvision"], f"""
        import numpy as np, tlbridge as tl
        from tlbridge import errors
        print(tl.available_backends(), tl.get_backend())
        m = tl.replace_head(tl.load_backbone("resnet18", input_shape=(32, 32, 3), seed=0), 1)
        print(m.backend, tl.predict(m, np.zeros((1, 32, 32, 3), "float32")).shape)
        tl.save(m, {str(tmp_path / 'k.safetensors')!r}); print(tl.load({str(tmp_path / 'k.safetensors')!r}).backend)
        for call in (lambda: tl.load_backbone("resnet18", backend="torch"),
                     lambda: tl.convert(m, "torch"),
                     lambda: tl.load_backbone("resnet18", weights="imagenet", input_shape=(32, 32, 3)),
                     lambda: tl.load_backbone("resnet18", weights={str(tmp_path / 'w.pth')!r})):
            open({str(tmp_path / 'w.pth')!r}, "wb").write(b"x")
            try:
                call()
            except errors.BackendNotInstalledError as e:
                print("refused:", str(e)[:60])
        import sys; print("torch" in sys.modules)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(8, 32, 32, 3)).astype("float32"), (rng.random((8, 1)) > 0.5) * 1.0
        h = tl.fine_tune(m, (x, y), val=(x, y), epochs=1, batch_size=4)   # default progress=True
        print(len(h), sorted(tl.evaluate(m, (x, y))))
    """, HIDE_BY_FINDER)
    assert lines[0] == "['keras'] keras"
    assert lines[1] == "keras (1, 1)" and lines[2] == "keras"
    assert lines[3].startswith("refused: The 'torch' backend needs torch, torchvision")
    assert lines[4].startswith("refused: The 'torch' backend needs")
    assert lines[5].startswith("refused: weights='imagenet' for 'resnet18' on Keras")
    assert lines[6].startswith("refused: Reading the PyTorch checkpoint")
    assert lines[7] == "False"
    assert lines[8] == "1 ['accuracy', 'auc', 'loss']"


@pytest.mark.skipif("torch" not in BACKENDS, reason="needs torch")
def test_torch_only():
    lines = _run(["tensorflow", "keras"], """
        import numpy as np, tlbridge as tl
        from tlbridge import errors
        print(tl.available_backends(), tl.get_backend())
        m = tl.replace_head(tl.load_backbone("seed_vgg", input_shape=(32, 32, 3), seed=0), 1)
        print(m.backend, tl.predict(m, np.zeros((1, 32, 32, 3), "float32")).shape)
        try:
            tl.convert(m, "keras")
        except errors.BackendNotInstalledError as e:
            print("refused:", e)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(8, 32, 32, 3)).astype("float32"), (rng.random((8, 1)) > 0.5) * 1.0
        h = tl.fine_tune(m, (x, y), val=(x, y), epochs=1, batch_size=4)   # default progress=True
        print(len(h), sorted(tl.evaluate(m, (x, y))))
    """, HIDE_IN_SYS_MODULES)
    assert lines[0] == "['torch'] torch"
    assert lines[1] == "torch (1, 1)"
    assert 'pip install "tlbridge[keras]"' in lines[2]
    assert lines[3] == "1 ['accuracy', 'auc', 'loss']"


# --------------------------------------------------------------------- what each extra installs

# the jax extra runs the Keras backend on Keras' JAX engine (KERAS_BACKEND=jax)
FRAMEWORKS = {"torch": {"torch", "torchvision"}, "keras": {"keras", "tensorflow"},
              "jax": {"keras", "jax"}}
BACKEND_DIR = {"torch": "torch", "keras": "keras", "jax": "keras"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra_closure(extra: str) -> set[str]:
    """Distributions `pip install "tlbridge[extra]"` asks for by name: the core dependencies
    plus the extra's, following self-references such as tlbridge[torch,keras]."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names, todo, seen = set(), [None, extra], set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        for req in project["dependencies"] if key is None else extras[key]:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?", req)
            if _canonical(m.group(1)) == project["name"]:
                todo += [e.strip() for e in m.group(3).split(",")]
            else:
                names.add(_canonical(m.group(1)))
    return names


def _third_party_imports(files) -> dict[str, list[str]]:
    """Top-level modules imported anywhere in `files` (also inside functions), not stdlib."""
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("tlbridge", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("extra", ["torch", "keras", "jax"])
def test_each_framework_extra_installs_every_package_tlbridge_imports(extra):
    """`pip install "tlbridge[torch]"` (or [keras]) must run the whole API on that framework:
    every package tlbridge and that backend import is named by the extra (not left to `all`,
    as tqdm was: fine_tune's default progress bar failed with ImportError). The other
    framework is exempt: asking for it is refused with an install hint (tests above). The demo
    script has its own extra, and tl.export's converters theirs (tlbridge[export])."""
    files = [p for p in (ROOT / "tlbridge").glob("*.py") if p.name != "demo.py"]
    files += list((ROOT / "backends" / BACKEND_DIR[extra]).glob("*.py"))
    dists = importlib.metadata.packages_distributions()
    closure = _extra_closure(extra) | _extra_closure("export")   # tl.export's own, named in its errors
    other = set().union(*(mods for fw, mods in FRAMEWORKS.items() if fw != extra)) - FRAMEWORKS[extra]
    missing = {}
    for module, where in sorted(_third_party_imports(files).items()):
        if module in other:
            continue
        provided_by = {_canonical(d) for d in dists.get(module, [module])}
        if not provided_by & closure:
            missing[module] = (sorted(provided_by), sorted(set(where)))
    assert not missing, (f'tlbridge[{extra}] does not install what these imports need '
                         f"(module: (distribution, imported in)): {missing}")
    demo = _third_party_imports([ROOT / "tlbridge" / "demo.py"])
    demo_closure = _extra_closure("demo") | _extra_closure(extra)
    assert all({_canonical(d) for d in dists.get(mod, [mod])} & demo_closure
               for mod in demo if mod not in other), sorted(demo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_tune_with_default_progress_needs_no_tqdm(backend):
    """Without tqdm (an install that left it out), progress=True prints one line per epoch."""
    lines = _run(["tqdm"], f"""
        import contextlib, io, numpy as np, tlbridge as tl
        m = tl.replace_head(tl.load_backbone("seed_vgg", backend={backend!r}, input_shape=(16, 16, 3),
                                             seed=0, widths=(4, 8)), 1)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(8, 16, 16, 3)).astype("float32"), (rng.random((8, 1)) > 0.5) * 1.0
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            h = tl.fine_tune(m, (x, y), val=(x, y), epochs=2, batch_size=4)
        import sys
        print(len(h), sys.modules.get("tqdm") is not None)
        print(err.getvalue().strip().replace(chr(10), " | "))
    """, HIDE_IN_SYS_MODULES)       # torch's dynamo asks find_spec about tqdm
    assert lines[0] == "2 False"
    assert lines[1].startswith("epoch 1/2: 2 steps, loss=") and "| epoch 2/2: 2 steps" in lines[1]
    assert "val_loss=" in lines[1]


def test_optional_packages_missing_say_what_to_install(tmp_path):
    """Pillow (image folders) and matplotlib (History.plot) missing: an ImportError that is a
    tlbridge error and names the package and the extras that bring it."""
    lines = _run(["PIL", "matplotlib"], f"""
        import tlbridge as tl
        from tlbridge import errors
        for call in (lambda: tl.data.image_folder({str(tmp_path)!r}, 8),
                     lambda: tl.History([{{"epoch": 0, "loss": 1.0}}]).plot({str(tmp_path / 'h.png')!r})):
            try:
                call()
            except errors.BackendNotInstalledError as e:
                print(isinstance(e, ImportError), e)
    """, HIDE_BY_FINDER)
    assert len(lines) == 2 and all(line.startswith("True ") for line in lines)
    assert "needs Pillow" in lines[0] and "pip install pillow" in lines[0]
    assert "needs matplotlib" in lines[1] and "pip install matplotlib" in lines[1]
    assert all('"tlbridge[torch]"' in line for line in lines)
