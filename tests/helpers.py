"""Tiny random causal LMs built from configs (no downloads), shared by the tests."""
from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvlingua.models import freeze

VOCAB = 128


def tiny_model(kind: str = "gemma2", seed: int = 0, layers: int = 2, hidden: int = 32, kv_heads: int = 1,
               heads: int = 4, head_dim: int = 8, vocab: int = VOCAB, sliding_window: int = 4):
    """A frozen tiny causal LM of architecture ``kind`` (gemma2, llama, qwen2, mistral)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=256)
    if kind == "gemma2":
        cfg = Gemma2Config(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window)
        cls = Gemma2ForCausalLM
    elif kind == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = MistralConfig(**common, sliding_window=sliding_window), MistralForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    return freeze(cls(cfg))
