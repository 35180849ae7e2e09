"""Serving a pool whose members tokenize differently: text is the interface.

The semantics are those of :func:`kvlingua.crosstext.handoff_text`, split between the ingress and the replicas:

* **Each model reads text with its own tokenizer** (:func:`kvlingua.align.text_ends`: its leading specials, then its
  tokens, each with the character where it ends). A request's ``ids`` are always the *target's*.
* **Latent hand-off** ``source -> target`` (:func:`handoff_map`): the target's cache holds its first ``h`` prompt
  tokens (default all but the last); the source prefills only its own tokens that end at or before the target's
  ``h``-th token (at least ``k + 1``, ``k = sink_tokens``) and sends Σ of them after its sink, with the map
  ``index`` (:func:`kvlingua.align.token_map`: each target position after its sink -> the last source position
  after the source's sink that ends at or before it) and the target's own sink ids. The target reads Σ along the
  map (``read_along``) before ``OUT_target``, rotates keys at its own positions and computes its sink from its own
  ids. An empty map means nothing reaches past the target's sink: it reads those positions itself.
* **Stored contexts** (:class:`TextContext`) keep the source's Σ, the context text and the source's ends; a target
  of another tokenizer decodes the stored Σ along the map to *its* tokens of the context text
  (:func:`context_map`, decoded once per context and target by its replica), and a request ``context + prompt``
  hands over the decoded positions of the longest prefix of the target's tokens of ``context text + prompt`` that
  equals its tokens of the context text alone (all but the last at most); the target reads the rest.

* **Mixed schedules** (:mod:`serve_apps.mixed`): at each switch the new model re-tokenizes the text so far; the
  ingress plans what it keeps, reads itself and reads through Σ (:func:`kvlingua.crossmixed.plan_switch`).

Members that share a tokenizer (:class:`PoolTokenizers`) keep the token-id route of a one-tokenizer pool unchanged.
:class:`serve_apps.planner.Planner` plans a request between two tokenizers with the functions here (pure Python +
PyTorch).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from kvlingua.align import text_ends, token_map
from kvlingua.context_store import StoredContext
from kvlingua.crosstext import same_tokenizer


class PoolTokenizers:
    """Which tokenizer each pool member reads text with, and which members share one.

    Args:
        members: the pool's member names, in order.
        tokenizers: member -> its tokenizer (:attr:`kvlingua.pool.LoadedPool.tokenizers`; empty without one).
        default: the pool's tokenizer (:attr:`kvlingua.pool.LoadedPool.tokenizer`).
        mixed: whether the members tokenize differently (:attr:`kvlingua.pool.LoadedPool.mixed_tokenizers`).
    """

    def __init__(self, members: list[str], tokenizers: dict, default, mixed: bool):
        self.mixed = mixed
        self.default = default
        self.by_member = dict(tokenizers)
        self.group: dict[str, str] = {}  # member -> the first member reading with the same tokenizer
        firsts: list[str] = []
        for name in members:
            first = next((f for f in firsts if same_tokenizer(self.by_member, f, name)), None) if mixed else members[0]
            if first is None:
                firsts.append(name)
                first = name
            self.group[name] = first

    def of(self, name: str | None):
        """``name``'s tokenizer (the pool's one where every member shares it)."""
        return self.by_member[name] if self.mixed else self.default

    def same(self, a: str, b: str) -> bool:
        """Whether members ``a`` and ``b`` read text with one tokenizer (always, in a one-tokenizer pool)."""
        return not self.mixed or self.group[a] == self.group[b]

    def shared(self, names: list[str]) -> tuple[str, str] | None:
        """Two of ``names`` that tokenize differently, or None when all share one tokenizer."""
        for a in names:
            for b in names:
                if not self.same(a, b):
                    return a, b
        return None


@dataclass
class TextContext(StoredContext):
    """A stored context read from text: what any member needs to decode it, whatever its tokenizer."""

    text: str | None = None
    """The context text (None: stored as token ids, readable only by members of the source's tokenizer)."""
    ends: list[int] | None = None
    """Character end of each of the source's ``C`` tokens relative to the end of ``text`` (``text_ends``)."""


def _map(source_ends: list[int], target_ends: list[int]) -> list[int]:
    """:func:`kvlingua.align.token_map` of one sequence as a list."""
    return token_map(torch.tensor([source_ends]), torch.tensor([target_ends]))[0].tolist()  # [T]


@dataclass(frozen=True)
class Mapped:
    """A latent hand-off across tokenizers, as planned by the ingress."""

    source_ids: list[int]
    """The source's own tokens it prefills (those ending at or before the target's last handed-over token)."""
    index: list[int]
    """``[h - k]``: the source position after its sink that each handed-over target position after its sink reads;
    empty: nothing past the target's sink (it reads its ``h`` positions itself)."""
    sink_ids: list[int]
    """The target's own first ``k`` ids (its sink, computed by the target)."""
    ids: list[int] | None = None
    """``[len(index)]`` the target's own tokens at the positions the map fills, for a stored context (decoded once for
    every request, so the tokens travel with it; :mod:`kvlingua.prior`); None: a live hand-off, whose target reads
    them from its prompt."""

    def extras(self) -> dict:
        """What a Σ payload carries besides the source's latent: the map, the target's sink (and its tokens)."""
        return {"index": self.index, "sink_ids": self.sink_ids} | ({} if self.ids is None else {"ids": self.ids})


def handoff_map(source_tok, target_tok, text: str, positions: int | None, sink: int) -> tuple[Mapped | None, int]:
    """Plan the latent hand-off of ``text`` from a model reading with ``source_tok`` to one reading with ``target_tok``.

    Args:
        positions: the target's prompt tokens handed over (None: all but its last).
        sink: ``k``, the space's ``sink_tokens``.

    Returns:
        ``(mapped, h)``: ``h`` the target's handed-over positions; ``mapped`` None when the source's tokens of the
        prompt end within its own sink while the target has positions past its sink to fill (nothing in Σ to read).
    """
    tgt_ids, tgt_ends = text_ends(target_tok, text)
    src_ids, src_ends = text_ends(source_tok, text)
    h = len(tgt_ids) - 1 if positions is None else positions
    cached = tgt_ends[:h]  # the target's handed-over positions
    last = cached[-1] if cached else src_ends[0]
    n_src = min(max(sink + 1, sum(1 for e in src_ends if e <= last)), len(src_ids))
    if h <= sink:  # nothing past the target's own sink
        return Mapped([], [], tgt_ids[:h]), h
    if n_src <= sink:
        return None, h
    return Mapped(src_ids[:n_src], _map(src_ends[sink:n_src], cached[sink:]), tgt_ids[:sink]), h


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def context_map(ctx: TextContext, target_tok, sink: int) -> tuple[list[int], dict, int]:
    """How a target reading with ``target_tok`` decodes stored context ``ctx`` (its text, another tokenizer's Σ).

    Returns:
        ``(ids, extras, n)``: the target's tokens of the context text; the payload extras (``index``: each of its
        positions after its sink -> the stored Σ row it reads; ``sink_ids``: its own sink); and ``n``, the positions
        the decoded block holds (all of ``ids``, or only its sink where the stored Σ or the target's tokens have
        nothing past the sink). The extras also carry ``ids``, the target's tokens after its sink, which its token
        prior reads (:mod:`kvlingua.prior`).
    """
    ids, ends = text_ends(target_tok, ctx.text)
    rows = ctx.keys.shape[1]  # [1, C-k, Q]: the source's positions after its sink
    if rows == 0 or len(ids) <= sink:
        return ids, {"index": [], "sink_ids": ids[:sink], "ids": []}, min(sink, len(ids))
    return ids, {"index": _map(ctx.ends[ctx.sink:], ends[sink:]), "sink_ids": ids[:sink], "ids": ids[sink:]}, len(ids)


def context_request(ctx: TextContext, target_tok, text: str, sink: int) -> tuple[list[int], int, dict]:
    """A request ``ctx + text`` for a target reading with ``target_tok``.

    Returns:
        ``(ids, h, extras)``: the target's tokens of ``context text + text``; ``h``, the decoded context positions it
        takes (the longest prefix of ``ids`` equal to its tokens of the context text alone, all but the last at
        most); the payload extras of :func:`context_map`.
    """
    ctx_ids, extras, n = context_map(ctx, target_tok, sink)
    ids = text_ends(target_tok, ctx.text + text)[0]
    return ids, min(common_prefix(ids, ctx_ids), n, len(ids) - 1), extras
