"""The portable BERT encoder (tlbridge/bert.py, backends/*/bert.py) and its tokenizer.

Reference: transformers' own BertModel (the dev extra) + sentence-transformers' mean pooling,
on the packaged all-MiniLM-L6-v2 weights. Parity: float64 torch vs Keras on the real weights.
A small BERT directory written by transformers' save_pretrained (with the packaged vocabulary)
covers weights=DIR, padding, tl.data.texts and two epochs of fine_tune cheaply.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import bert, parity

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

pytestmark = both_backends

TEXTS = ["A man is eating food.", "The new movie is awesome, everyone should see it twice!",
         "hi", "Stocks fell sharply on Monday after the central bank raised interest rates.",
         "Der Hund schläft.", "naïve café — résumé ☕"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def minilm():
    """The packaged all-MiniLM-L6-v2 on both backends (float32) and transformers' BertModel."""
    ref = transformers.BertModel.from_pretrained(str(bert.packaged_dir("minilm_l6"))).eval()
    return {b: tl.load_backbone("minilm_l6", weights="pretrained", backend=b)
            for b in ("torch", "keras")} | {"ref": ref}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A BERT directory as transformers writes it (config.json, model.safetensors with the
    pooler) with the packaged tokenizer files beside it: a user's own BERT, made here."""
    folder = tmp_path_factory.mktemp("small_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, **SMALL)
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(bert.packaged_dir("minilm_l6") / name, folder / name)
    return folder


def _reference(ref, batch, pooling="mean"):
    with torch.no_grad():
        h = ref(input_ids=torch.from_numpy(batch["input_ids"]),
                attention_mask=torch.from_numpy(batch["attention_mask"])).last_hidden_state
    if pooling == "cls":
        return h[:, 0].numpy()
    w = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).to(h.dtype)
    return ((h * w).sum(1) / w.sum(1).clamp(min=1e-9)).numpy()


