"""With only one framework installed, tlbridge works on it and says clearly what the other
needs. The missing framework is hidden from a subprocess: torch by a meta-path finder that
answers "not installed" (scipy's array-api helpers break on a None entry in sys.modules),
TensorFlow by a None entry in sys.modules (torch's dynamo asks find_spec about it)."""
import subprocess
import sys
import textwrap

import pytest
from helpers import BACKENDS

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
    """, HIDE_BY_FINDER)
    assert lines[0] == "['keras'] keras"
    assert lines[1] == "keras (1, 1)" and lines[2] == "keras"
    assert lines[3].startswith("refused: The 'torch' backend needs torch, torchvision")
    assert lines[4].startswith("refused: The 'torch' backend needs")
    assert lines[5].startswith("refused: weights='imagenet' for 'resnet18' on Keras")
    assert lines[6].startswith("refused: Reading the PyTorch checkpoint")
    assert lines[7] == "False"


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
    """, HIDE_IN_SYS_MODULES)
    assert lines[0] == "['torch'] torch"
    assert lines[1] == "torch (1, 1)"
    assert 'pip install "tlbridge[keras]"' in lines[2]
