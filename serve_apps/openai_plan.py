"""An OpenAI request made into :class:`~serve_apps.requests.Prepared` generations, one per choice.

* **Path aliases.** ``model: "TARGET@SOURCE"`` means *SOURCE reads the prompt, its cache reaches
  TARGET through Σ*: the same request as ``model: TARGET`` with ``kvlingua.source: SOURCE``.
  ``TARGET@SOURCE:text`` (the target re-reads the prompt) and ``:identity`` name the other
  hand-offs. ``GET /v1/models`` lists one alias per trained path (:func:`model_list`); any other
  pair is accepted too and behaves as ``kvlingua.source`` does (text fallback, or 400 with strict).
* **Choices.** A list ``prompt`` gives one choice per prompt, ``n`` gives ``n`` per prompt; choice
  ``i * n + j`` is prompt ``i``'s ``j``-th, sampled with seed ``seed + j`` (a fresh seed each without
  ``seed``).
* **Scoring (echo).** With ``echo`` and ``logprobs`` the target scores the prompt: token ``t`` gets
  the log-probability of the target's logits at ``t - 1``. Token 0 has none, nor has any token whose
  predicting position was handed over: with a hand-off of ``h`` tokens (``kvlingua.handoff_tokens``),
  tokens ``0..h`` are ``null`` and ``h+1..`` are the target's. Echo on a path therefore needs
  ``handoff_tokens`` (to score a continuation that starts at token ``c``, send ``c - 1``); without
  it the request is refused (400), since the default hand-off (all but the last token) leaves
  nothing to score.

Pure Python over the :class:`~serve_apps.planner.Planner` (no Ray).
"""
from __future__ import annotations

from dataclasses import replace

from serve_apps.openai_schemas import ChatRequest, CompletionRequest
from serve_apps.planner import Planner
from serve_apps.requests import HandoffAsk, Prepared, RequestError, sampling_params

DEFAULT_MAX_TOKENS = 16
HANDOFFS = ("latent", "text", "identity")
MAX_CHOICES = 128
"""Most choices (prompts x n) one request may ask for."""


def resolve_model(planner: Planner, req: CompletionRequest | ChatRequest) -> tuple[str, str | None, str]:
    """``(target, source, handoff)`` of a request: ``model`` as a pool member or a path alias, with ``kvlingua``."""
    k = req.kvlingua
    if "@" not in req.model:
        return req.model, k.source, k.handoff
    target, _, rest = req.model.partition("@")
    source, _, handoff = rest.partition(":")
    handoff = handoff or "latent"
    if handoff not in HANDOFFS:
        raise RequestError(400, f"model: {req.model!r}: hand-off {handoff!r} is not one of {list(HANDOFFS)} "
                                "(TARGET@SOURCE[:latent|text|identity])", param="model")
    for name in (target, source):
        if name not in planner.members:
            raise RequestError(404, f"model: {req.model!r}: {name!r} is not a pool model; this pool serves "
                                    f"{sorted(planner.members)}; see GET /v1/models", param="model",
                               code="model_not_found")
    if k.source is not None and k.source != source:
        raise RequestError(400, f"kvlingua.source: {k.source!r} contradicts model {req.model!r}; leave it unset",
                           param="kvlingua.source")
    if "handoff" in k.model_fields_set and k.handoff != handoff:
        raise RequestError(400, f"kvlingua.handoff: {k.handoff!r} contradicts model {req.model!r}; leave it unset",
                           param="kvlingua.handoff")
    return target, source, handoff


def model_list(planner: Planner, created: int) -> list[dict]:
    """OpenAI's model entries: each pool member, then ``TARGET@SOURCE`` for each trained path."""
    data = [{"id": m.name, "object": "model", "created": created, "owned_by": "kvlingua",
             "kvlingua": {"fingerprint": m.fingerprint, **m.summary.to_dict()}} for m in planner.members.values()]
    paths = planner.limits.paths
    for target in planner.members:
        for source in planner.members:
            if paths is not None and (source, target) not in paths:
                continue
            data.append({"id": f"{target}@{source}", "object": "model", "created": created,
                         "owned_by": "kvlingua", "root": target, "parent": target,
                         "kvlingua": {"target": target, "source": source, "handoff": "latent", "trained": True,
                                      "max_positions": planner.limits.max_positions}})
    return data