def test_sentence_embeddings_equal_transformers_bert_with_mean_pooling(minilm):
    batch = tl.tokenize(minilm["torch"], TEXTS)
    truth = _reference(minilm["ref"], batch)
    assert truth.shape == (len(TEXTS), 384)
    for backend in ("torch", "keras"):
        got = tl.features(minilm[backend], batch)
        assert np.abs(got - truth).max() <= 1e-5, backend
        assert np.array_equal(tl.tokenize(minilm[backend], TEXTS)["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_cls_pooling_and_normalize_follow_their_definitions(small_dir, backend):
    ref = transformers.BertModel.from_pretrained(str(small_dir)).eval()
    m = tl.load_backbone("bert", weights=small_dir, backend=backend, pooling="cls")
    batch = tl.tokenize(m, TEXTS)
    assert np.abs(tl.features(m, batch) - _reference(ref, batch, "cls")).max() <= 1e-5
    unit = tl.load_backbone("bert", weights=small_dir, backend=backend, normalize=True)
    mean = _reference(ref, batch)
    np.testing.assert_allclose(tl.features(unit, batch),
                               mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)


def test_weights_dir_takes_the_architecture_from_config_json(small_dir):
    m = tl.load_backbone("bert", weights=small_dir, backend="torch")
    opts = dict(m.spec.options)
    assert {k: opts[k] for k in SMALL} == SMALL and opts["tokenizer"] == str(small_dir)
    w = tl.get_weights(m)
    assert not any(k.startswith("backbone.pooler") for k in w)     # the file's pooler is dropped
    state = transformers.BertModel.from_pretrained(str(small_dir)).state_dict()
    np.testing.assert_array_equal(w["backbone.encoder.layer.1.output.dense.weight"],
                                  state["encoder.layer.1.output.dense.weight"].numpy())
    with pytest.raises(tl.errors.CheckpointError, match="hidden_size=32"):
        tl.load_backbone("bert", weights=small_dir, backend="torch", hidden_size=48)


def test_float64_loss_and_every_gradient_agree_on_the_real_weights():
    """float64, the packaged weights: torch and Keras to 1e-10 on the loss and every gradient
    (embeddings, attention, LayerNorm, FFN, head) for a BCE and a CE head, eval and train mode;
    the key biases are zero by the softmax."""
    backbones = [tl.load_backbone("minilm_l6", weights="pretrained", backend=b, dtype="float64")
                 for b in ("torch", "keras")]
    batch = tl.tokenize(backbones[0], TEXTS[:4])
    for loss, k in (("bce", 1), ("ce", 3)):
        ms = [tl.replace_head(b, k, loss=loss, seed=1) for b in backbones]
        y = (np.arange(4) % 2)[:, None].astype(float) if loss == "bce" else np.arange(4) % k
        for training in (False, True):
            r = parity.compare(*ms, batch, y, training=training)
            assert r.n_grads == len(tl.trainable_names(ms[0])) == 101 + 2     # backbone, head
            assert r.loss <= 1e-10 and r.grads <= 1e-10, (loss, r.loss, r.grads, r.grads_at)
            assert r.zeros == parity.expected_zero_grads(ms[0], training)


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_padding_changes_no_feature_and_no_gradient(small_dir, backend):
    m = tl.replace_head(tl.load_backbone("bert", weights=small_dir, backend=backend,
                                         dtype="float64"), 2, loss="ce", seed=0)
    tight = tl.tokenize(m, TEXTS)
    wide = {k: np.pad(v, ((0, 0), (0, 9))) for k, v in tight.items()}     # [PAD] is id 0
    wide["input_ids"][:, -9:] = np.random.default_rng(0).integers(1, 30522, (len(TEXTS), 9))
    wide["attention_mask"][:, -9:] = 0          # whatever the padded ids are, they are masked
    np.testing.assert_allclose(tl.features(m, wide), tl.features(m, tight), rtol=0, atol=1e-12)
    y = np.arange(len(TEXTS)) % 2
    lt, gt = tl.loss_and_grads(m, tight, y)
    lw, gw = tl.loss_and_grads(m, wide, y)
    assert abs(lt - lw) <= 1e-13
    errors = parity.rel_errors(gw, gt, skip=parity.zero_set(gt))   # key biases: zero, see parity
    assert len(errors) == len(gt) - 2 and max(errors.values()) <= 1e-10
    # the padded positions' ids get no gradient: only the real tokens' rows move
    g = gw["backbone.embeddings.word_embeddings.weight"]
    real = np.unique(tight["input_ids"][tight["attention_mask"] == 1])
    assert set(np.nonzero(np.abs(g).sum(axis=1))[0]) <= set(real)


def test_tokenize_pads_to_the_longest_text_and_truncates_at_max_length(small_dir):
    m = tl.load_backbone("bert", weights=small_dir, backend="torch")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(small_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    own = [e.ids for e in tok.encode_batch(TEXTS)]
    batch = tl.tokenize(m, TEXTS)
    assert batch["input_ids"].shape == (len(TEXTS), max(map(len, own))) < (len(TEXTS), 128)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int64
    for row, ids in enumerate(own):
        assert batch["input_ids"][row, :len(ids)].tolist() == ids
        assert batch["attention_mask"][row].sum() == len(ids)
        assert not batch["input_ids"][row, len(ids):].any()
    short = tl.tokenize(m, TEXTS, max_length=5)
    assert short["input_ids"].shape == (len(TEXTS), 5)
    assert (short["input_ids"][:, -1] == tok.token_to_id("[SEP]"))[[0, 1, 3]].all()


def test_texts_dataset_pads_each_batch_to_its_longest(small_dir):
    m = tl.load_backbone("bert", weights=small_dir, backend="torch")
    texts = [" ".join(["word"] * n) for n in (1, 30, 2, 3, 25, 4, 5)]
    y = np.arange(7) % 2
    ds = tl.data.texts(texts, y, model=m, batch_size=3, shuffle=True, seed=4)
    order = tl.data.arrays(np.zeros((7, 1, 1, 1), np.float32), y, batch_size=3, shuffle=True,
                           seed=4).plan(0)[0]
    assert np.array_equal(ds.plan(0)[0], order)      # the same seeded order as tl.data.arrays
    lengths = np.array([n + 2 for n in (1, 30, 2, 3, 25, 4, 5)])   # [CLS] words [SEP]
    for k, (x, yb) in enumerate(ds.epoch(0)):
        rows = order[3 * k:3 * k + 3]
        assert x["input_ids"].shape == (len(rows), lengths[rows].max())
        assert np.array_equal(x["attention_mask"].sum(axis=1), lengths[rows])
        assert np.array_equal(yb[:, 0], y[rows])


def test_fine_tune_two_epochs_agrees_across_backends_in_float64(small_dir):
    texts = [f"{w} {v} the {o}" for w in ("cats", "dogs", "stocks", "rates")
             for v in ("like", "fear") for o in ("rain", "market")]
    y = np.array([i // 4 >= 2 for i in range(len(texts))], float)
    out = {}
    for backend in ("torch", "keras"):
        m = tl.replace_head(tl.load_backbone("bert", weights=small_dir, backend=backend,
                                             dtype="float64"), 1, seed=3)
        ds = tl.data.texts(texts, y, model=m, batch_size=6, seed=0)
        hist = tl.fine_tune(m, ds, epochs=2, optimizer="sgd", progress=False)
        out[backend] = (hist["loss"], tl.get_weights(m))
    assert np.allclose(out["torch"][0], out["keras"][0], rtol=1e-9, atol=0)
    # the key biases move by rounding noise alone (their gradient is zero): floored
    worst, at = parity.worst(out["torch"][1], out["keras"][1], floor_rel=1e-6)
    assert worst <= 1e-9, at
    start = tl.get_weights(tl.load_backbone("bert", weights=small_dir, backend="torch",
                                            dtype="float64"))
    moved = out["torch"][1]["backbone.encoder.layer.1.attention.self.query.weight"]
    assert not np.array_equal(moved, start["backbone.encoder.layer.1.attention.self.query.weight"])


def test_token_rows_hash_their_tokens_not_their_padding(small_dir):
    """fine_tune records the rows it trained on (tl.fuse's own-training-data guard): the same
    texts padded to another width are the same rows; other texts are not."""
    from tlbridge import inputs
    m = tl.load_backbone("bert", weights=small_dir, backend="torch")
    tight = tl.tokenize(m, TEXTS)
    wide = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in tight.items()}
    assert np.array_equal(inputs.row_hashes(tight), inputs.row_hashes(wide))
    assert len(set(inputs.row_hashes(tight).tolist())) == len(TEXTS)
    ds = tl.data.texts(TEXTS, np.zeros(len(TEXTS)), model=m, batch_size=2)
    assert inputs.overlap(ds.in_memory_inputs(), inputs.row_hashes(tight)) == 1.0


def test_batches_of_a_tokenized_dict_drop_their_padding_columns(small_dir):
    """tl.features / tl.data.arrays cut a dict padded to its longest text into batches of their
    own width: the same features as one text at a time, narrower batches."""
    from tlbridge import inputs
    m = tl.load_backbone("bert", weights=small_dir, backend="keras", dtype="float64")
    texts = ["short", "also short", " ".join(["long"] * 40), "tiny"]
    x = tl.tokenize(m, texts)
    alone = np.concatenate([tl.features(m, tl.tokenize(m, [t])) for t in texts])
    np.testing.assert_allclose(tl.features(m, x, batch_size=2), alone, rtol=0, atol=1e-12)
    ds = tl.data.arrays(x, np.zeros(4), batch_size=2, shuffle=False)
    assert [b["input_ids"].shape[1] for b, _ in ds.epoch(0)] == [4, 42]
    assert inputs.concat([inputs.trim(inputs.rows(x, slice(0, 2))),
                          inputs.rows(x, slice(2, 4))])["input_ids"].shape == x["input_ids"].shape
