"""What the OpenAI routes add to decoding: penalties, ``logit_bias``, stop strings, log-probabilities.

Pure PyTorch, no Ray: a model replica (:mod:`serve_apps.model_server`) runs :func:`decode` and
:func:`score_prompt`; tests call them directly. Token choice reuses
:func:`kvlingua.generate.next_token` (argmax at temperature 0, else temperature + top-p), so a
request without penalties, bias or stop strings picks exactly the tokens of
:func:`kvlingua.generate.sample_tokens`.

* **Penalties** (OpenAI's definition, over the tokens generated so far, not the prompt):
  ``logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``; then
  ``logits[t] += logit_bias[t]``; then temperature / top-p.
* **Log-probabilities** are those of the model's own distribution, ``log_softmax`` of the raw
  logits (before penalties, bias and temperature), as vLLM reports them by default. ``top`` is
  the ``k`` most likely tokens at that position, best first.
* **Stop strings**: after each token the decoded text is searched for every stop string; the
  first hit ends generation (``finish_reason: "stop"``) and the text is cut before it
  (:func:`cut_at_stop`). :func:`held_back` says how much streamed text may be sent without
  sending the start of a stop string.

Shapes: logits ``[V]`` per step, ``[S, V]`` over a prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from transformers import Cache, PreTrainedModel

from kvlingua.cache import cache_kwargs
from kvlingua.generate import GenerationParams, next_token

LOGPROB_FLOOR = -9999.0
"""Log-probabilities below this (``-inf`` included) are reported as this value (JSON has no ``-inf``)."""


@dataclass(frozen=True)
class Decoding:
    """The OpenAI sampling options beyond :class:`kvlingua.generate.GenerationParams`."""

    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated ([-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it was generated ([-2, 2])."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` pairs added to the logits ([-100, 100])."""
    top_logprobs: int | None = None
    """Report each generated token's log-probability and the ``k`` most likely ones; None: none."""
    echo_logprobs: bool = False
    """Also score the prompt: each prompt token's log-probability where this model computed it."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends at the first one in the decoded text; it is not returned."""

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @classmethod
    def from_dict(cls, d: dict | None) -> "Decoding":
        d = dict(d or {})
        d["logit_bias"] = tuple((int(t), float(b)) for t, b in d.get("logit_bias", ()))
        d["stop"] = tuple(d.get("stop", ()))
        return cls(**d)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def adjusted(logits: Tensor, counts: dict[int, int], dec: Decoding) -> Tensor:
    """``[V]`` logits after penalties (``counts``: token -> times generated) and ``logit_bias``."""
    if not dec.adjusts_logits:
        return logits
    out = logits.float().clone()  # [V]
    if counts and (dec.presence_penalty or dec.frequency_penalty):
        ids = torch.tensor(list(counts), dtype=torch.long, device=out.device)  # [n]
        n = torch.tensor(list(counts.values()), dtype=out.dtype, device=out.device)  # [n]
        out[ids] -= dec.frequency_penalty * n + dec.presence_penalty
    for token, bias in dec.logit_bias:
        if token < out.shape[0]:
            out[token] += bias
    return out


def _finite(x: float) -> float:
    return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR


def top_entries(logprobs: Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token, logprob)`` of ``[V]`` log-probabilities, best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))  # [k]
    return [(int(i), _finite(float(v))) for i, v in zip(ids, values)]


def score_logits(logits: Tensor, targets: Tensor, k: int) -> list[dict]:
    """Score ``targets`` ``[S]`` under ``logits`` ``[S, V]`` (row s predicts ``targets[s]``):
    per position ``{"logprob", "top": [(token, logprob), ...]}``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
    picked = logprobs.gather(-1, targets.view(-1, 1)).squeeze(-1)  # [S]
    return [{"logprob": _finite(float(picked[s])), "top": top_entries(logprobs[s], k)} for s in range(targets.shape[0])]


@torch.no_grad()
def read_and_score(model: PreTrainedModel, cache: Cache, ids: Tensor, next_ids: Tensor | None,
                   k: int) -> list[dict]:
    """Have ``model`` read ``ids`` ``[1, R]`` after ``cache`` (mutated in place) and, when ``next_ids``
    ``[R]`` is given, score each next token from the logits at the position before it (see
    :func:`score_logits`); returns ``[]`` without ``next_ids`` or when ``R = 0``."""
    if ids.shape[1] == 0:
        return []
    out = model(input_ids=ids, use_cache=True, logits_to_keep=0 if next_ids is not None else 1,
                **cache_kwargs(model, cache))
    if next_ids is None:
        return []
    return score_logits(out.logits[0], next_ids.to(out.logits.device), k)  # logits [1, R, V]


@torch.no_grad()
def decode(model: PreTrainedModel, cache: Cache, first_input: int, params: GenerationParams, dec: Decoding,
           generator: torch.Generator, stop_ids: set[int], detokenize: Callable[[list[int]], str] | None,
           ) -> Iterator[dict]:
    """Yield up to ``params.max_new_tokens`` tokens as ``{"token", "logprob"?, "top"?}``, feeding
    ``first_input`` first, then each new token (``cache`` holds the positions before it).

    Stops after an end-of-sequence token (with ``params.stop_at_eos``) or, when ``dec.stop`` is set,
    once ``detokenize(tokens)`` contains a stop string; the last event then carries ``"stop": s``.
    """
    device = next(model.parameters()).device
    token, tokens, counts = first_input, [], {}
    for _ in range(params.max_new_tokens):
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache_kwargs(model, cache))
        raw = out.logits[0, -1]  # [V]
        token = next_token(adjusted(raw, counts, dec), params, generator)
        counts[token] = counts.get(token, 0) + 1
        tokens.append(token)
        ev: dict = {"token": token}
        if dec.top_logprobs is not None:
            logprobs = torch.log_softmax(raw.float(), dim=-1)  # [V]
            ev["logprob"] = _finite(float(logprobs[token]))
            ev["top"] = top_entries(logprobs, dec.top_logprobs)
        if dec.stop and detokenize is not None:
            hit = first_stop(detokenize(tokens), dec.stop)
            if hit is not None:
                ev["stop"] = hit[1]
                yield ev
                return
        yield ev
        if params.stop_at_eos and token in stop_ids:
            return


def first_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[int, str] | None:
    """``(index, stop)`` of the earliest stop string in ``text`` (the longest at equal index), or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """``text`` up to (without) its first stop string, and whether one was found."""
    hit = first_stop(text, stops) if stops else None
    return (text[:hit[0]], True) if hit is not None else (text, False)


def held_back(text: str, stops: tuple[str, ...] | list[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not to be streamed yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep
