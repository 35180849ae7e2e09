"""Cross-model generation: a source model reads the prompt, a target model writes the answer.

The source model prefills the prompt into its KV block; the block is handed to the
target model, which decodes token by token from it. Three hand-off modes:

* ``latent``: the source block goes through the shared space Σ
  (``space.translate(block, source, target)``, i.e. ``OUT_target(IN_source(block))``);
* ``text``: the baseline: the target re-reads the prompt itself (no source work);
* ``identity``: the raw source block, legal only when both models have the same cache layout.

Positions. A block of ``P - 1`` positions covers ``prompt[:-1]``; the last prompt token is
the first decode input, so the target's first logits predict token ``P`` exactly as they
would after reading the whole prompt. With greedy decoding the ``text`` hand-off therefore
reproduces the target's own ``model.generate(do_sample=False)``.

:func:`kvlingua.mixed.mixed_generate` switches models mid-sequence (the paper's mixed language
modelling) with the building blocks of this module. Every request builds its own caches and its
own ``torch.Generator``; nothing is shared between requests.

Shapes: ``[1, P]`` prompt ids; KV blocks ``[1, S, L, D]``. Generation runs one sequence
at a time (batch size 1).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Protocol, Sequence

import torch
from torch import Tensor
from transformers import Cache, DynamicCache, PreTrainedModel

from kvlingua.refresh import refresh_cache
from kvlingua.view import CacheView, model_rotation, translate_cache
from kvlingua.cache import (
    KVBlock,
    append_block,
    arch_summary,
    cache_kwargs,
    check_block_fits,
    check_same_layout,
    extract_prefix,
    sink_block,
)

if TYPE_CHECKING:
    from kvlingua.space import LatentBlock
    from kvlingua.space_config import SpaceConfig

Handoff = Literal["latent", "text", "identity"]
HANDOFFS: tuple[str, ...] = ("latent", "text", "identity")


class HandoffError(ValueError):
    """A hand-off cannot be done (unknown model, identity between different cache layouts, ...)."""


class Translator(Protocol):
    """What generation needs from a shared space (``kvlingua.space.SharedSpace`` satisfies it)."""

    cfg: SpaceConfig
    """Its ``sink_tokens`` and ``keys`` say how a cache is read and written (:class:`~kvlingua.view.CacheView`)."""

    def encode(self, block: KVBlock, source: str) -> LatentBlock:
        """``[B, S, L_s, D_s]`` block of ``source`` -> Σ ``[B, S, Q]``."""

    def decode(self, latent: LatentBlock, target: str, ids: Tensor | None = None) -> KVBlock:
        """Σ ``[B, S, Q]`` -> ``[B, S, L_t, D_t]`` block for ``target`` (``ids`` ``[B, S]``: its own tokens there, for
        a token prior; :mod:`kvlingua.prior`)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to pick new tokens."""

    max_new_tokens: int = 32
    """Tokens to generate at most (stops earlier at an end-of-sequence token)."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    seed: int | None = None
    """Seed of the request's own random generator (None: a fresh random seed). Same seed, same tokens."""
    stop_at_eos: bool = True
    """Stop after the target emits one of its end-of-sequence tokens (the token is kept in the output)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    """Output of one generation request (token ids exclude the prompt)."""

    tokens: list[int]
    source: str | None
    target: str
    handoff: str
    prompt_tokens: int
    handoff_positions: int
    """Positions in the handed-over cache (``prompt_tokens - 1``; 0 for a one-token prompt)."""
    prefill_s: float
    translate_s: float
    decode_s: float
    finish_reason: str
    """``"eos"`` or ``"length"``."""
    seed: int
    text: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.translate_s + self.decode_s


# ---------------------------------------------------------------- building blocks


def as_prompt(prompt_ids: Tensor | Sequence[int]) -> Tensor:
    """Prompt ids as a ``[1, P]`` LongTensor; refuses empty prompts and batches."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # [1, P]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be [P] or [1, P] (one sequence), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty; generation needs at least one prompt token")
    return ids


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> tuple[torch.Generator, int]:
    """A fresh per-request generator; returns it with the seed used (drawn at random for None)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, seed


def eos_ids(model: PreTrainedModel, tokenizer=None) -> set[int]:
    """End-of-sequence ids of ``model``'s generation config (plus the tokenizer's, if given)."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else list(eos))
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return ids


