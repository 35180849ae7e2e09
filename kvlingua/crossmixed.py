"""Mixed generation between models that tokenize differently: the schedule switches models, text is the interface.

:func:`kvlingua.generate.mixed_generate` switches models mid-sequence when they share one tokenizer: every
position is one token for every model. Across tokenizers a position is not: at each switch the model taking
over **re-tokenizes the text so far** with its own tokenizer, keeps the part of its cache whose tokens are still
the same, and fills every position after it, position by position in its own tokens:

* a position whose last character was written by another model (the *owner* of that character: the first
  model owns the prompt) reads Σ of the owner's own cache along the token map (:func:`kvlingua.align.token_map`):
  the last token the owner computed itself that ends at or before the position's last character, keys
  un-rotated at the owner's positions and rotated at the reader's. Only positions the owner computed itself
  are ever read (never a translated one), so every path run is a trained one, owner -> reader;
* its own sink positions, positions whose last character it wrote itself, and positions that no token of the
  owner has ended before yet (the owner's token covering them is its pending one, never cached), it reads
  itself, a plain forward over its own tokens.

The reader then feeds its last token (the text's end as it tokenizes it) and samples its segment. Generated
tokens' characters are measured by decoding them after the tokens before them. Tokens are ids in each
writer's own vocabulary, so :attr:`~kvlingua.generate.MixedResult.text` (the concatenated text of every
segment) is what to read; ``tokens`` come with ``models``, which says whose vocabulary each id is in.

Where every model of the schedule shares one tokenizer this is :func:`~kvlingua.generate.mixed_generate` on
its tokens, exactly. Shapes: every cache and block is one sequence, ``[1, S, L, D]``.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from kvlingua.align import NO_CHARS, gather_positions, read_along, text_ends, token_map
from kvlingua.cache import arch_summary, block_from_cache, cache_kwargs
from kvlingua.crosstext import _tokenizer, same_tokenizer
from kvlingua.generate import (GenerationParams, HandoffError, MixedResult, Switch, Translator, check_schedule,
                               eos_ids, extend_cache, make_generator, mixed_generate, sample_tokens)
from kvlingua.view import CacheView, model_rotation

DECODE_CONTEXT = 16
"""Tokens before a generated run that its characters are measured after (enough for any tokenizer's merge of a
leading space or a character split over several byte tokens)."""


@dataclass
class _Reader:
    """One model's cache in a mixed schedule, in its own tokens."""

    cache: DynamicCache = field(default_factory=DynamicCache)
    ids: list[int] = field(default_factory=list)
    """The token of each cached position."""
    ends: list[int] = field(default_factory=list)
    """Where each cached token's characters end in the text (:data:`NO_CHARS` for a leading special token)."""
    native: list[bool] = field(default_factory=list)
    """Whether the model computed the position itself (False: translated into its cache)."""

    def keep(self, n: int) -> None:
        """Keep the first ``n`` cached positions."""
        if n < len(self.ids):
            self.cache.crop(n - len(self.ids))  # transformers 5.x: a negative count of positions to drop
            del self.ids[n:], self.ends[n:], self.native[n:]


def _absolute(ends: list[int], length: int) -> list[int]:
    """Ends relative to the text's end (:func:`~kvlingua.align.text_ends`) -> character counts from its start."""
    return [e if e == NO_CHARS else e + length for e in ends]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _written(tokenizer, before: list[int], new: list[int], length: int) -> tuple[str, list[int]]:
    """The text ``new`` adds after ``before`` (a text of ``length`` characters) and each new token's character end.

    Each end is the length the text has once the token is decoded after up to :data:`DECODE_CONTEXT` tokens before
    it; a token that ends inside a character (a byte of a multi-byte one) ends where the last whole character did.
    """
    ctx = before[-DECODE_CONTEXT:]
    base = tokenizer.decode(ctx, skip_special_tokens=True)
    whole = tokenizer.decode(ctx + new, skip_special_tokens=True)
    added = whole[len(base):] if whole.startswith(base) else tokenizer.decode(new, skip_special_tokens=True)
    ends, top = [], length
    for i in range(len(new)):
        part = tokenizer.decode(ctx + new[:i + 1], skip_special_tokens=True).rstrip("\ufffd")
        top = max(top, min(length + len(part) - len(base), length + len(added)))
        ends.append(top)
    return added, ends


