"""The Gemma-2 size ladder of the pool: the paper's 100M/200M/400M ladder at CPU scale.

The paper (Table 3) keeps the width fixed and grows depth 1x/2x/4x (4, 8, 16 layers);
every size uses GQA with one KV head, GeGLU, Gemma-2 pre+post norms and tied
embeddings. The CPU ladder here does the same at a width chosen by measurement so the
quickstart pool pre-trains in a few minutes on 2 cores (docs/results/pretraining.md).
Gemma-2 alternates sliding-window and full-attention layers; the window is smaller
than the training sequence so the alternation matters.

A size is named by what it is: ``<non-embedding parameters>-l<layers>-d<width>``
(``1.9m-l2-d256``: 1,902,848 non-embedding parameters, 2 layers, hidden 256); the
embedding adds ``vocab_size * width`` (tied). The ladder was once named ``cpu-100m``/
``cpu-200m``/``cpu-400m`` after the paper's sizes it stands in for; docs/results/ keep those names.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import Gemma2Config


@dataclass(frozen=True)
class Size:
    """One rung of the ladder (everything but the vocabulary)."""

    hidden_size: int
    """Residual stream width (d_model)."""
    num_hidden_layers: int
    """Decoder layers (alternating sliding-window / full attention)."""
    num_attention_heads: int
    """Query heads."""
    head_dim: int
    """Width of one head (query/key/value)."""
    intermediate_size: int
    """GeGLU feed-forward width."""
    sliding_window: int
    """Window of the sliding-window layers, in tokens (smaller than the training sequence)."""
    max_position_embeddings: int = 1024
    """Longest position the rotary embedding is set up for."""


# Width 256, 4 heads of 64, MLP 4x width; depth 2/4/8 mirrors the paper's 4/8/16 (1x/2x/4x).
# Non-embedding parameters (param_counts): 1,902,848 / 3,805,440 / 7,610,624.
SIZES: dict[str, Size] = {
    "1.9m-l2-d256": Size(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=64,
                         intermediate_size=1024, sliding_window=64),
    "3.8m-l4-d256": Size(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
                         intermediate_size=1024, sliding_window=64),
    "7.6m-l8-d256": Size(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64,
                         intermediate_size=1024, sliding_window=64),
    "test": Size(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                 intermediate_size=64, sliding_window=8, max_position_embeddings=256),
}


def gemma2_config(size: str, vocab_size: int, **overrides) -> Gemma2Config:
    """A ``Gemma2Config`` for the named ``size`` (a key of :data:`SIZES`, e.g. ``1.9m-l2-d256`` or ``test``).

    One KV head (GQA), GeGLU (``gelu_pytorch_tanh``), pre+post norms, tied embeddings,
    eager attention and ``query_pre_attn_scalar = head_dim``. The final logit soft-cap is
    off: at these sizes its tanh over the ``[B, T, V]`` logits costs about 15% of a
    training step (attention logits keep Gemma-2's cap). ``overrides`` replace any
    ``Gemma2Config`` field (e.g. ``num_hidden_layers=3``).
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes are {sorted(SIZES)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    s = SIZES[size]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=1,
        head_dim=s.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=s.head_dim,
        sliding_window=s.sliding_window,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_cache=True,
        final_logit_softcapping=None,
    )
    fields.update(overrides)
    cfg = Gemma2Config(**fields)
    cfg._attn_implementation = "eager"
    return cfg


def step_cost(size: str, vocab_size: int, tokens: int) -> float:
    """Rough multiply-adds of one training step over ``tokens`` tokens (``batch * seq_len``).

    Per token: the decoder layers' weights (attention projections with one KV head, GeGLU MLP) plus
    the tied output layer (``vocab_size * hidden``, most of a step at width 256). Only its ratios
    matter: the pool scheduler starts the costliest members first.
    """
    s = SIZES[size]
    attn = s.hidden_size * s.head_dim * (2 * s.num_attention_heads + 2)  # q, o: heads; k, v: one KV head
    mlp = 3 * s.hidden_size * s.intermediate_size
    return float(tokens) * (s.num_hidden_layers * (attn + mlp) + vocab_size * s.hidden_size)


def param_counts(model) -> dict[str, int]:
    """``{"embedding": ..., "non_embedding": ..., "total": ...}`` (tied weights counted once)."""
    seen: set[int] = set()
    emb = non_emb = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name or "lm_head" in name:
            emb += p.numel()
        else:
            non_emb += p.numel()
    return {"embedding": emb, "non_embedding": non_emb, "total": emb + non_emb}