def next_token(logits: Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """Pick one token from ``[V]`` logits: argmax when greedy, else temperature + top-p sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # [V]
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # the top token always stays
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    pick = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return int(pick)


def extend_cache(model: PreTrainedModel, cache: Cache, block: KVBlock | None) -> Cache:
    """Append ``block`` (``[1, S, L, D]``, checked against ``model``, cast to its device and dtype) to ``cache``."""
    if block is None or block.seq_len == 0:
        return cache
    check_block_fits(block, arch_summary(model))
    p = next(model.parameters())
    return append_block(cache, block.to(p.device, p.dtype))


def model_cache(model: PreTrainedModel, block: KVBlock | None) -> DynamicCache:
    """A fresh cache for ``model`` holding ``block`` (cast to the model's device and dtype)."""
    return extend_cache(model, DynamicCache(), block)


@torch.no_grad()
def sample_tokens(model: PreTrainedModel, cache: Cache, first_input: int, params: GenerationParams,
                  generator: torch.Generator, max_new_tokens: int | None = None,
                  stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` sampled tokens, feeding ``first_input`` first and then each new token.

    ``cache`` (mutated in place) holds the positions before ``first_input``. When the
    iterator finishes, ``cache`` covers every fed token: the prompt and all yielded
    tokens except the last one, which has not been read yet.
    """
    device = next(model.parameters()).device
    limit = params.max_new_tokens if max_new_tokens is None else max_new_tokens
    token = first_input
    for step in range(limit):
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache_kwargs(model, cache))
        token = next_token(out.logits[0, -1], params, generator)  # logits [1, 1, V]
        yield token
        if params.stop_at_eos and token in stop_ids:
            return


def prefill(model: PreTrainedModel, prompt: Tensor) -> KVBlock:
    """Block of ``prompt[:, :-1]`` (``[1, P-1, L, D]``); empty for a one-token prompt."""
    device = next(model.parameters()).device
    head = prompt[:, :-1].to(device)  # [1, P-1]
    if head.shape[1] == 0:
        s = arch_summary(model)
        p = next(model.parameters())
        empty = torch.zeros(1, 0, s.num_layers, s.width, dtype=p.dtype, device=p.device)  # [1, 0, L, D]
        return KVBlock(empty, empty.clone(), s.n_kv_heads)
    return extract_prefix(model, head)


def _space_dtype(space: object) -> torch.dtype:
    params = getattr(space, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.dtype if first is not None else torch.float32


@torch.no_grad()
def translate_block(space: Translator, block: KVBlock, source: str, target: str, source_model: PreTrainedModel,
                    target_model: PreTrainedModel, ids: Tensor, start: int = 0, index: Tensor | None = None) -> KVBlock:
    """``source``'s block of positions ``start ..`` -> ``target``'s block of them, through Σ.

    The space's :class:`~kvlingua.view.CacheView` applies: at ``start == 0`` the target reads its own first
    ``sink_tokens`` tokens (``ids[:, :k]``, its attention sink) and Σ carries the positions after them;
    keys are un-rotated at the source's positions and rotated at the target's; with ``refresh`` the target then
    recomputes that share of the positions after its sink (:mod:`kvlingua.refresh`; a prefix only, ``start ==
    0``: a continued segment is read as translated). A block no longer than the sink is read by the target itself.

    Args:
        block: ``[1, S, L_s, D_s]`` the source's own cache of those positions.
        ids: ``[1, >= start + S]`` the sequence's token ids as the *target* reads them (the sink's tokens are
            read from it).
        start: absolute position of the block's first position.
        index: where the two tokenize differently (at ``start == 0``), ``[1, T-k]``: the source position after its
            sink that each of the target's ``T`` positions after its sink reads (:func:`kvlingua.align.token_map`).

    Returns:
        ``[1, S (T with index), L_t, D_t]``, checked against the target's layout.
    """
    summary = arch_summary(target_model)
    view = CacheView.of(space.cfg)
    k = view.sink(start)
    length = block.seq_len if index is None else index.shape[1] + k  # positions of the result
    if length <= k:  # nothing past the sink: the target reads these positions itself
        if length == 0:
            empty = torch.zeros(1, 0, summary.num_layers, summary.width)  # [1, 0, L_t, D_t]
            return KVBlock(empty, empty.clone(), summary.n_kv_heads)
        return extract_prefix(target_model, ids[:, :length])
    rot_s, rot_t = (model_rotation(source_model), model_rotation(target_model)) if view.unrotate else (None, None)
    sink = sink_block(target_model, ids[:, :k]) if k else None  # [1, k, L_t, D_t]
    body_ids = ids[:, start + k:start + length]  # [1, S|T - k] the target's tokens Σ decodes (its readout and prior read them)
    if hasattr(space, "bind_tokens"):
        space.bind_tokens({target: target_model}, replace=False)
    out = translate_cache(space, block, source, target, rot_s, rot_t, sink, start, view, index,
                          body_ids)  # [1, S|T, L_t, D_t]
    if view.refresh and start == 0:  # probe: the token the target reads next (the block's last where none follows)
        probe = ids[:, length:length + 1] if ids.shape[1] > length else ids[:, length - 1:length]  # [1, 1]
        out = refresh_cache(target_model, out, ids, probe, view.refresh, k)
    check_block_fits(out, summary, f"target {target!r}")
    return out


def check_identity(source_summary, target_summary, source: str, target: str) -> None:
    """Raise :class:`HandoffError` unless both cache layouts are equal (identity hand-off)."""
    try:
        check_same_layout(source_summary, target_summary, repr(source), repr(target), "identity handoff")
    except ValueError as e:
        raise HandoffError(f"{e}; use handoff='latent' or 'text'") from None


def _model(models: dict[str, PreTrainedModel], name: str, role: str) -> PreTrainedModel:
    if name not in models:
        raise HandoffError(f"unknown {role} model {name!r}; the pool has {sorted(models)}")
    return models[name]


def _decode_text(tokenizer, tokens: list[int]) -> str | None:
    return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None


# ---------------------------------------------------------------- requests


def handoff_generate(models: dict[str, PreTrainedModel], space: Translator | None, source: str, target: str,
                     prompt_ids: Tensor | Sequence[int], params: GenerationParams = GenerationParams(),
                     handoff: Handoff = "latent", tokenizer=None) -> GenerationResult:
    """Prefill ``prompt_ids`` on ``source``, hand the cache to ``target``, decode on ``target``.

    Args:
        models: pool name -> frozen causal LM.
        space: shared space used by ``latent`` hand-off (may be None for ``text``/``identity``).
        source, target: pool names (may be equal: a cyclic path for ``latent``).
        prompt_ids: ``[P]`` or ``[1, P]`` token ids, P >= 1.
        params: decoding parameters; greedy when ``temperature == 0``.
        handoff: ``latent`` (through Σ), ``text`` (target re-reads the prompt), ``identity``.
        tokenizer: optional; adds its EOS id to the stop set and decodes ``text``.

    Returns:
        :class:`GenerationResult` with the new tokens, timings (prefill, translate, decode)
        and token counts.
    """
    if handoff not in HANDOFFS:
        raise HandoffError(f"unknown handoff {handoff!r}; choose one of {list(HANDOFFS)}")
    src_model, tgt_model = _model(models, source, "source"), _model(models, target, "target")
    prompt = as_prompt(prompt_ids)  # [1, P]
    if handoff == "identity":
        check_identity(arch_summary(src_model), arch_summary(tgt_model), source, target)
    if handoff == "latent" and space is None:
        raise HandoffError("latent handoff needs a shared space; got space=None")
    generator, seed = make_generator(params.seed, next(tgt_model.parameters()).device)

    t0 = time.perf_counter()
    block = prefill(tgt_model if handoff == "text" else src_model, prompt)  # [1, P-1, L, D]
    t1 = time.perf_counter()
    if handoff == "latent":
        block = translate_block(space, block, source, target, src_model, tgt_model, prompt)
    t2 = time.perf_counter()
    cache = model_cache(tgt_model, block)
    tokens = list(sample_tokens(tgt_model, cache, int(prompt[0, -1]), params, generator,
                                stop_ids=eos_ids(tgt_model, tokenizer)))
    t3 = time.perf_counter()
    finished = "eos" if params.stop_at_eos and tokens and tokens[-1] in eos_ids(tgt_model, tokenizer) else "length"
    return GenerationResult(
        tokens=tokens, source=source, target=target, handoff=handoff, prompt_tokens=prompt.shape[1],
        handoff_positions=prompt.shape[1] - 1, prefill_s=t1 - t0, translate_s=t2 - t1, decode_s=t3 - t2,
        finish_reason=finished, seed=seed, text=_decode_text(tokenizer, tokens),
    )
