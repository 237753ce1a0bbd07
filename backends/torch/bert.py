"""The portable BERT-family encoder on PyTorch (tlbridge/zoo.py "bert", "minilm_l6").

Module names are transformers' BertModel state_dict names (embeddings.word_embeddings,
encoder.layer.N.attention.self.query, ...), so a BERT checkpoint loads unchanged; the pooler is
left out (sentence embeddings pool the last hidden states). Its twin is backends/keras/bert.py;
both follow tlbridge/bert.py's arithmetic step for step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, type_vocab_size, eps,
                 dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):
        """(word + token type 0) + position, as transformers adds them; one segment."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden_size, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def _split(self, t):
        n, length, d = t.shape
        return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, bias):
        """softmax(q k^T / sqrt(d_head) + bias) v per head; `bias` is 0 at real keys and the
        dtype's most negative value at padding, so padded keys get a weight of exactly 0."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        probs = F.dropout(probs, self.dropout, self.training)
        n, _, length, _ = q.shape
        return (probs @ v).transpose(1, 2).reshape(n, length, -1)


class _DenseNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BertSelfOutput and BertOutput."""

    def __init__(self, fan_in, hidden_size, eps, dropout):
        super().__init__()
        self.dense = nn.Linear(fan_in, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden_size, heads, eps, dropout, attention_dropout):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, heads, attention_dropout)
        self.output = _DenseNorm(hidden_size, hidden_size, eps, dropout)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()     # transformers' "gelu": the exact erf form

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden_size, heads, intermediate_size, eps, dropout, attention_dropout):
        super().__init__()
        self.attention = BertAttention(hidden_size, heads, eps, dropout, attention_dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = _DenseNorm(intermediate_size, hidden_size, eps, dropout)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class BertStack(nn.Module):
    def __init__(self, n, *args):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(*args) for _ in range(n))

    def forward(self, x, bias):
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertEncoder(nn.Module):
    """BertModel without its pooler, then the sentence embedding: the mean of the last hidden
    states over the attention mask (sentence-transformers' pooling) or the [CLS] state; L2
    normalised when `normalize` (sentence-transformers' Normalize module). Takes
    {"input_ids", "attention_mask"} (N, L) int64."""

    def __init__(self, vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                 type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pooling="mean",
                 normalize=False, dropout=0.0, attention_dropout=0.0, tokenizer=None):
        super().__init__()
        self.pooling, self.normalize = pooling, bool(normalize)
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings,
                                         type_vocab_size, layer_norm_eps, dropout)
        self.encoder = BertStack(num_hidden_layers, hidden_size, num_attention_heads,
                                 intermediate_size, layer_norm_eps, dropout, attention_dropout)

    def forward(self, inputs: dict):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        x = self.embeddings(ids)
        keep = mask.to(x.dtype)
        bias = ((1.0 - keep) * torch.finfo(x.dtype).min)[:, None, None, :]
        x = self.encoder(x, bias)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            weights = keep.unsqueeze(-1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1, eps=1e-12) if self.normalize else pooled


def build(pretrained: bool, **options) -> BertEncoder:
    """Weights come from tlbridge (seeded init, or a BERT directory); `pretrained` is unused."""
    return BertEncoder(**options)
