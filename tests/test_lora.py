"""LoRA adapters (tlbridge/lora.py, backends/*/lora.py): identity at the start, what trains,
the same adapters on both backends for one seed, float64 parity of loss and adapter gradients,
base weights untouched by fine_tune, save/load/convert with unmerged adapters, an exact merge,
and bad input. Small models: a 2-layer BERT (attention and FFN Linear layers) and seed_vgg
with BatchNorm (Conv2d, frozen BatchNorm)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import parity
from tlbridge.errors import AdapterError

BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 32, "vocab_size": 50}
TEXT_TARGETS = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]
VGG = {"widths": (4, 8), "batch_norm": True}


def bert(backend, dtype="float64", outputs=2):
    m = tl.load_backbone("bert", seed=0, backend=backend, dtype=dtype, **BERT)
    return tl.replace_head(m, outputs, seed=1)


def vgg(backend, dtype="float64", outputs=2):
    m = tl.load_backbone("seed_vgg", seed=0, backend=backend, dtype=dtype,
                         input_shape=(16, 16, 3), **VGG)
    return tl.replace_head(m, outputs, seed=1)


def resnet(backend, dtype="float64", outputs=2):
    """Strided convs (7x7 stride 2 padding 3, a 1x1 stride-2 downsample) for the conv adapter."""
    m = tl.load_backbone("resnet18", seed=0, backend=backend, dtype=dtype,
                         input_shape=(32, 32, 3))
    return tl.replace_head(m, outputs, seed=1)


RESNET_TARGETS = ["backbone.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"]


def _lora_names(m):
    return [n for n in tl.get_weights(m) if ".lora_" in n]


def _random_b(m, seed=5):
    """B != 0 (as after training), so A's gradient is not zero."""
    rng = np.random.default_rng(seed)
    w = {n: rng.normal(0.0, 0.1, v.shape) for n, v in tl.get_weights(m).items()
         if n.endswith("lora_B.weight")}
    tl.set_weights(m, w, strict=False)
    return w


@pytest.mark.parametrize("build", [bert, vgg], ids=["bert", "seed_vgg"])
def test_adapted_model_starts_exactly_as_the_base(backend, build):
    m = build(backend)
    x, _ = parity.batch(m.inputs, 4, 2)
    before, base = tl.logits(m, x), tl.get_weights(m)
    assert tl.add_lora(m, rank=2, alpha=4, seed=0) is m
    assert np.array_equal(tl.logits(m, x), before)
    w = tl.get_weights(m)
    assert all(np.array_equal(w[k], v) for k, v in base.items())
    assert all(not w[n].any() for n in w if n.endswith("lora_B.weight"))


def test_only_adapters_and_head_train(backend):
    m = tl.add_lora(bert(backend), rank=4, targets=TEXT_TARGETS, seed=0)
    lora = _lora_names(m)
    layer0 = [n for n in lora if ".layer.0." in n]
    assert len(lora) == 2 * 6 * 2 and len(layer0) == 12
    assert "backbone.encoder.layer.0.attention.output.dense.lora_A.weight" in lora
    assert tl.trainable_names(m) == lora + ["head.weight", "head.bias"]
    shapes = {n: v.shape for n, v in tl.get_weights(m).items()}
    assert shapes["backbone.encoder.layer.1.intermediate.dense.lora_A.weight"] == (4, 16)
    assert shapes["backbone.encoder.layer.1.intermediate.dense.lora_B.weight"] == (32, 4)
    c = tl.add_lora(vgg(backend), rank=2, targets="backbone.features.*", seed=0)
    shapes = {n: v.shape for n, v in tl.get_weights(c).items()}
    assert shapes["backbone.features.4.lora_A.weight"] == (2, 4, 3, 3)
    assert shapes["backbone.features.4.lora_B.weight"] == (8, 2, 1, 1)
    assert not any(n.startswith("backbone.") and ".lora_" not in n for n in tl.trainable_names(c))


