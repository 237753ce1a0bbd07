"""Zero-shot heads from class descriptions (tlbridge/zeroshot.py), and few-shot on text, on the
packaged all-MiniLM-L6-v2 weights (a real encoder: zero-shot needs one)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl

pytestmark = both_backends

CLASSES = {"sport": ["a text about sport", "football, tennis and the olympics"],
           "politics": ["a text about politics", "elections and the government"],
           "food": "a text about food and cooking"}
TEXTS = ["The striker scored twice in the final minutes of the match.",
         "Parliament voted on the new budget after a long debate.",
         "Slice the onions and fry them in butter until golden.",
         "She won the marathon in record time.",
         "The senator announced she will run for president.",
         "This soup needs more salt and a little lemon."]
LABELS = np.array([0, 1, 2, 0, 1, 2])


@pytest.fixture(scope="module")
def encoders():
    return {b: tl.load_backbone("minilm_l6", weights="pretrained", backend=b)
            for b in ("torch", "keras")}


@pytest.fixture(scope="module")
def zero_shot(encoders):
    """The zero-shot model of each backend (tests that train work on a copy)."""
    return {b: tl.zero_shot_head(m, CLASSES, scale=20.0) for b, m in encoders.items()}


def _unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_zero_shot_head_scores_scale_times_cosine_and_predicts_without_training(encoders, zero_shot,
                                                                               backend):
    m, z = encoders[backend], zero_shot[backend]
    batch = tl.tokenize(z, TEXTS)
    # the definition, in numpy, on the un-normalised encoder's features
    rows = []
    for prompts in CLASSES.values():
        prompts = [prompts] if isinstance(prompts, str) else prompts
        mean = _unit(tl.features(m, tl.tokenize(m, prompts)).astype(np.float64)).mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    expected = 20.0 * _unit(tl.features(m, batch).astype(np.float64)) @ np.stack(rows).T
    np.testing.assert_allclose(tl.logits(z, batch), expected, atol=2e-5)
    assert z.report["classes"] == list(CLASSES) and z.spec.head.loss == "ce"
    assert np.array_equal(tl.predict(z, batch).argmax(axis=1), LABELS)
    assert dict(z.spec.options)["normalize"] is True and not dict(m.spec.options)["normalize"]


def test_zero_shot_model_saves_converts_and_fine_tunes_from_there(zero_shot, tmp_path):
    z = zero_shot["torch"]
    batch = tl.tokenize(z, TEXTS)
    tl.save(z, tmp_path / "zs.safetensors")
    zk = tl.load(tmp_path / "zs.safetensors", backend="keras")      # saved on torch, read on Keras
    np.testing.assert_allclose(tl.logits(zk, batch), tl.logits(z, batch), atol=2e-5)
    before = tl.get_weights(zk)["head.weight"].copy()
    tl.freeze(zk, "backbone")
    hist = tl.fine_tune(zk, (batch, LABELS), epochs=3, batch_size=6, optimizer=tl.optim.SGD(1.0),
                        progress=False)
    assert hist["loss"][-1] < hist["loss"][0]
    assert not np.array_equal(tl.get_weights(zk)["head.weight"], before)


def test_zero_shot_head_refuses_what_it_cannot_use(encoders):
    m = encoders["torch"]
    with pytest.raises(tl.errors.DataError, match="at least 2 classes"):
        tl.zero_shot_head(m, {"sport": ["sport"]})
    with pytest.raises(tl.errors.DataError, match="item 1 is NoneType"):
        tl.zero_shot_head(m, {"sport": ["sport", None], "food": ["food"]})
    with pytest.raises(tl.errors.DataError, match="scale"):
        tl.zero_shot_head(m, CLASSES, scale=0)
    image = tl.load_backbone("seed_vgg", backend="torch", input_shape=(8, 8, 3), seed=0)
    with pytest.raises(tl.errors.ArgumentTypeError, match="text model"):
        tl.zero_shot_head(image, CLASSES)


def test_few_shot_tools_take_token_batches_unchanged(encoders):
    m = encoders["keras"]
    texts = TEXTS + ["He kicked the ball into the net.", "The minister resigned on Friday.",
                     "Bake the bread for forty minutes."]
    y = np.array([0, 1, 2] * 3)
    x = tl.tokenize(m, texts)
    proto = tl.prototype_head(m, x, y)
    assert np.mean(tl.predict(proto, x).argmax(axis=1) == y) == 1.0
    probe = tl.linear_probe(m, x, y)
    assert np.mean(tl.predict(probe, x).argmax(axis=1) == y) == 1.0
    eps = tl.data.episodes((x, y), n_way=3, n_shot=1, n_query=2, n_episodes=4, seed=0)
    sx, sy, qx, qy = eps.arrays(0)
    assert set(sx) == {"input_ids", "attention_mask"} and len(sy) == 3 and len(qy) == 6
    result = tl.few_shot_eval(m, eps, "prototype", metric="cosine")
    assert result["episodes"] == 4 and result["accuracy"] >= 0.75
    ds = tl.data.texts(texts, y, model=m, batch_size=4)
    assert tl.data.episodes(ds, 3, 1, 2, n_episodes=2).x["input_ids"].shape[1] == x["input_ids"].shape[1]
