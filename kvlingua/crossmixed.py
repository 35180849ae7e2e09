"""Mixed generation between models that tokenize differently: the schedule switches models, text is the interface.

:func:`kvlingua.mixed.mixed_generate` switches models mid-sequence when they share one tokenizer: every
position is one token for every model. Across tokenizers a position is not: at each switch the model taking
over **re-tokenizes the text so far** with its own tokenizer, keeps the part of its cache whose tokens are still
the same, and fills every position after it, position by position in its own tokens:

* a position whose last character was written by another model (the *owner* of that character: the first
  model owns the prompt) reads Σ of the owner's own cache along the token map (the rule of
  :func:`kvlingua.align.token_map`): the last token the owner computed itself that ends at or before the
  position's last character, keys un-rotated at the owner's positions and rotated at the reader's. Only positions
  the owner computed itself are ever read (never a translated one), so every path run is a trained one,
  owner -> reader;
* its own sink positions, positions whose last character it wrote itself, and positions that no token of the
  owner has ended before yet (the owner's token covering them is its pending one, never cached), it reads
  itself, a plain forward over its own tokens.

The reader then feeds its last token (the text's end as it tokenizes it) and samples its segment. Consecutive
segments of one model are one segment (its cache simply continues: no switch, nothing re-tokenized).

Reading order: the **plan** of a switch is pure bookkeeping (no models, no tensors): :class:`CachedPositions`
(what each model's cache holds, per position), :func:`plan_switch` (keep ``n``, then :class:`Run` s, each read by
the reader itself or through Σ from one owner's *encoded run*, :func:`encoded_run`) and :func:`written` (where
generated tokens' characters end). The **execution** is :func:`encode_run` (an owner's run into Σ, once per owner
state, whoever reads it) and :func:`read_plan` (the reader fills its cache along the plan). :func:`mixed_text`
composes them in one process; :mod:`serve_apps.mixed` composes the same functions across Serve replicas (the
ingress plans and measures, the replicas encode, read and sample), so the algorithm exists once.

Tokens are ids in each writer's own vocabulary, so :attr:`~kvlingua.mixed.MixedResult.text` (the concatenated
text of every segment) is what to read; ``tokens`` come with ``models``, which says whose vocabulary each id is
in. Where every model of the schedule shares one tokenizer this is :func:`~kvlingua.mixed.mixed_generate` on
its tokens, exactly. Shapes: every cache and block is one sequence, ``[1, S, L, D]``; Σ blocks ``[1, R, Q]``.
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from kvlingua.align import NO_CHARS, gather_positions, read_along, text_ends
from kvlingua.cache import KVBlock, arch_summary, block_from_cache, cache_kwargs
from kvlingua.crosstext import _tokenizer, same_tokenizer
from kvlingua.generate import (GenerationParams, HandoffError, Translator, eos_ids, extend_cache, make_generator,
                               sample_tokens)
from kvlingua.mixed import MixedResult, Switch, check_schedule, mixed_generate
from kvlingua.space import LatentBlock
from kvlingua.view import CacheView, model_rotation

DECODE_CONTEXT = 16
"""Tokens before a generated run that its characters are measured after (enough for any tokenizer's merge of a
leading space or a character split over several byte tokens)."""


# ---------------------------------------------------------------- the plan (pure)


@dataclass
class CachedPositions:
    """What one model's cache holds in a mixed schedule, position by position, in its own tokens."""

    ids: list[int] = field(default_factory=list)
    """The token of each cached position."""
    ends: list[int] = field(default_factory=list)
    """Where each cached token's characters end in the text (:data:`NO_CHARS` for a leading special token)."""
    native: list[bool] = field(default_factory=list)
    """Whether the model computed the position itself (False: read through Σ)."""

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, plan: SwitchPlan, ids: Sequence[int], ends: Sequence[int]) -> None:
        """Follow ``plan`` over the reader's tokens ``ids``/``ends`` of the text: keep ``plan.keep`` positions,
        then every run's (native where the reader read it itself)."""
        del self.ids[plan.keep:], self.ends[plan.keep:], self.native[plan.keep:]
        for run in plan.runs:
            self.ids += ids[run.start:run.end]
            self.ends += ends[run.start:run.end]
            self.native += [run.kind == "self"] * (run.end - run.start)

    def wrote(self, last_id: int, last_end: int, new: Sequence[int], new_ends: Sequence[int]) -> None:
        """After sampling ``new`` (ends ``new_ends``): the text's last token and every new one but the last are read."""
        self.ids += [last_id, *new[:-1]]
        self.ends += [last_end, *new_ends[:-1]]
        self.native += [True] * len(new)


@dataclass(frozen=True)
class Run:
    """Consecutive reader positions ``start .. end-1`` filled one way."""

    kind: str
    """``"self"``: the reader reads its own tokens; ``"sigma"``: it reads ``owner``'s encoded run through Σ."""
    start: int
    end: int
    owner: str
    """Whose positions are read (the reader itself for ``"self"``)."""
    picks: tuple[int, ...] = ()
    """``"sigma"``: per reader position, the owner's cached position it reads (``[end - start]``)."""
    run: tuple[int, ...] = ()
    """``"sigma"``: the owner's encoded run (:func:`encoded_run`), its cached positions in order; ``picks`` are in it."""

    @property
    def rows(self) -> list[int]:
        """``[end - start]``: the row of the encoded run ``[1, R, Q]`` each position reads."""
        where = {p: r for r, p in enumerate(self.run)}
        return [where[p] for p in self.picks]


@dataclass(frozen=True)
class SwitchPlan:
    """How a reader's cache reaches the text so far: keep its first ``keep`` positions, then fill ``runs``
    (positions ``keep .. T-2`` of its ``T`` tokens of the text; the last one is fed when it samples)."""

    keep: int
    runs: tuple[Run, ...]

    def owners(self) -> dict[str, tuple[int, ...]]:
        """Each owner read through Σ -> its encoded run."""
        return {r.owner: r.run for r in self.runs if r.kind == "sigma"}


def encoded_run(cached: CachedPositions, owners: Sequence[str], owner: str, k: int) -> list[int]:
    """The owner's cached positions Σ may read, encoded in this order as one run: after its sink (``k``), computed
    by itself, ending in text it wrote (``owners[c]``: the model that wrote character ``c``)."""
    return [i for i in range(k, len(cached)) if cached.native[i] and cached.ends[i] > 0
            and owners[cached.ends[i] - 1] == owner]


def plan_switch(name: str, cached: Mapping[str, CachedPositions], owners: Sequence[str], ids: Sequence[int],
                ends: Sequence[int], k: int) -> SwitchPlan:
    """Plan how ``name`` reads the text so far.

    Args:
        name: the reader.
        cached: each model that has run so far -> what its cache holds (``name``'s own may be absent).
        owners: ``[len(text)]``, the model that wrote each character.
        ids, ends: ``name``'s tokens of the text, with absolute character ends (:func:`tokens_of`).
        k: the space's ``sink_tokens`` (the reader's first ``k`` positions are always its own).

    Returns:
        The positions it keeps (the longest prefix of its cache whose (token, end) are unchanged), then runs over
        its positions up to ``len(ids) - 2``: where a position's last character was written by another model that
        has a cached own token ending at or before it (:func:`encoded_run`), it reads the last such token
        through Σ, else it reads the position itself. Consecutive positions read from one owner (or by itself)
        are one run.
    """
    mine = cached.get(name, CachedPositions())
    keep = 0
    for a, b in zip(zip(mine.ids, mine.ends), zip(ids[:-1], ends[:-1])):
        if a != b:
            break
        keep += 1
    runs: list[list] = []  # [kind, start, end, owner, picks, run]
    runs_of: dict[str, tuple[tuple[int, ...], list[int]]] = {}  # owner -> its encoded run, and the run's ends
    for t in range(keep, len(ids) - 1):
        e = ends[t]
        owner = owners[e - 1] if t >= k and e > 0 else name
        pick = -1
        if owner != name and owner in cached:
            if owner not in runs_of:
                run = encoded_run(cached[owner], owners, owner, k)
                runs_of[owner] = tuple(run), [cached[owner].ends[c] for c in run]
            run, run_ends = runs_of[owner]
            i = bisect.bisect_right(run_ends, e) - 1  # token_map's rule: the last one ending at or before e
            pick = run[i] if i >= 0 else -1
        kind, owner = ("sigma", owner) if pick >= 0 else ("self", name)
        if runs and runs[-1][0] == kind and runs[-1][3] == owner:
            runs[-1][2] = t + 1
        else:
            runs.append([kind, t, t + 1, owner, [], runs_of[owner][0] if kind == "sigma" else ()])
        if pick >= 0:
            runs[-1][4].append(pick)
    return SwitchPlan(keep, tuple(Run(kind, a, b, o, tuple(p), r) for kind, a, b, o, p, r in runs))


