"""Both backends in one process: the same weights give the same loss, every gradient and the
same BatchNorm statistics (docs/parity.md #1-#5, #8-#10), for every portable backbone.

float64 is the truth: torch and Keras agree to 1e-10 per tensor. float32 is judged against it on
every backbone (tlbridge/fp32.py): forward quantities, per-tensor gradient medians over 12
batches and kink flips, Keras within 4 x torch.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import fp32, parity, zoo

pytestmark = both_backends

PORTABLE = sorted(zoo.PORTABLE)
SHAPE = parity.Config().shape


class Models:
    """One backbone's parity suites (tlbridge.parity.Suite), built once per k and shared by the
    tests of this module; every test starts with reset(), so no result depends on which test
    ran before (weights, BN statistics and freeze state are put back)."""

    def __init__(self, name, options):
        self.name, self.options = name, options
        self.config = parity.config(name, **options)
        self.inputs = zoo.signature(name, self.config.shape, options)   # the declared inputs
        self._suites = {}

    def suite(self, k):
        """The first k builds the models; another k puts new heads on them (parity.rehead: the
        same weights as a suite built for it, without building the backbones again)."""
        if k not in self._suites:
            built = next(iter(self._suites.values()), None)
            self._suites[k] = (parity.rehead(built, k) if built is not None
                               else parity.suite(self.name, k, **self.options))
        return self._suites[k]


@pytest.fixture(scope="module")
def bb(request):
    """Module-scoped and parametrized indirectly, so pytest runs each backbone's tests together
    and builds its models once."""
    return Models(*request.param)


def _bb(name, options=None, label=None):
    return pytest.param((name, options or {}), id=label or name)


# the BERT family's architecture at a test's size (its real weights: tests/test_text.py)
TINY_BERT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 32, "max_position_embeddings": 32}
CASES = ([_bb(name) for name in PORTABLE if zoo.PORTABLE[name].family != "bert"]
         + [_bb("seed_vgg", {"batch_norm": True}, "seed_vgg_bn"), _bb("bert", TINY_BERT, "bert_tiny")])


@pytest.mark.parametrize("k", [1, 3], ids=["1out", "3out"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "trainBN"])
@pytest.mark.parametrize("bb", CASES, indirect=True, scope="module")
def test_float64_loss_every_gradient_and_bn_stats_agree(bb, training, frozen, k):
    s = bb.suite(k)
    s.reset(frozen)
    mt, mk = s.models["torch", "float64"], s.models["keras", "float64"]
    x, y = parity.batch(bb.inputs, bb.config.batch64, k, seed=parity.SEED_BATCH)
    r = parity.compare(mt, mk, x, y, training=training)
    expected = len(tl.trainable_names(mt))
    assert r.n_grads == expected and expected > 0
    assert r.loss <= parity.TOL["float64"], f"loss differs by {r.loss:.3g}"
    assert r.grads <= parity.TOL["float64"], f"gradient {r.grads_at} differs by {r.grads:.3g}"
    # the zero-to-rounding gradients are exactly the ones the architecture makes zero
    zeros = parity.expected_zero_grads(mt, training)
    assert r.zeros == zeros, sorted(r.zeros ^ zeros)
    assert r.zero_level <= parity.ZERO["float64"], f"structural zeros at {r.zero_level:.3g} of the largest gradient"
    assert r.stats <= parity.TOL["float64"], f"weights/BN statistics differ by {r.stats:.3g} after the pass"


@pytest.fixture(scope="module")
def judged(bb):
    """tlbridge.fp32.judge of one backbone in eval and train mode, on its own 32x32 suite
    (the float64 suites of resnet50 and vgg16 are 64x64), computed once per module."""
    setup = fp32.setup(bb.name)
    s = bb.suite(3) if tuple(bb.config.shape) == setup.shape else parity.suite(
        bb.name, 3, input_shape=setup.shape, **bb.options)
    return {mode: fp32.judge(s, mode == "train", setup) for mode in ("eval", "train")}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("bb", CASES, indirect=True, scope="module")
def test_float32_keras_is_as_accurate_as_torch_on_every_backbone(bb, judged, mode):
    """Forward quantities and gradients per tensor over 12 batches: Keras not significantly
    above max(floor, 4 x torch) batch by batch, no median above 1e-2; kink flips against float64:
    Keras not significantly above 4 x torch's (docs/parity.md, "float32")."""
    j = judged[mode]
    assert j.batches >= 12
    assert len(j.grads["keras"]) == len(j.grads[j.ref]) > 1
    assert {"loss", "logits"} <= set(j.forward["keras"])
    if bb.name != "token_bag":      # every image backbone has nonlinearities to line up
        assert any(k[0].isdigit() for k in j.forward["keras"])
    m64 = bb.suite(3).models["torch", "float64"]
    assert j.zeros == parity.expected_zero_grads(m64, mode == "train")
    for backend, level in j.zero_level.items():
        assert level <= parity.ZERO["float32"], f"{backend}: structural zeros at {level:.3g}"
    bad = j.failures()
    assert not bad, "over the float32 bar:\n" + "\n".join(bad[:10])