@torch.no_grad()
def _read_itself(model: PreTrainedModel, reader: _Reader, ids: list[int], ends: list[int]) -> None:
    """``model`` reads ``ids`` after its cache (a plain forward), appending them as its own positions."""
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([ids], device=device), use_cache=True, **cache_kwargs(model, reader.cache))
    reader.ids += ids
    reader.ends += ends
    reader.native += [True] * len(ids)


def _candidates(src: _Reader, owners: list[str], owner: str, k: int) -> list[int]:
    """The owner's cached positions Σ may read: after its sink, computed by itself, ending in text it wrote."""
    return [i for i in range(k, len(src.ids)) if src.native[i] and src.ends[i] > 0 and owners[src.ends[i] - 1] == owner]


@torch.no_grad()
def _read_through(space: Translator, models: Mapping[str, PreTrainedModel], owner: str, name: str,
                  src: _Reader, run: list[int], picks: list[int], reader: _Reader, ids: list[int],
                  ends: list[int]) -> None:
    """``name`` reads ``ids`` (ends ``ends``, its next positions) through Σ, each from the owner's own cached
    position ``picks[t]``: the owner's positions ``run`` (its candidates up to the last pick) are encoded in
    order, as a hand-off encodes a source's whole prefix, and read along the picks."""
    view = CacheView.of(space.cfg)
    start = len(reader.ids)  # the reader's absolute position of the first one
    full = block_from_cache(src.cache, arch_summary(models[owner]).n_kv_heads)  # [1, S_o, L_o, D_o]
    if view.unrotate:  # keys at the owner's own positions 0 .. S_o-1 -> position-free
        full = model_rotation(models[owner]).unrotate(full, start=0)
    at = torch.tensor([run])  # [1, R]
    dtype = next(space.parameters()).dtype
    body = full.map(lambda t: gather_positions(t, at).to(dtype))  # [1, R, L_o, D_o]
    where = {p: r for r, p in enumerate(run)}
    index = torch.tensor([[where[p] for p in picks]])  # [1, n] into the run
    out = space.decode(read_along(space.encode(body, owner), index), name)  # [1, n, L_r, D_r]
    if view.unrotate:
        out = model_rotation(models[name]).rotate(out, start=start)
    extend_cache(models[name], reader.cache, out)
    reader.ids += ids
    reader.ends += ends
    reader.native += [False] * len(ids)


def _sources(readers: Mapping[str, _Reader], owners: list[str], name: str, k: int, ends: list[int],
             first: int, last: int) -> tuple[list[tuple[str | None, int]], dict[str, list[int]]]:
    """For each of ``name``'s positions ``first .. last-1``: ``(owner, owner's position)`` it reads through Σ, or
    ``(None, -1)`` where it reads the position itself; and each owner's :func:`_candidates`."""
    out: list[tuple[str | None, int]] = []
    cands: dict[str, list[int]] = {}
    for t in range(first, last):
        e = ends[t]
        owner = owners[e - 1] if t >= k and e > 0 else name
        pick = -1
        if owner != name and owner in readers:  # the owner's last own token ending at or before e
            if owner not in cands:
                cands[owner] = _candidates(readers[owner], owners, owner, k)
            cand = cands[owner]
            if cand:
                src_ends = readers[owner].ends
                i = int(token_map(torch.tensor([[src_ends[c] for c in cand]]), torch.tensor([[e]]))[0, 0])
                pick = cand[i] if src_ends[cand[i]] <= e else -1
        out.append((owner, pick) if pick >= 0 else (None, -1))
    return out, cands