def stop_strings(planner: Planner, stop: str | list[str] | None, target: str | None = None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise RequestError(400, f"stop: {len(stops)} strings; at most 16", param="stop")
    for i, s in enumerate(stops):
        if not s:
            raise RequestError(400, f"stop[{i}]: empty string", param="stop")
    if stops and (planner.tokenizers.of(target) if planner.mixed else planner.tokenizer) is None:
        raise RequestError(400, "stop: this pool has no tokenizer to find stop strings with", param="stop")
    return stops


def decoding_options(planner: Planner, req: CompletionRequest | ChatRequest, chat: bool,
                     target: str | None = None) -> dict:
    """``to_dict`` of :class:`serve_apps.decoding.Decoding` for ``req`` answered by ``target``; refusals name the
    field."""
    bias, vocab = [], planner.vocab_of(target)
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or not 0 <= int(key) < vocab:
            raise RequestError(400, f"logit_bias: key {key!r} is not a token id in [0, {vocab})",
                               param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise RequestError(400, f"logit_bias[{key!r}]: {value} is outside [-100, 100]", param="logit_bias")
        bias.append((int(key), float(value)))
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        echo = False
    else:
        top, echo = req.logprobs, req.echo and req.logprobs is not None
    return {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty, "logit_bias": bias,
            "top_logprobs": top, "echo_logprobs": echo, "stop": stop_strings(planner, req.stop, target)}


def max_new_tokens(planner: Planner, req: CompletionRequest | ChatRequest) -> int:
    n = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
    return planner.new_tokens(n if n is not None else DEFAULT_MAX_TOKENS, "max_tokens")


def plan_choices(planner: Planner, req: CompletionRequest | ChatRequest, prompts: list[list[int]],
                 route: str, chat: bool, texts: list[str | None] | None = None) -> list[Prepared]:
    """One :class:`Prepared` per choice (prompt-major), all checked before any model work starts.

    ``prompts`` are the target's ids of each prompt, ``texts`` each prompt's text where it was sent as text (what a
    model of another tokenizer reads, see :meth:`~serve_apps.planner.Planner.plan`)."""
    target, source, handoff = resolve_model(planner, req)
    texts = texts or [None] * len(prompts)
    k = req.kvlingua
    if len(prompts) * req.n > MAX_CHOICES:
        raise RequestError(400, f"n: {len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} choices; at most "
                                f"{MAX_CHOICES} per request", param="n")
    echo = getattr(req, "echo", False)
    if echo and req.stream:
        raise RequestError(400, "echo: not supported with stream; send stream: false to score a prompt", param="echo")
    if echo and source is not None and handoff != "text" and k.handoff_tokens is None and k.context_id is None:
        raise RequestError(400, "kvlingua.handoff_tokens: echo on a path scores only what the target computes; say "
                                "how many prompt tokens the source reads (to score a continuation starting at token "
                                "c, send c - 1)", param="kvlingua.handoff_tokens")
    if echo and k.context_id is not None and planner.mixed:
        ctx = planner.store.peek(k.context_id)
        if ctx is not None and not planner.tokenizers.same(ctx.source, target):
            raise RequestError(400, f"echo: context {k.context_id!r} was read by {ctx.source!r}, which tokenizes "
                                    f"differently from {target!r}: the prompt's tokens are not the ones sent; echo "
                                    "without context_id", param="echo")
    n_new = max_new_tokens(planner, req)
    decoding = decoding_options(planner, req, chat, target if planner.mixed else None)
    ask = HandoffAsk(target=target, source=source, handoff=handoff, strict=k.strict, context_id=k.context_id,
                     handoff_tokens=k.handoff_tokens, use_store=k.use_store, module=k.module)

    def params(j: int) -> dict:  # choice j of a prompt samples with seed + j (a fresh seed each without seed)
        seed = (req.seed + j) % 2**31 if req.seed is not None else None
        return sampling_params(n_new, req.temperature, req.top_p, seed, k.ignore_eos)

    out = []
    for ids, text in zip(prompts, texts):
        p = planner.plan(ask, ids, params(0), route, field_prefix="kvlingua.", text=text)
        out += [replace(p, params=params(j), decoding=decoding) for j in range(req.n)]
    return out