def tokens_of(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``text`` as ``tokenizer`` reads it (:func:`~kvlingua.align.text_ends`), with ends counted from its start."""
    ids, rel = text_ends(tokenizer, text)
    return ids, [e if e == NO_CHARS else e + len(text) for e in rel]


def written(tokenizer, before: list[int], new: list[int], length: int) -> tuple[str, list[int]]:
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


# ---------------------------------------------------------------- the execution


@torch.no_grad()
def encode_run(space: Translator, model: PreTrainedModel, owner: str, block: KVBlock,
               run: Sequence[int]) -> LatentBlock:
    """``IN_owner`` of the owner's positions ``run`` of its own cache ``block`` (``[1, S_o, L_o, D_o]``, positions
    ``0 .. S_o-1``), keys un-rotated at those positions where the space carries them so: ``[1, R, Q]``, encoded in
    order as one run, as a hand-off encodes a source's prefix."""
    if CacheView.of(space.cfg).unrotate:
        block = model_rotation(model).unrotate(block, start=0)  # keys position-free
    at = torch.tensor([list(run)])  # [1, R]
    dtype = next(space.parameters()).dtype
    return space.encode(block.map(lambda t: gather_positions(t, at).to(dtype)), owner)  # [1, R, Q]


@torch.no_grad()
def read_plan(space: Translator, model: PreTrainedModel, name: str, cache: DynamicCache, plan: SwitchPlan,
              ids: Sequence[int], latents: Mapping[str, LatentBlock]) -> list[float]:
    """``name`` fills ``cache`` (holding ``plan.keep`` positions) along ``plan``: a ``"self"`` run is a forward over
    ``ids[start:end]``; a ``"sigma"`` run reads its owner's encoded run ``latents[owner]`` (``[1, R, Q]``) at its
    rows, ``OUT_name`` decodes it (``[1, n, L, D]``) and keys are rotated at ``start ..``. Returns each run's seconds."""
    device = next(model.parameters()).device
    unrotate = CacheView.of(space.cfg).unrotate
    if hasattr(space, "bind_tokens"):
        space.bind_tokens({name: model}, replace=False)  # its token readout reads this model's embeddings
    seconds = []
    for run in plan.runs:
        tic = time.perf_counter()
        if run.kind == "self":
            model(input_ids=torch.tensor([list(ids[run.start:run.end])], device=device), use_cache=True,
                  **cache_kwargs(model, cache))
        else:
            rows = torch.tensor([run.rows])  # [1, n]
            body = torch.tensor([list(ids[run.start:run.end])])  # [1, n] this model's tokens there (its token prior)
            out = space.decode(read_along(latents[run.owner], rows), name, body)  # [1, n, L, D]
            if unrotate:
                out = model_rotation(model).rotate(out, start=run.start)
            extend_cache(model, cache, out)
        seconds.append(time.perf_counter() - tic)
    return seconds


