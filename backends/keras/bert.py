"""The portable BERT-family encoder on Keras: the mirror of backends/torch/bert.py, each weight
layer named by its transformers BertModel path, the same arithmetic in the same order."""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from .network import Mirror


@keras.saving.register_keras_serializable("tlbridge")
class TokenPositions(layers.Layer):
    """(position ids 0..L-1, token type ids 0) for (N, L) token ids: one segment."""

    def call(self, ids):
        zeros = ops.zeros_like(ids)
        return zeros + ops.arange(ops.shape(ids)[1], dtype=ids.dtype)[None, :], zeros


@keras.saving.register_keras_serializable("tlbridge")
class SelfAttention(layers.Layer):
    """softmax(q k^T / sqrt(d_head) + bias) v per head (backends/torch/bert.py
    BertSelfAttention); the bias is the dtype's most negative value at padded keys."""

    def __init__(self, heads, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.rate = int(heads), float(dropout)
        self.drop = layers.Dropout(self.rate, dtype=self.dtype_policy) if self.rate > 0 else None

    def _split(self, t):
        n, length = ops.shape(t)[0], ops.shape(t)[1]
        d = int(t.shape[-1]) // self.heads
        return ops.transpose(ops.reshape(t, (n, length, self.heads, d)), (0, 2, 1, 3))

    def call(self, q, k, v, mask, training=None):
        q, k, v = self._split(q), self._split(k), self._split(v)
        keep = ops.cast(mask, q.dtype)
        bias = ((1.0 - keep) * _most_negative(q.dtype))[:, None, None, :]
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(int(q.shape[-1]))
        probs = ops.softmax(scores + bias, axis=-1)
        if self.drop is not None:
            probs = self.drop(probs, training=training)
        out = ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3))
        width = self.heads * int(q.shape[-1])
        return ops.reshape(out, (ops.shape(out)[0], ops.shape(out)[1], width))

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "dropout": self.rate}


def _most_negative(dtype) -> float:
    import numpy as np
    return float(np.finfo(np.dtype(keras.backend.standardize_dtype(dtype))).min)


@keras.saving.register_keras_serializable("tlbridge")
class SentencePool(layers.Layer):
    """The sentence embedding: mean over the mask (sum / clamp(count, 1e-9), as
    sentence-transformers) or the [CLS] state; then optionally x / max(||x||, 1e-12)."""

    def __init__(self, pooling="mean", normalize=False, **kwargs):
        super().__init__(**kwargs)
        self.pooling, self.normalize = str(pooling), bool(normalize)

    def call(self, x, mask):
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            w = ops.expand_dims(ops.cast(mask, x.dtype), -1)
            pooled = ops.sum(x * w, axis=1) / ops.maximum(ops.sum(w, axis=1), 1e-9)
        if self.normalize:
            norm = ops.sqrt(ops.sum(ops.square(pooled), axis=-1, keepdims=True))
            pooled = pooled / ops.maximum(norm, 1e-12)
        return pooled

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling, "normalize": self.normalize}


def _dropout(mirror: Mirror, x, rate):
    return layers.Dropout(rate, dtype=mirror.dtype)(x) if rate > 0 else x


def _embeddings(mirror: Mirror, ids, o: dict):
    positions, types = TokenPositions(dtype=mirror.dtype)(ids)
    d = o["hidden_size"]
    word = mirror.embedding(ids, "embeddings.word_embeddings", o["vocab_size"], d)
    pos = mirror.embedding(positions, "embeddings.position_embeddings",
                           o["max_position_embeddings"], d)
    typ = mirror.embedding(types, "embeddings.token_type_embeddings", o["type_vocab_size"], d)
    x = mirror.add(mirror.add(word, typ), pos)
    x = mirror.layernorm(x, "embeddings.LayerNorm", o["layer_norm_eps"])
    return _dropout(mirror, x, o["dropout"])


def _dense_norm(mirror: Mirror, x, residual, prefix, o: dict):
    y = _dropout(mirror, mirror.dense(x, f"{prefix}.dense", o["hidden_size"]), o["dropout"])
    return mirror.layernorm(mirror.add(y, residual), f"{prefix}.LayerNorm", o["layer_norm_eps"])


def _layer(mirror: Mirror, x, mask, p: str, o: dict):
    d = o["hidden_size"]
    q = mirror.dense(x, f"{p}.attention.self.query", d)
    k = mirror.dense(x, f"{p}.attention.self.key", d)
    v = mirror.dense(x, f"{p}.attention.self.value", d)
    ctx = SelfAttention(o["num_attention_heads"], o["attention_dropout"], dtype=mirror.dtype)(
        q, k, v, mask)
    x = _dense_norm(mirror, ctx, x, f"{p}.attention.output", o)
    h = mirror.gelu(mirror.dense(x, f"{p}.intermediate.dense", o["intermediate_size"]))
    return _dense_norm(mirror, h, x, f"{p}.output", o)


def bert(mirror: Mirror, x, pretrained: bool, **options):
    """BertEncoder on {"input_ids", "attention_mask"} keras.Input: embeddings, the layers,
    the sentence pooling."""
    o = dict(options)
    h = _embeddings(mirror, x["input_ids"], o)
    for i in range(int(o["num_hidden_layers"])):
        h = _layer(mirror, h, x["attention_mask"], f"encoder.layer.{i}", o)
    return SentencePool(o["pooling"], o["normalize"], dtype=mirror.dtype)(h, x["attention_mask"])