def mixed_text(models: dict[str, PreTrainedModel], space: Translator, text: str,
               schedule: Sequence[tuple[str, int]], params: GenerationParams = GenerationParams(),
               tokenizers: Mapping[str, object] | None = None) -> MixedResult:
    """Generate from ``text`` with a model schedule ``[(model, max_new_tokens), ...]`` across tokenizers.

    Args:
        models: pool name -> frozen causal LM.
        space: the shared space (its view says the sink each reader keeps and whether keys travel un-rotated).
        text: the prompt (non-empty).
        schedule: segments in order; ``params.max_new_tokens`` is ignored.
        params: decoding parameters; one request-wide generator draws every sample.
        tokenizers: pool name -> that model's tokenizer (each model of the schedule needs one).

    Returns:
        :class:`~kvlingua.generate.MixedResult`: ``tokens`` (each in its writer's vocabulary, ``models`` says
        whose), ``text`` (what the segments wrote), one :class:`~kvlingua.generate.Switch` per run of positions a
        reader read through Σ (``start``/``end`` in the reader's positions), ``prompt_tokens`` in the first model's
        tokens.
    """
    if not text:
        raise HandoffError("the prompt text is empty")
    check_schedule(models, schedule)
    tokenizers = tokenizers or {}
    names = [n for n, _ in schedule]
    toks = {n: _tokenizer(tokenizers, n) for n in names}
    if all(same_tokenizer(toks, names[0], n) for n in names):  # one tokenizer: every position is one token
        ids = text_ends(toks[names[0]], text)[0]
        return mixed_generate(models, space, ids, schedule, params, tokenizer=toks[names[0]])
    k = CacheView.of(space.cfg).sink_tokens
    first = models[names[0]]
    generator, seed = make_generator(params.seed, next(first.parameters()).device)
    readers: dict[str, _Reader] = {}
    owners = [names[0]] * len(text)  # the model that wrote each character (the first reads the prompt)
    tokens, writers, switches, pieces = [], [], [], []
    prompt_tokens, prefill_s, decode_s, finished = 0, 0.0, 0.0, "length"
    for seg, (name, n) in enumerate(schedule):
        model, tok = models[name], toks[name]
        t0 = time.perf_counter()
        ids, rel = text_ends(tok, text)
        ends = _absolute(rel, len(text))
        prompt_tokens = prompt_tokens or len(ids)
        reader = readers.setdefault(name, _Reader())
        reader.keep(_common(list(zip(reader.ids, reader.ends)), list(zip(ids[:-1], ends[:-1]))))
        plan, cands = _sources(readers, owners, name, k, ends, len(reader.ids), len(ids) - 1)
        t = 0
        while t < len(plan):  # runs of one source: read itself, or through Σ from one owner's own run
            owner = plan[t][0]
            u = t + 1
            while u < len(plan) and plan[u][0] == owner:
                u += 1
            a, b = len(reader.ids), len(reader.ids) + (u - t)
            tic = time.perf_counter()
            if owner is None:
                _read_itself(model, reader, ids[a:b], ends[a:b])
            else:
                picks = [p for _, p in plan[t:u]]
                run = [c for c in cands[owner] if c <= picks[-1]]
                _read_through(space, models, owner, name, readers[owner], run, picks, reader, ids[a:b], ends[a:b])
                switches.append(Switch(owner, name, a, b, time.perf_counter() - tic))
            t = u
        if seg == 0:
            prefill_s = time.perf_counter() - t0
        stops = eos_ids(model, tok)
        tic = time.perf_counter()
        new = list(sample_tokens(model, reader.cache, ids[-1], params, generator, max_new_tokens=n, stop_ids=stops))
        decode_s += time.perf_counter() - tic
        added, new_ends = _written(tok, ids, new, len(text))
        reader.ids += [ids[-1], *new[:-1]]  # read: its last token of the text and every new one but the last
        reader.ends += [ends[-1], *new_ends[:-1]]
        reader.native += [True] * len(new)
        text += added
        owners += [name] * len(added)
        pieces.append(added)
        tokens += new
        writers += [name] * len(new)
        if params.stop_at_eos and new and new[-1] in stops:
            finished = "eos"
            break
    return MixedResult(tokens=tokens, models=writers, switches=switches, prompt_tokens=prompt_tokens,
                       prefill_s=prefill_s, decode_s=decode_s, finish_reason=finished, seed=seed,
                       text="".join(pieces))