def merge_schedule(schedule: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Consecutive segments of one model as one segment (no switch between them)."""
    merged: list[list] = []
    for name, n in schedule:
        if merged and merged[-1][0] == name:
            merged[-1][1] += n
        else:
            merged.append([name, n])
    return [(name, n) for name, n in merged]


def mixed_text(models: dict[str, PreTrainedModel], space: Translator, text: str,
               schedule: Sequence[tuple[str, int]], params: GenerationParams = GenerationParams(),
               tokenizers: Mapping[str, object] | None = None) -> MixedResult:
    """Generate from ``text`` with a model schedule ``[(model, max_new_tokens), ...]`` across tokenizers.

    Args:
        models: pool name -> frozen causal LM.
        space: the shared space (its view says the sink each reader keeps and whether keys travel un-rotated).
        text: the prompt (non-empty).
        schedule: segments in order (consecutive ones of one model merged); ``params.max_new_tokens`` is ignored.
        params: decoding parameters; one request-wide generator draws every sample.
        tokenizers: pool name -> that model's tokenizer (each model of the schedule needs one).

    Returns:
        :class:`~kvlingua.mixed.MixedResult`: ``tokens`` (each in its writer's vocabulary, ``models`` says
        whose), ``text`` (what the segments wrote), one :class:`~kvlingua.mixed.Switch` per run of positions a
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
    generator, seed = make_generator(params.seed, next(models[names[0]].parameters()).device)
    cached: dict[str, CachedPositions] = {}
    caches: dict[str, DynamicCache] = {}
    latents: dict[str, LatentBlock] = {}  # owner -> its encoded run [1, R, Q], until it runs again
    owners = [names[0]] * len(text)  # the model that wrote each character (the first reads the prompt)
    tokens, writers, switches, pieces = [], [], [], []
    prompt_tokens, prefill_s, decode_s, finished = 0, 0.0, 0.0, "length"
    for seg, (name, n) in enumerate(merge_schedule(schedule)):
        model, tok = models[name], toks[name]
        t0 = time.perf_counter()
        ids, ends = tokens_of(tok, text)
        prompt_tokens = prompt_tokens or len(ids)
        plan = plan_switch(name, cached, owners, ids, ends, k)
        mine, cache = cached.setdefault(name, CachedPositions()), caches.setdefault(name, DynamicCache())
        if plan.keep < len(mine):
            cache.crop(plan.keep - len(mine))  # transformers 5.x: a negative count of positions to drop
        encode_s = {}  # owner -> seconds its run took to encode (counted in its first switch here)
        for owner, run in plan.owners().items():
            if owner not in latents:
                tic = time.perf_counter()
                block = block_from_cache(caches[owner], arch_summary(models[owner]).n_kv_heads)  # [1, S_o, L_o, D_o]
                latents[owner] = encode_run(space, models[owner], owner, block, run)  # [1, R, Q]
                encode_s[owner] = time.perf_counter() - tic
        seconds = read_plan(space, model, name, cache, plan, ids, latents)
        mine.read(plan, ids, ends)
        switches += [Switch(r.owner, name, r.start, r.end, s + encode_s.pop(r.owner, 0.0))
                     for r, s in zip(plan.runs, seconds) if r.kind == "sigma"]
        if seg == 0:
            prefill_s += time.perf_counter() - t0
        stops = eos_ids(model, tok)
        tic = time.perf_counter()
        new = list(sample_tokens(model, cache, ids[-1], params, generator, max_new_tokens=n, stop_ids=stops))
        decode_s += time.perf_counter() - tic
        latents.pop(name, None)  # its cache changed: its run is encoded anew when next read
        added, new_ends = written(tok, ids, new, len(text))
        mine.wrote(ids[-1], ends[-1], new, new_ends)
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
