"""Generation between models that tokenize differently: text is the interface (README.md, *Your own models*).

A prompt arrives as text. Each model reads it with its own tokenizer (:func:`kvlingua.align.text_ends`). A
latent hand-off prefills the *source's* tokens, and the target's cache of the prompt (all its tokens but the
last, which is its first decode input, as in :func:`kvlingua.generate.handoff_generate`) is Σ read along the
token map: each of the target's positions reads the last source token that ends at or before it, and the
target computes its own sink. A text hand-off is the target reading its own tokens.

With one tokenizer (or a text hand-off) it hands over to :func:`kvlingua.generate.handoff_generate`, which
computes exactly what it did. Mixed generation across tokenizers (switching models mid-sequence) is
:mod:`kvlingua.crossmixed`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from kvlingua.align import text_ends, token_map
from kvlingua.cache import extract_prefix
from kvlingua.generate import (GenerationParams, GenerationResult, Handoff, HandoffError, _model, eos_ids,
                               handoff_generate, make_generator, model_cache, sample_tokens, translate_block)
from kvlingua.view import CacheView


def same_tokenizer(tokenizers: Mapping[str, object], a: str, b: str) -> bool:
    """Whether models ``a`` and ``b`` read text with one tokenizer (the same object, or equal vocabularies)."""
    ta, tb = tokenizers[a], tokenizers[b]
    return ta is tb or (ta.get_vocab() == tb.get_vocab() and type(ta) is type(tb))


def _tokenizer(tokenizers: Mapping[str, object], name: str):
    if name not in tokenizers or tokenizers[name] is None:
        raise HandoffError(f"model {name!r} has no tokenizer; text hand-offs need each model's")
    return tokenizers[name]


def handoff_text(models: dict[str, PreTrainedModel], space, source: str, target: str, text: str,
                 params: GenerationParams = GenerationParams(), handoff: Handoff = "latent",
                 tokenizers: Mapping[str, object] | None = None) -> GenerationResult:
    """``text`` read by ``source``, handed to ``target`` (through Σ, or as text), continued by ``target``.

    Args:
        models: pool name -> frozen causal LM.
        space: the shared space (``latent``).
        source, target: pool names.
        text: the prompt (non-empty).
        params: decoding parameters.
        handoff: ``latent`` or ``text``; ``identity`` only where both share a tokenizer.
        tokenizers: pool name -> that model's tokenizer.

    Returns:
        :class:`~kvlingua.generate.GenerationResult`; ``prompt_tokens`` and ``handoff_positions`` count the
        target's tokens, ``text`` is decoded by the target's tokenizer.
    """
    if not text:
        raise HandoffError("the prompt text is empty")
    tokenizers = tokenizers or {}
    tok_t = _tokenizer(tokenizers, target)
    tok_s = _tokenizer(tokenizers, source)
    tgt_ids, tgt_ends = text_ends(tok_t, text)
    if handoff != "latent" or same_tokenizer(tokenizers, source, target):
        if handoff == "identity" and not same_tokenizer(tokenizers, source, target):
            raise HandoffError(f"identity hand-off from {source!r} to {target!r}: they tokenize differently; use "
                               "handoff='latent' or 'text'")
        ids = tgt_ids if handoff == "text" else text_ends(tok_s, text)[0]
        return handoff_generate(models, space, source, target, ids, params, handoff=handoff, tokenizer=tok_t)
    if space is None:
        raise HandoffError("latent handoff needs a shared space; got space=None")
    src_model, tgt_model = _model(models, source, "source"), _model(models, target, "target")
    src_ids, src_ends = text_ends(tok_s, text)
    generator, seed = make_generator(params.seed, next(tgt_model.parameters()).device)
    k = CacheView.of(space.cfg).sink_tokens
    cached_ends = tgt_ends[:-1]  # the target's cache: every prompt token but its last
    n_src = max(k + 1, sum(1 for e in src_ends if e <= (cached_ends[-1] if cached_ends else src_ends[0])))
    n_src = min(n_src, len(src_ids))

    t0 = time.perf_counter()
    device = next(src_model.parameters()).device
    block = extract_prefix(src_model, torch.tensor([src_ids[:n_src]], device=device))  # [1, n_src, L_s, D_s]
    t1 = time.perf_counter()
    tgt_prompt = torch.tensor([tgt_ids], device=next(tgt_model.parameters()).device)  # [1, T]
    index = None
    if len(cached_ends) > k:
        index = token_map(torch.tensor([src_ends[k:n_src]]), torch.tensor([cached_ends[k:]]))  # [1, T-1-k]
    if index is None:  # nothing past the target's sink: it reads its cached positions itself
        block = extract_prefix(tgt_model, tgt_prompt[:, :len(cached_ends)]) if cached_ends else None
    else:
        block = translate_block(space, block, source, target, src_model, tgt_model, tgt_prompt, index=index)
    t2 = time.perf_counter()
    cache = model_cache(tgt_model, block)
    stops = eos_ids(tgt_model, tok_t)
    tokens = list(sample_tokens(tgt_model, cache, tgt_ids[-1], params, generator, stop_ids=stops))
    t3 = time.perf_counter()
    finished = "eos" if params.stop_at_eos and tokens and tokens[-1] in stops else "length"
    return GenerationResult(
        tokens=tokens, source=source, target=target, handoff=handoff, prompt_tokens=len(tgt_ids),
        handoff_positions=len(cached_ends), prefill_s=t1 - t0, translate_s=t2 - t1, decode_s=t3 - t2,
        finish_reason=finished, seed=seed, text=tok_t.decode(tokens, skip_special_tokens=True),
    )


def continuations(pool, source: str, target: str, n: int = 3, prompt_tokens: int = 48, max_new_tokens: int = 32,
                  data=None, split: str = "test") -> list[dict]:
    """Greedy continuations of ``n`` held-out passages by ``target``: after ``source``'s cache through Σ
    (``latent``) and after re-reading the text (``text``), each from the passage's first ``prompt_tokens`` tokens as
    ``source`` reads it.

    Args:
        pool: a :class:`~kvlingua.pool.LoadedPool` with its models.
        data: the :class:`~kvlingua.data.views.DataConfig` of the passages (default the English bible).

    Returns:
        ``[{"prompt": text, "latent": text, "text": text}, ...]``.
    """
    from kvlingua.data.views import DataConfig, documents

    tok = pool.tokenizers.get(source, pool.tokenizer)
    docs = [d for d in documents(data or DataConfig(view="en"), split) if len(tok.encode(d)) > prompt_tokens]
    params = GenerationParams(max_new_tokens=max_new_tokens)
    rows = []
    for doc in docs[:: max(1, len(docs) // n)][:n]:
        ids = tok.encode(doc, add_special_tokens=False)[:prompt_tokens]
        row = {"prompt": tok.decode(ids)}
        for mode in ("latent", "text"):
            if pool.mixed_tokenizers:  # text is the interface: each model reads the prompt with its own tokenizer
                res = handoff_text(pool.models, pool.space, source, target, row["prompt"], params, handoff=mode,
                                   tokenizers=pool.tokenizers)
            else:
                res = handoff_generate(pool.models, pool.space, source, target, ids, params, handoff=mode,
                                       tokenizer=tok)
            row[mode] = res.text
        rows.append(row)
    return rows
