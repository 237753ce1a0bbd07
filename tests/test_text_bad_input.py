"""Bad input to the text encoder, its tokenizer and tl.data.texts (docs/bad-input.md, text rows):
each is refused with a tlbridge error that names the problem, and nothing changes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import tlbridge as tl
from tlbridge import bert, errors


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A small BERT (random weights) whose directory holds the packaged tokenizer files."""
    folder = tmp_path_factory.mktemp("bert_small")
    m = tl.load_backbone("bert", backend="torch", seed=0, hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, max_position_embeddings=16)
    m = tl.replace_head(m, 1, seed=0)
    (folder / "config.json").write_text(
        '{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 16}')
    tl.weights.save_file(str(folder / "model.safetensors"),
                         {k[len("backbone."):]: v for k, v in tl.get_weights(m).items()
                          if k.startswith("backbone.")}, {})
    shutil.copy(bert.packaged_dir("minilm_l6") / "tokenizer.json", folder / "tokenizer.json")
    return tl.replace_head(tl.load_backbone("bert", weights=folder, backend="torch"), 1, seed=0), folder


@pytest.mark.parametrize("texts, phrase", [
    (["fine", None], "item 1 is NoneType"), (["fine", 3.5], "item 1 is float"),
    ([b"bytes"], r"item 0 is bytes .*decode"), ([], "at least one text"),
    ("one string", r"Wrap a single text in a list"), (42, "received int")])
def test_texts_that_are_not_a_list_of_strings(text_model, texts, phrase):
    m, _ = text_model
    with pytest.raises(errors.DataError, match=phrase):
        tl.tokenize(m, texts)
    with pytest.raises(errors.DataError, match=phrase):
        tl.data.texts(texts, np.zeros(2), model=m)


def test_labels_of_another_length(text_model):
    with pytest.raises(errors.ShapeError, match="received 2 sample.* but 3 label row"):
        tl.data.texts(["a", "b"], np.zeros(3), model=text_model[0])


def test_max_length_above_the_position_table(text_model):
    m, _ = text_model
    with pytest.raises(errors.DataError, match="max_length <= 16 .* received max_length=17"):
        tl.tokenize(m, ["a"], max_length=17)
    with pytest.raises(errors.ShapeError, match="L <= 16"):
        tl.load_backbone("bert", backend="torch", input_shape=(17,), max_position_embeddings=16,
                         hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    long = {"input_ids": np.ones((1, 17), np.int64), "attention_mask": np.ones((1, 17), np.int64)}
    before = tl.get_weights(m)
    with pytest.raises(errors.ShapeError, match="at most 16 positions"):
        tl.fine_tune(m, (long, np.ones(1)), epochs=1, progress=False)
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_missing_tokenizer_file_is_named(text_model, tmp_path):
    _, folder = text_model
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    m = tl.load_backbone("bert", weights=bare, backend="torch")
    with pytest.raises(errors.CheckpointError, match=r"tokenizer.json or vocab.txt in .*no_tokenizer"):
        tl.tokenize(m, ["a"])
    with pytest.raises(errors.CheckpointError, match="no config.json"):
        tl.load_backbone("bert", weights=tmp_path, backend="torch")
    random = tl.load_backbone("bert", backend="torch", seed=0, hidden_size=8,
                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(errors.CheckpointError, match="built without one"):
        tl.tokenize(random, ["a"])


def test_image_calls_on_a_text_model_and_tokens_on_an_image_model(text_model):
    m, _ = text_model
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(errors.ArgumentTypeError, match="text model 'bert'.*tl.tokenize"):
        tl.preprocess(m, images)
    with pytest.raises(errors.DataError, match="dict of the model's inputs"):
        tl.features(m, images.astype(np.float32))
    vgg = tl.load_backbone("seed_vgg", backend="torch", input_shape=(8, 8, 3), seed=0)
    tokens = tl.tokenize(m, ["a text"])
    with pytest.raises(errors.DataError, match="dict with the one input 'images'"):
        tl.features(vgg, tokens)
    with pytest.raises(errors.ArgumentTypeError, match="text model"):
        tl.tokenize(vgg, ["a text"])
    with pytest.raises(errors.CheckpointError, match="weights='imagenet'"):
        tl.load_backbone("minilm_l6", backend="torch", weights="imagenet")
