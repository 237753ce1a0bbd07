"""fine_tune(..., compile=True) (issue 21, item 3): the same training within float32 noise, and
the steps really compiled — torch.compile's graphs captured on torch, the traced step marked for
XLA on Keras-on-TensorFlow (with a warning on the CPU, where XLA's convolutions are far slower
than TensorFlow's own); on Keras-on-JAX (already jitted) compile=True changes nothing at all.
Refused before any work: a missing C++ compiler (torch on the CPU) and data-parallel runs.
One compiled run per backend: torch.compile of even this tiny model takes ~15 s on 2 cores."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import learnable

import tlbridge as tl
from tlbridge import errors, registry

SHAPE = (16, 16, 3)
ON_JAX = registry.keras_engine() == "jax"


def _model(backend):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype="float32", seed=0,
                         widths=(4, 8), batch_norm=True)
    return tl.replace_head(m, 1, seed=1)


def _losses(m, compile: bool) -> np.ndarray:
    """Per-step losses of 2 epochs of 4 batches (no ragged batch: one shape, one compile)."""
    x, y = learnable(32)
    out = []
    tl.fine_tune(m, (x, y), epochs=2, batch_size=8, progress=False, feature_cache=False,
                 optimizer=tl.optim.SGD(0.05, momentum=0.9), compile=compile,
                 callbacks=[lambda event, info: out.append(info["loss"]) if event == "step" else None])
    return np.array(out)


def _compiled_graphs(backend, m) -> int:
    """How many compiled step graphs exist: torch.compile's captured graphs (process-wide
    counter), or this Keras model's traced steps marked for XLA (0 on JAX, jitted anyway)."""
    if backend == "torch":
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    if ON_JAX:
        return 0
    from tlbridge.backends.keras.training import xla_steps
    return xla_steps(m)


def test_compiled_steps_train_as_the_eager_ones_and_really_run_compiled(backend):
    if backend == "torch" and ON_JAX:
        pytest.skip("the TensorFlow pass runs the torch case")
    eager_m, compiled_m = _model(backend), _model(backend)
    before = _compiled_graphs(backend, eager_m)
    eager = _losses(eager_m, compile=False)
    assert _compiled_graphs(backend, eager_m) == before, "compile=False compiled a step"
    before = _compiled_graphs(backend, compiled_m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _losses(compiled_m, compile=True)
    said = [w for w in caught if "XLA runs convolutions far slower" in str(w.message)]
    xla_on_cpu = backend == "keras" and not ON_JAX and compiled_m.device.startswith("cpu")
    assert len(said) == (1 if xla_on_cpu else 0), [str(w.message) for w in caught]
    if ON_JAX and backend == "keras":       # already jitted: compile=True is the same run
        np.testing.assert_array_equal(compiled, eager)
        return
    assert _compiled_graphs(backend, compiled_m) > before, "compile=True ran the steps eagerly"
    assert compiled.shape == eager.shape == (8,)
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=2e-5)     # measured: <= 6e-7
    assert eager[-1] < eager[0], "the run must learn for the comparison to mean something"
    we, wc = tl.get_weights(eager_m), tl.get_weights(compiled_m)
    for name in we:
        scale = max(float(np.abs(we[name]).max()), 1e-3)
        assert np.abs(wc[name] - we[name]).max() <= 1e-4 * scale, name


def test_a_missing_cxx_compiler_is_refused_before_any_step():
    pytest.importorskip("torch")
    from torch._inductor import config

    m = _model("torch")
    w0 = tl.get_weights(m)
    x, y = learnable(16)
    saved = config.cpp.cxx
    config.cpp.cxx = ("tlbridge-no-such-c++",)
    try:
        with pytest.raises(errors.CompileError, match=r"C\+\+ compiler.*compile=False"):
            tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, compile=True)
    finally:
        config.cpp.cxx = saved
    for name, value in tl.get_weights(m).items():
        np.testing.assert_array_equal(value, w0[name])


def test_compile_with_data_parallel_or_a_non_bool_is_refused_before_any_work(backend,
                                                                             monkeypatch):
    if backend == "keras" and ON_JAX:
        pytest.skip("Keras on JAX has no data-parallel fine_tune yet")
    m = _model(backend)
    x, y = learnable(16)
    with pytest.raises(errors.DataError, match="Expected compile as True or False"):
        tl.fine_tune(m, (x, y), progress=False, compile="yes")
    if backend == "torch":      # as if launched by torchrun; refused before joining any group
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        kwargs = {}
    else:
        kwargs = {"parallel": 1}
    with pytest.raises(errors.DataError, match=r"compile=True with training on one device.*"
                                               r"data-parallel"):
        tl.fine_tune(m, (x, y), progress=False, compile=True, **kwargs)
