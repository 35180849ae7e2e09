"""The HTTP ingress: validates requests, tokenizes, and routes caches between model deployments.

Latent hand-off ``source -> target``: the source deployment prefills the prompt and
encodes its cache into Σ (``IN_source``); the resulting response is passed straight to
the target deployment, which decodes it (``OUT_target``) and generates. ``text``: the
target re-reads the prompt; ``identity``: the raw source cache (equal layouts only).
Mixed schedules run segment by segment: each model exports the positions it computed, raw
(for its own later segments) and encoded into Σ once (for every other model), and each
next model rebuilds its cache from those pieces, so no position is translated twice. Every bad request is a :class:`RequestError` (HTTP 4xx naming what is wrong)
raised before any model work starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator

from kvlingua.config import from_dict
from kvlingua.generate import check_identity
from kvlingua.pool import load_pool
from serve_apps.options import ServeOptions
from serve_apps.schemas import (
    GenerateRequest,
    GenerateResponse,
    MixedRequest,
    MixedResponse,
    ModelInfo,
    ModelList,
    SwitchInfo,
    Timings,
)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Prepared:
    """A validated generation request, ready to route."""

    req: GenerateRequest
    ids: list[int]
    params: dict[str, Any]


def _seed(seed: int | None) -> int:
    return seed if seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _timings(prefill_s: float, translate_s: float, decode_s: float) -> Timings:
    return Timings(prefill_s=prefill_s, translate_s=translate_s, decode_s=decode_s,
                   total_s=prefill_s + translate_s + decode_s)


class PoolIngress:
    """Serve ingress of a pool (wrapped with ``serve.ingress()``; the FastAPI app is built per replica).

    Args:
        pool_dir: the trained pool directory.
        options: ``to_dict(ServeOptions)``.
        models: pool name -> handle of that model's deployment.
    """

    def __init__(self, pool_dir: str, options: dict, models: dict[str, Any]):
        self.opts = from_dict(ServeOptions, options)
        pool = load_pool(pool_dir, load_models=False, verify=False)
        self.members = {m.name: m for m in pool.members}
        self.q_dim = pool.space.cfg.q_dim
        self.tokenizer = pool.tokenizer
        self.vocab = min(m.summary.vocab_size for m in pool.members)
        self.handles = models

    def __serve_build_asgi_app__(self):
        from serve_apps.api import make_api

        return make_api(self)

    # ------------------------------------------------------------ validation
    def model_list(self) -> ModelList:
        infos = [ModelInfo(name=m.name, width=m.summary.width, fingerprint=m.fingerprint, **m.summary.to_dict())
                 for m in self.members.values()]
        return ModelList(models=infos, q_dim=self.q_dim, tokenizer=self.tokenizer is not None,
                         max_prompt_tokens=self.opts.max_prompt_tokens, max_new_tokens=self.opts.max_new_tokens)

    def _model(self, name: str, field: str) -> str:
        if name not in self.members:
            raise RequestError(404, f"{field}: unknown model {name!r}; this pool serves {sorted(self.members)}")
        return name

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(400, "prompt: this pool has no tokenizer; send the prompt as a list of token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise RequestError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab})")
        if not ids:
            raise RequestError(400, "prompt: empty; give at least one token of text")
        if len(ids) > self.opts.max_prompt_tokens:
            raise RequestError(400, f"prompt: {len(ids)} tokens; this server accepts at most "
                                    f"{self.opts.max_prompt_tokens} (max_prompt_tokens)")
        return ids

    def _n(self, n: int, field: str) -> int:
        if n > self.opts.max_new_tokens:
            raise RequestError(400, f"{field}: {n} exceeds this server's limit of {self.opts.max_new_tokens}")
        return n

    def prepare(self, req: GenerateRequest) -> Prepared:
        """Check model names, hand-off, prompt and limits; raises :class:`RequestError`."""
        self._model(req.target, "target")
        if req.source is not None:
            self._model(req.source, "source")
            if req.handoff == "identity":
                try:
                    check_identity(self.members[req.source].summary, self.members[req.target].summary,
                                   req.source, req.target)
                except ValueError as e:
                    raise RequestError(400, f"handoff: {e}") from e
        params = dict(max_new_tokens=self._n(req.max_new_tokens, "max_new_tokens"), temperature=req.temperature,
                      top_p=req.top_p, seed=_seed(req.seed), stop_at_eos=not req.ignore_eos)
        return Prepared(req, self._ids(req.prompt), params)

    # ------------------------------------------------------------ routing
    def _handoff(self, p: Prepared):
        """The source's exported cache (a pending response), or None when the target re-reads the prompt."""
        if p.req.source is None or p.req.handoff == "text":
            return None
        source = self.handles[p.req.source]
        if p.req.handoff == "latent":
            return source.export_latent.remote(p.ids)
        return source.export_block.remote(p.ids)

    def _response(self, p: Prepared, done: dict) -> GenerateResponse:
        tokens = done["tokens"]
        return GenerateResponse(
            source=p.req.source, target=p.req.target, handoff=p.req.handoff if p.req.source else "none",
            text=self._text(tokens), tokens=tokens, prompt_tokens=len(p.ids), new_tokens=len(tokens),
            finish_reason=done["finish_reason"], seed=done["seed"],
            timings=_timings(done["prefill_s"], done["translate_s"], done["decode_s"]),
        )

    def _text(self, tokens: list[int]) -> str | None:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None

    async def generate(self, p: Prepared) -> GenerateResponse:
        done = await self.handles[p.req.target].generate.remote(p.ids, p.params, self._handoff(p))
        return self._response(p, done)

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """Server-sent events: ``data: {"token", "text"}`` per token, then ``event: done`` with the result."""
        events = self.handles[p.req.target].options(stream=True).stream.remote(p.ids, p.params, self._handoff(p))
        try:
            async for ev in events:
                if "token" in ev:
                    piece = self._text([ev["token"]])
                    yield f"data: {json.dumps({'token': ev['token'], 'text': piece})}\n\n"
                else:
                    yield f"event: done\ndata: {self._response(p, ev).model_dump_json()}\n\n"
        except Exception as e:  # the stream has started: report in-band, the status line is already sent
            yield f"event: error\ndata: {json.dumps({'detail': f'{type(e).__name__}: {e}'})}\n\n"

    async def mixed(self, req: MixedRequest) -> MixedResponse:
        """Run a schedule; consecutive segments of one model are merged (its cache simply continues)."""
        merged: list[list] = []
        for i, seg in enumerate(req.schedule):
            self._model(seg.model, f"schedule[{i}].model")
            self._n(seg.max_new_tokens, f"schedule[{i}].max_new_tokens")
            if merged and merged[-1][0] == seg.model:
                merged[-1][1] += seg.max_new_tokens
            else:
                merged.append([seg.model, seg.max_new_tokens])
        total = sum(n for _, n in merged)
        self._n(total, "schedule (total max_new_tokens)")
        ids = self._ids(req.prompt)
        seed = _seed(req.seed)
        params = dict(max_new_tokens=total, temperature=req.temperature, top_p=req.top_p, seed=seed,
                      stop_at_eos=not req.ignore_eos)
        pending, state = ids[-1], None
        history: list[tuple[str, dict]] = []  # (model that computed them, its export) per segment, in order
        tokens, owners, switches = [], [], []
        prefill_s = translate_s = decode_s = 0.0
        finished = "length"
        for k, (name, n) in enumerate(merged):
            last = k == len(merged) - 1
            context = None if k == 0 else [out["own"] if owner == name else out["latent"] for owner, out in history]
            read = max((i + 1 for i, (owner, _) in enumerate(history) if owner == name), default=0)
            switches += [SwitchInfo(source=owner, target=name, positions=out["positions"])  # newly translated
                         for owner, out in history[read:]]
            out = await self.handles[name].segment.remote(ids, pending, n, params, state, context, not last)
            tokens += out["tokens"]
            owners += [name] * len(out["tokens"])
            prefill_s += out["prefill_s"]
            translate_s += out["translate_s"]
            decode_s += out["decode_s"]
            if out["eos"]:
                finished = "eos"
                break
            pending, state = out["tokens"][-1], out["generator_state"]
            history.append((name, out))
        return MixedResponse(text=self._text(tokens), tokens=tokens, models=owners, switches=switches,
                             prompt_tokens=len(ids), new_tokens=len(tokens), finish_reason=finished, seed=seed,
                             timings=_timings(prefill_s, translate_s, decode_s))
