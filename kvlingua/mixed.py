"""Mixed schedules of one tokenizer: models take turns writing one sequence (the paper's mixed language modelling).

Read in this order:

* :class:`Ledger` (pure Python): which model computed each cached position and how far each model's cache
  reaches, so :meth:`Ledger.unread` says which positions a model must read from whom when it takes over. The
  served route (``serve_apps/mixed.py``) keeps the same ledger across replicas.
* :func:`mixed_generate`: the schedule in one process. The first model prefills ``prompt[:-1]``; every model keeps
  its own cache, in its own layout, for the positions it computed; when a model takes over, each run of positions
  it has not read yet is translated once, from the model that computed it (never a cache that already holds
  translated positions, so no untrained chain A→Σ→B→Σ→C is ever run), and appended to its cache; it then reads the
  pending token and continues.

Across tokenizers the same schedule runs on text (:func:`kvlingua.crossmixed.mixed_text`). Shapes: ``[1, P]``
prompt ids; KV blocks ``[1, S, L, D]``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from transformers import Cache, DynamicCache, PreTrainedModel

from kvlingua.cache import arch_summary, block_from_cache
from kvlingua.generate import (GenerationParams, HandoffError, Translator, as_prompt, eos_ids, extend_cache,
                               make_generator, model_cache, prefill, sample_tokens, translate_block)


class Run(NamedTuple):
    """Positions ``[start, end)`` of a sequence, all computed by ``owner``."""

    owner: str
    start: int
    end: int


class Ledger:
    """Which model computed each cached position of a mixed schedule, and how far each model's cache reaches.

    Positions ``[0, prompt_positions)`` are the prompt read by ``first``. A model that writes ``n`` tokens adds
    ``n`` positions (the pending token and every new one but the last, which is pending next) and has then read
    everything. Pure Python: :func:`mixed_generate` and the served schedule (``serve_apps/mixed.py``) share it.
    """

    def __init__(self, first: str, prompt_positions: int):
        self.owners: list[str] = [first] * prompt_positions  # the model that computed each position
        self.read: dict[str, int] = {first: prompt_positions}  # positions each model's cache holds

    def runs(self, start: int = 0) -> list[Run]:
        """Maximal runs of one owner in positions ``start ..``, in order."""
        out: list[Run] = []
        for pos in range(start, len(self.owners)):
            if out and out[-1].owner == self.owners[pos]:
                out[-1] = out[-1]._replace(end=pos + 1)
            else:
                out.append(Run(self.owners[pos], pos, pos + 1))
        return out

    def unread(self, reader: str) -> list[Run]:
        """The runs ``reader`` must read (each from its owner) before it continues the sequence."""
        return self.runs(self.read.get(reader, 0))

    def wrote(self, name: str, n: int) -> Run:
        """``name`` read everything and computed ``n`` more positions; returns its last run (its positions since
        the last switch, the prompt included for the first model)."""
        self.owners += [name] * n
        self.read[name] = len(self.owners)
        return self.runs()[-1]


@dataclass
class Switch:
    """One translated segment of a mixed schedule: positions ``[start, end)`` computed by ``source``,
    translated once into ``target``'s cache."""

    source: str
    target: str
    start: int
    """First translated position (0 is the first prompt token)."""
    end: int
    """One past the last translated position."""
    translate_s: float

    @property
    def positions(self) -> int:
        """Positions translated (``end - start``)."""
        return self.end - self.start


@dataclass
class MixedResult:
    """Output of :func:`mixed_generate`: tokens, which model wrote each, and the switches."""

    tokens: list[int]
    models: list[str]
    """Name of the model that produced each token (same length as ``tokens``)."""
    switches: list[Switch]
    """Every segment translation, in order (a switch to a model can translate several segments)."""
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    finish_reason: str
    seed: int
    text: str | None = None

    @property
    def translate_s(self) -> float:
        return sum(s.translate_s for s in self.switches)


def check_schedule(models: dict[str, PreTrainedModel], schedule: Sequence[tuple[str, int]]) -> None:
    """Raise :class:`~kvlingua.generate.HandoffError` unless ``schedule`` is a non-empty list of (pool model,
    tokens >= 1)."""
    if not schedule:
        raise HandoffError("schedule is empty; give at least one (model, max_new_tokens) segment")
    for i, (name, n) in enumerate(schedule):
        if name not in models:
            raise HandoffError(f"unknown schedule[{i}] model {name!r}; the pool has {sorted(models)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise HandoffError(f"schedule[{i}] ({name!r}): max_new_tokens must be an integer >= 1, got {n!r}")


def mixed_generate(models: dict[str, PreTrainedModel], space: Translator, prompt_ids: Tensor | Sequence[int],
                   schedule: Sequence[tuple[str, int]], params: GenerationParams = GenerationParams(),
                   tokenizer=None) -> MixedResult:
    """Generate with a model schedule ``[(model, max_new_tokens), ...]``, switching models mid-sequence.

    Each run of positions a model has not read yet (:meth:`Ledger.unread`) is translated once, from the model that
    computed it (``OUT_next(IN_owner(owner's own KV of those positions))``, ``[1, n, L_o, D_o] -> [1, n, L_b,
    D_b]``), so every path run is a trained one (owner -> reader). ``params.max_new_tokens`` is ignored; the
    schedule sets the lengths. One request-wide generator draws every sample, so a fixed seed fixes the whole output.
    """
    check_schedule(models, schedule)
    prompt = as_prompt(prompt_ids)  # [1, P]
    sequence = prompt[0, :-1].tolist()  # every position's token so far (the sink's tokens are read from it)
    first_name = schedule[0][0]
    first = models[first_name]
    generator, seed = make_generator(params.seed, next(first.parameters()).device)

    t0 = time.perf_counter()
    caches: dict[str, Cache] = {first_name: model_cache(first, prefill(first, prompt))}  # [0, P-1) read by first
    prefill_s = time.perf_counter() - t0
    ledger = Ledger(first_name, prompt.shape[1] - 1)
    pending, tokens, owners, switches = int(prompt[0, -1]), [], [], []
    finished, decode_s = "length", 0.0
    for name, n in schedule:
        model = models[name]
        cache = caches.setdefault(name, DynamicCache())
        for owner, start, end in ledger.unread(name):
            t = time.perf_counter()
            own = block_from_cache(caches[owner], arch_summary(models[owner]).n_kv_heads)  # [1, S_o, L_o, D_o]
            piece = own.map(lambda x: x[:, start:end])  # [1, end-start, L_o, D_o]: positions the owner computed
            ids = torch.tensor([sequence[:end]], device=prompt.device)  # [1, end]
            extend_cache(model, cache, translate_block(space, piece, owner, name, models[owner], model, ids, start))
            switches.append(Switch(owner, name, start, end, time.perf_counter() - t))
        stops = eos_ids(model, tokenizer)
        t = time.perf_counter()
        new = list(sample_tokens(model, cache, pending, params, generator, max_new_tokens=n, stop_ids=stops))
        decode_s += time.perf_counter() - t
        ledger.wrote(name, len(new))  # read: the pending token and every new one but the last
        sequence += [pending, *new[:-1]]
        tokens += new
        owners += [name] * len(new)
        pending = new[-1]
        if params.stop_at_eos and pending in stops:
            finished = "eos"
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return MixedResult(tokens=tokens, models=owners, switches=switches, prompt_tokens=prompt.shape[1],
                       prefill_s=prefill_s, decode_s=decode_s, finish_reason=finished, seed=seed, text=text)
