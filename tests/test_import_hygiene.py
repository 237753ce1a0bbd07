import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import BACKENDS

from tlbridge import parity


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_tlbridge_imports_no_framework():
    code = ("import sys, tlbridge; "
            "print([m for m in ('torch','tensorflow','keras','jax') if m in sys.modules])")
    assert _run(code) == "[]"


def test_choosing_a_backend_imports_nothing_until_a_model_needs_it():
    code = ("import sys, tlbridge as tl; tl.set_backend('keras'); tl.get_backend(); "
            "tl.available_backends(); "
            "print([m for m in ('torch','tensorflow','keras') if m in sys.modules])")
    assert _run(code) == "[]"


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both frameworks")
def test_torch_and_tensorflow_import_into_one_process():
    code = ("import torch, tensorflow as tf, keras; "
            "print(float(torch.ones(2).sum()) + float(tf.reduce_sum(tf.ones(2))))")
    assert _run(code) == "4.0"


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both frameworks")
@pytest.mark.parametrize("order", [("keras", "torch"), ("torch", "keras")])
def test_both_backends_work_in_one_process_in_either_order(order):
    """Same seed, same weights: both backends, loaded one after the other in one process, give
    the same logits (fp64 to the parity bar, fp32 to its own)."""
    code = ("import json, numpy as np, tlbridge as tl\n"
            "x = np.random.default_rng(0).normal(size=(4, 32, 32, 3))\n"
            "out = {}\n"
            f"for b in {order!r}:\n"
            "    for dt in ('float64', 'float32'):\n"
            "        m = tl.load_backbone('resnet18', backend=b, input_shape=(32, 32, 3), seed=0, dtype=dt)\n"
            "        m = tl.replace_head(m, 3, seed=0)\n"
            "        out[b + '/' + dt] = tl.logits(m, x.astype(dt)).astype(float).tolist()\n"
            "print(json.dumps(out))")
    out = json.loads(_run(code))
    for dt in ("float64", "float32"):
        zt, zk = (np.array(out[f"{b}/{dt}"]) for b in ("torch", "keras"))
        assert zt.shape == (4, 3) and np.abs(zt).max() > 1e-3          # not a degenerate output
        assert parity.rel_diff(zt, zk) <= parity.TOL[dt], (dt, parity.rel_diff(zt, zk))


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both frameworks")
def test_tensorflow_imported_by_the_user_first_still_lets_torch_run():
    code = ("import warnings, tensorflow, numpy as np, tlbridge as tl\n"
            "m = tl.replace_head(tl.load_backbone('seed_vgg', backend='torch', input_shape=(32, 32, 3)), 1)\n"
            "print(tl.predict(m, np.zeros((1, 32, 32, 3), 'float32')).shape)")
    assert _run(code) == "(1, 1)"