@both_backends
def test_one_seed_gives_the_same_adapters_on_both_backends():
    w = {b: tl.get_weights(tl.add_lora(bert(b), targets=TEXT_TARGETS, seed=7))
         for b in ("torch", "keras")}
    assert set(w["torch"]) == set(w["keras"])
    for k, v in w["torch"].items():
        assert np.array_equal(v, w["keras"][k]), k
    a = w["torch"]["backbone.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(16)      # U(+-1/sqrt(fan_in)), torch's default
    other = tl.get_weights(tl.add_lora(bert("torch"), targets=TEXT_TARGETS, seed=8))
    assert not np.array_equal(other["backbone.encoder.layer.0.attention.self.query.lora_A.weight"], a)


@both_backends
@pytest.mark.parametrize("build,training", [(bert, False), (bert, True), (vgg, True),
                                            (resnet, True)],
                         ids=["bert-eval", "bert-train", "seed_vgg-train", "resnet18-train"])
def test_float64_loss_and_adapter_gradients_agree_across_backends(build, training):
    targets = RESNET_TARGETS if build is resnet else None
    mt = tl.add_lora(build("torch"), rank=2, alpha=4, targets=targets, seed=0)
    _random_b(mt)
    mk = tl.convert(mt, "keras")
    x, y = parity.batch(mt.inputs, 4, 2, seed=3)
    r = parity.compare(mt, mk, x, y, training=training)
    assert r.loss <= 1e-10 and r.grads <= 1e-10, (r.loss, r.grads, r.grads_at)
    assert r.n_grads == len(_lora_names(mt)) + 2 and not r.zeros
    assert r.stats <= 1e-10      # frozen BatchNorm: no running statistic moved on either side


def test_fine_tune_changes_adapters_and_head_only(backend):
    m = tl.add_lora(vgg(backend), rank=2, seed=0)
    before = tl.get_weights(m)
    x, y = parity.batch(m.inputs, 8, 2, seed=4)
    tl.fine_tune(m, (x, y), epochs=1, batch_size=4, optimizer=tl.optim.SGD(lr=0.1),
                 progress=False)
    after = tl.get_weights(m)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved <= set(tl.trainable_names(m))      # no base weight, no BatchNorm statistic
    assert "head.weight" in moved and "backbone.features.0.lora_B.weight" in moved
    assert "backbone.features.0.lora_A.weight" in moved     # once B != 0, A moves too


@both_backends
@pytest.mark.parametrize("build", [bert, vgg], ids=["bert", "seed_vgg"])
def test_two_epochs_of_fine_tune_agree_across_backends_in_float64(build):
    x, y = parity.batch(build("torch").inputs, 12, 2, seed=6)
    out = {}
    for backend in ("torch", "keras"):
        m = tl.add_lora(build(backend), rank=2, alpha=4, seed=0)
        hist = tl.fine_tune(m, (x, y), epochs=2, batch_size=4, progress=False,
                            optimizer=tl.optim.Adam(lr=1e-2))
        out[backend] = (hist["loss"], tl.get_weights(m))
    assert np.allclose(out["torch"][0], out["keras"][0], rtol=1e-9, atol=0)
    worst, at = parity.worst(out["torch"][1], out["keras"][1], floor_rel=1e-6)
    assert worst <= 1e-9, (worst, at)


@both_backends
def test_save_load_and_convert_carry_unmerged_adapters(tmp_path):
    mt = tl.add_lora(bert("torch"), rank=2, targets=["query", "value"], seed=0)
    _random_b(mt)
    x, _ = parity.batch(mt.inputs, 3, 2, seed=1)
    z = tl.logits(mt, x)
    path = tmp_path / "lora.safetensors"
    tl.save(mt, path)
    for back in (tl.load(path), tl.load(path, backend="keras"), tl.convert(mt, "keras")):
        assert back.spec.adapters == mt.spec.adapters
        assert tl.trainable_names(back) == tl.trainable_names(mt)
        np.testing.assert_allclose(tl.logits(back, x), z, rtol=0, atol=1e-12)
    assert set(tl.get_weights(tl.load(path))) == set(tl.get_weights(mt))


@pytest.mark.parametrize("build", [bert, vgg], ids=["bert", "seed_vgg"])
def test_merge_folds_adapters_exactly_and_leaves_none(backend, build):
    m = tl.add_lora(build(backend), rank=2, alpha=6, seed=0)
    _random_b(m)
    x, _ = parity.batch(m.inputs, 4, 2, seed=2)
    z = tl.logits(m, x)
    frozen = {n for n in m.frozen}
    assert tl.merge_lora(m) is m
    assert not _lora_names(m) and m.spec.adapters == ()
    assert np.abs(tl.logits(m, x) - z).max() <= 1e-12 * np.abs(z).max()
    assert m.frozen == frozen


# ---- bad input: clear errors, model unchanged ------------------------------------------------

def _unchanged(m, w, spec):
    after = tl.get_weights(m)
    assert m.spec == spec and set(after) == set(w)
    assert all(np.array_equal(after[k], v) for k, v in w.items())


def test_targets_matching_nothing_name_the_closest_modules(backend):
    m = bert(backend, "float32")
    w, spec = tl.get_weights(m), m.spec
    with pytest.raises(AdapterError, match=r"'qurey' matches none.*'query'"):
        tl.add_lora(m, targets=["qurey"])
    with pytest.raises(AdapterError, match="matches none"):
        tl.add_lora(m, targets="head")          # the head trains in full, it takes no adapter
    _unchanged(m, w, spec)


@pytest.mark.parametrize("rank", [0, -1, 17, 2.0])
def test_bad_ranks_are_refused(backend, rank):
    m = bert(backend, "float32")
    w, spec = tl.get_weights(m), m.spec
    with pytest.raises(AdapterError, match="rank"):
        tl.add_lora(m, rank=rank, targets="query")
    _unchanged(m, w, spec)


def test_adding_twice_to_a_layer_and_merging_without_adapters_are_refused(backend):
    m = bert(backend, "float32")
    with pytest.raises(AdapterError, match="no.*adapters|none"):
        tl.merge_lora(m)
    tl.add_lora(m, rank=2, targets="query", seed=0)
    w, spec = tl.get_weights(m), m.spec
    with pytest.raises(AdapterError, match="already have"):
        tl.add_lora(m, rank=2, targets=["value", "layer.1.attention.self.query"])
    _unchanged(m, w, spec)
    tl.add_lora(m, rank=2, targets="value", seed=1)          # other layers: fine
    assert len(m.spec.adapters) == 4


def test_depthwise_convs_are_refused_with_the_reason(backend):
    m = tl.load_backbone("mobilenet_v2", backend=backend, input_shape=(32, 32, 3), seed=0)
    w, spec = tl.get_weights(m), m.spec
    with pytest.raises(AdapterError, match="depthwise.*peft#2202"):
        tl.add_lora(m, rank=2, targets="backbone.features.2.conv.*")
    _unchanged(m, w, spec)


# ---- adapter files in peft's layout -----------------------------------------------------------

def _trained(backend, build=bert, **kwargs):
    m = tl.add_lora(build(backend), rank=2, alpha=4, seed=0, **kwargs)
    rng = np.random.default_rng(9)
    tl.set_weights(m, {n: rng.normal(0.0, 0.1, v.shape) for n, v in tl.get_weights(m).items()
                       if ".lora_" in n or n.startswith("head.")}, strict=False)
    return m


@both_backends
def test_adapters_trained_on_one_backend_load_on_the_other(tmp_path):
    """Saved on Keras, loaded onto the same base on torch (and back): the same logits."""
    from safetensors.numpy import load_file
    import json
    mk = _trained("keras", targets=["query", "value", "intermediate.dense"])
    tl.add_lora(mk, rank=3, alpha=5, targets="output.dense", seed=1)     # another rank too
    tl.save_adapters(mk, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.backbone.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.head.weight" in keys and not any("LayerNorm" in k for k in keys)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 2, 4.0, "none")
    assert cfg["rank_pattern"]["backbone.encoder.layer.1.output.dense"] == 3
    x, _ = parity.batch(mk.inputs, 4, 2, seed=2)
    z = tl.logits(mk, x)
    for backend in ("torch", "keras"):
        m = tl.load_adapters(bert(backend), tmp_path / "a")
        assert m.spec.adapters == mk.spec.adapters
        assert tl.trainable_names(m) == tl.trainable_names(mk)
        np.testing.assert_allclose(tl.logits(m, x), z, rtol=0, atol=1e-12)


@both_backends
def test_adapters_fine_tuned_on_torch_load_on_keras(tmp_path):
    """Really trained (one epoch of AdamW: adapters and head), saved, loaded onto the same base
    on Keras: the same logits (the Keras -> torch direction: tests/test_lora_scale.py)."""
    mt = tl.add_lora(bert("torch"), rank=2, alpha=4, targets=["query", "value", "output.dense"],
                     seed=0)
    x, y = parity.batch(mt.inputs, 8, 2, seed=2)
    before = tl.get_weights(mt)
    tl.fine_tune(mt, (x, y), epochs=1, batch_size=4, progress=False,
                 optimizer=tl.optim.AdamW(lr=1e-2))
    moved = {k for k, v in tl.get_weights(mt).items() if not np.array_equal(v, before[k])}
    assert moved == set(tl.trainable_names(mt))
    tl.save_adapters(mt, tmp_path)
    mk = tl.load_adapters(bert("keras"), tmp_path)
    np.testing.assert_allclose(tl.logits(mk, x), tl.logits(mt, x), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@both_backends
def test_peft_reads_tlbridge_adapter_files_and_tlbridge_reads_peft(tmp_path, peft):
    import torch
    mt = _trained("torch", targets=["query", "value", "intermediate.dense"])
    tl.save_adapters(mt, tmp_path / "ours")
    x, _ = parity.batch(mt.inputs, 4, 2, seed=2)
    z = tl.logits(mt, x)
    base = bert("torch")
    pm = peft.PeftModel.from_pretrained(base.native, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        got = pm({k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    np.testing.assert_allclose(got, z, rtol=0, atol=1e-12)
    with torch.no_grad():                       # peft's own files, onto Keras
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.01)
        theirs = pm({k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    pm.save_pretrained(str(tmp_path / "theirs"))
    mk = tl.load_adapters(bert("keras"), tmp_path / "theirs")
    np.testing.assert_allclose(tl.logits(mk, x), theirs, rtol=0, atol=1e-12)


def test_adapters_for_another_base_are_refused(backend, tmp_path):
    tl.save_adapters(_trained(backend, targets="query"), tmp_path)
    other = tl.replace_head(tl.load_backbone("bert", seed=0, backend=backend, dtype="float64",
                                             **{**BERT, "hidden_size": 8}), 2, seed=1)
    w, spec = tl.get_weights(other), other.spec
    with pytest.raises(AdapterError, match="another base"):
        tl.load_adapters(other, tmp_path)
    _unchanged(other, w, spec)
    narrow = bert(backend, outputs=3)
    with pytest.raises(AdapterError, match="same head"):
        tl.load_adapters(narrow, tmp_path)
    with pytest.raises(AdapterError, match="adapter directory"):
        tl.load_adapters(narrow, tmp_path / "nowhere")


def test_soups_take_merged_adapters_and_refuse_unmerged_ones(backend):
    """Averaging A and B apart is not averaging the updates B A: merge first."""
    ms = [_trained(backend, targets="query") for _ in range(2)]
    tl.set_weights(ms[1], {k: v + 0.05 for k, v in tl.get_weights(ms[1]).items()
                           if k.endswith("lora_B.weight")}, strict=False)
    with pytest.raises(AdapterError, match="merge_lora"):
        tl.soup(ms)
    x, _ = parity.batch(ms[0].inputs, 4, 2, seed=2)
    for m in ms:
        tl.merge_lora(m)
    s = tl.soup(ms, warn=False)
    mean = {k: (tl.get_weights(ms[0])[k] + tl.get_weights(ms[1])[k]) / 2
            for k in tl.get_weights(ms[0])}
    assert parity.worst(tl.get_weights(s), mean)[0] <= 1e-15
    assert tl.logits(s, x).shape == (4, 2)


def test_checkpoint_resume_continues_a_lora_run_and_needs_the_same_adapters(backend, tmp_path):
    """Adam (its moments for the adapters travel in the checkpoint): epoch 1 after a resume is
    the uninterrupted run's epoch 1, losses and weights bit for bit."""
    x, y = parity.batch(bert(backend).inputs, 8, 2, seed=1)
    run = dict(batch_size=4, progress=False, optimizer=tl.optim.Adam(1e-2))
    straight = tl.add_lora(bert(backend), rank=2, seed=0)
    whole = tl.fine_tune(straight, (x, y), epochs=2, **run)
    first = tl.add_lora(bert(backend), rank=2, seed=0)
    tl.fine_tune(first, (x, y), epochs=1, checkpoint=tmp_path, **run)
    resumed = tl.add_lora(bert(backend), rank=2, seed=0)
    h = tl.fine_tune(resumed, (x, y), epochs=2, checkpoint=tl.Checkpoint(tmp_path, resume=True),
                     **run)
    assert h["loss"] == whole["loss"] and whole["loss"][1] != whole["loss"][0]
    assert parity.worst(tl.get_weights(resumed), tl.get_weights(straight))[0] == 0.0
    other = tl.add_lora(bert(backend), rank=3, seed=0)
    with pytest.raises(tl.errors.TLBridgeError, match="adapters"):
        tl.fine_tune(other, (x, y), epochs=3, checkpoint=tl.Checkpoint(tmp_path, resume=True),
                     **run)


@both_backends
def test_a_lora_run_checkpointed_on_torch_resumes_on_keras(tmp_path):
    """The adapters' Adam moments are stored under canonical names: 1 epoch on torch + a resume
    on Keras trains what 2 epochs on Keras train (float64)."""
    x, y = parity.batch(bert("torch").inputs, 8, 2, seed=1)
    run = dict(batch_size=4, progress=False, optimizer=tl.optim.Adam(1e-2))
    tl.fine_tune(tl.add_lora(bert("torch"), rank=2, seed=0), (x, y), epochs=1,
                 checkpoint=tmp_path, **run)
    resumed = tl.add_lora(bert("keras"), rank=2, seed=0)
    h = tl.fine_tune(resumed, (x, y), epochs=2, checkpoint=tl.Checkpoint(tmp_path, resume=True),
                     **run)
    keras = tl.add_lora(bert("keras"), rank=2, seed=0)
    whole = tl.fine_tune(keras, (x, y), epochs=2, **run)
    np.testing.assert_allclose(h["loss"], whole["loss"], rtol=1e-10, atol=0)
    worst, at = parity.worst(tl.get_weights(resumed), tl.get_weights(keras), floor_rel=1e-6)
    assert worst <= 1e-10, (worst, at)


@both_backends
def test_adapter_dropout_is_off_in_inference_and_on_in_training():
    mt = tl.add_lora(bert("torch"), rank=2, targets="query", dropout=0.5, seed=0)
    _random_b(mt)
    mk = tl.convert(mt, "keras")
    assert mk.spec.adapters[0][3] == 0.5
    x, y = parity.batch(mt.inputs, 4, 2, seed=2)
    np.testing.assert_allclose(tl.logits(mk, x), tl.logits(mt, x), rtol=0, atol=1e-12)
    for m in (mt, mk):      # the small BERT has no other dropout: only the adapter's differs
        assert tl.loss_and_grads(m, x, y, training=True)[0] != \
            tl.loss_and_grads(m, x, y, training=False)[0], m.backend
    plain = tl.add_lora(bert("keras"), rank=2, targets="query", seed=0)
    assert tl.loss_and_grads(plain, x, y, training=True)[0] == \
        tl.loss_and_grads(plain, x, y, training=False)[0]


def test_new_heads_keep_the_adapters_and_ema_trains_only_them(backend):
    """replace_head / replace_heads on a LoRA model keep its adapters and its frozen base;
    fine_tune with an EMA leaves every base weight as it was."""
    m = tl.add_lora(bert(backend), rank=2, targets="query", seed=0)
    base = {k: v for k, v in tl.get_weights(m).items() if ".lora_" not in k and
            not k.startswith("head.")}
    lora = _lora_names(m)
    one = tl.replace_head(m, 3, seed=2)
    many = tl.replace_heads(m, {"a": ("bce", 1), "b": ("ce", 3)}, seed=3)
    for new in (one, many):
        assert new.spec.adapters == m.spec.adapters
        assert set(lora) <= set(tl.trainable_names(new))
        assert not set(base) & set(tl.trainable_names(new))
    x, y = parity.batch(one.inputs, 8, 3, seed=1)
    tl.fine_tune(one, (x, y), epochs=1, batch_size=4, progress=False,
                 optimizer=tl.optim.SGD(lr=0.1, ema=tl.optim.EMA(0.5)))
    after = tl.get_weights(one)
    assert all(np.array_equal(after[k], v) for k, v in base.items())
    assert any(after[k].any() for k in lora if k.endswith("lora_B.weight"))