def test_suite_reset_restores_weights_statistics_and_freeze_state():
    s = parity.suite("seed_vgg", 1, batch_norm=True)
    s.reset(frozen=True)
    before = {key: tl.get_weights(m) for key, m in s.models.items()}
    x, y = parity.batch(SHAPE, 4, 1, seed=3)
    for (_, dtype), m in s.models.items():
        tl.unfreeze(m, "all")
        tl.bce_loss_and_grads(m, x.astype(dtype), y.astype(dtype), training=True)   # moves BN stats
    s.reset(frozen=True)
    for key, m in s.models.items():
        after = tl.get_weights(m)
        assert all(np.array_equal(before[key][n], after[n]) for n in after), key
        assert tl.trainable_names(m) == ["head.weight", "head.bias"]


def test_rehead_gives_the_suite_built_for_that_head_count():
    """The parity tests' second head count reuses the first's backbones (Models.suite): every
    model's weights and BatchNorm statistics must be the ones a suite built for it has."""
    first = parity.suite("seed_vgg", 3, batch_norm=True)
    built, reheaded = parity.suite("seed_vgg", 1, batch_norm=True), parity.rehead(first, 1)
    assert reheaded.weights.keys() == built.weights.keys()
    assert all(np.array_equal(reheaded.weights[k], v) for k, v in built.weights.items())
    for key, m in built.models.items():
        want, got = tl.get_weights(m), tl.get_weights(reheaded.models[key])
        assert all(np.array_equal(got[k], v) for k, v in want.items()), key
    first.reset(frozen=False)         # the first suite keeps its own weights
    assert all(np.array_equal(tl.get_weights(first.models[key])[k], v)
               for key in first.models for k, v in first.weights.items())


def test_train_mode_pass_stores_pytorch_unbiased_running_variance():
    """docs/parity.md #3: the Keras mirror stores n/(n-1) * batch variance, like PyTorch."""
    mt, mk = parity.pair("seed_vgg", dtype="float64", input_shape=SHAPE, widths=(4,), batch_norm=True)
    x, y = parity.batch(SHAPE, 4, 1, seed=2)
    conv = x.transpose(0, 3, 1, 2)
    w = tl.get_weights(mt)
    # the first conv's output, in numpy, to know the batch statistics
    out = _conv3x3(conv, w["backbone.features.0.weight"], w["backbone.features.0.bias"])
    n = out.shape[0] * out.shape[2] * out.shape[3]
    unbiased = out.var(axis=(0, 2, 3)) * n / (n - 1)
    for m in (mt, mk):
        tl.bce_loss_and_grads(m, x, y, training=True)
        got = tl.get_weights(m)["backbone.features.1.running_var"]
        np.testing.assert_allclose(got, 0.9 + 0.1 * unbiased, rtol=1e-12)
        np.testing.assert_allclose(tl.get_weights(m)["backbone.features.1.running_mean"],
                                   0.1 * out.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-15)


def _conv3x3(x, w, b):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


@pytest.mark.parametrize("bb", CASES, indirect=True, scope="module")
def test_convert_round_trip_returns_weights_exactly(bb):
    s = bb.suite(1)
    s.reset(frozen=True)
    mt = s.models["torch", "float64"]
    back = tl.convert(tl.convert(mt, "keras"), "torch")
    w0, w1 = tl.get_weights(mt), tl.get_weights(back)
    assert list(w0) == list(w1)
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert back.frozen == mt.frozen


def test_seeded_random_init_is_identical_on_both_backends():
    mt = tl.load_backbone("resnet18", backend="torch", input_shape=SHAPE, seed=7)
    mk = tl.load_backbone("resnet18", backend="keras", input_shape=SHAPE, seed=7)
    wt, wk = tl.get_weights(mt), tl.get_weights(mk)
    assert list(wt) == list(wk)
    assert all(np.array_equal(wt[k], wk[k]) for k in wt)


def test_saved_model_loads_on_the_other_backend_with_same_predictions(tmp_path):
    s = parity.suite("resnet18", 3)
    s.reset(frozen=True)
    mt = s.models["torch", "float64"]
    tl.save(mt, tmp_path / "m.safetensors")
    mk = tl.load(tmp_path / "m.safetensors", backend="keras")
    x, _ = parity.batch(SHAPE, 3, 3, seed=5)
    assert mk.backend == "keras" and mk.frozen == mt.frozen
    assert parity.rel_diff(tl.predict(mt, x), tl.predict(mk, x)) <= 1e-12
