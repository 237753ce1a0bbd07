import subprocess
import sys

import pytest

from helpers import BACKENDS


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
