"""One pool model as a Serve deployment: prefill, move a cache through Σ, decode.

A replica holds one frozen model and the shared space's adapters. It can

* prefill a prompt and hand its cache out: into Σ (``export_latent``, ``IN_self``) or raw
  (``export_block``, for the identity hand-off); to a model that tokenizes differently, its own
  tokens of the prompt into Σ with the target's token map (``export_mapped``, :mod:`serve_apps.crosstok`);
* take a handed-over cache (a Σ block, decoded with ``OUT_self``, or a raw block) of the
  first ``positions`` prompt tokens, read the rest of the prompt itself, and decode
  (``generate``, ``stream``); or re-read the whole prompt itself;
* encode a whole context into Σ for the context store (``encode_context``) and keep the
  caches it decoded from stored contexts (``OUT_self`` once per context, LRU within
  ``ServeOptions.decoded_cache_bytes``);
* encode a module learned on this model into Σ (``export_module``); a target decodes it like a
  stored context (once, then kept) and reads the whole prompt after it;
* run one segment of a mixed schedule: rebuild its cache from the segments so far (its own
  raw, the others' in Σ, each encoded once by the model that computed it) and export the
  positions it computed, raw and into Σ (``segment``); across tokenizers, encode its own run
  into Σ and run a planned segment (``encode_run``, ``segment_text``: :mod:`serve_apps.mixed_replica`).

Caches cross deployments as dicts whose ``keys``/``values`` are :class:`~workers.wire.WireTensor`
(``[1, S, Q]`` in Σ or ``[1, S, L, D]`` raw, fp32; a mixed schedule's generator state too), never
torch tensors or transformers ``Cache`` objects: Ray's zero-copy torch reducer warns on every use
and hands the object store's read-only buffers to torch as writable. A received cache is read in
place (``copy=False``): ``OUT_self`` and the cache built over it only read it (the cache
concatenates into fresh tensors); ``tests/serve_apps/test_transport.py`` checks that the stored
bytes are unchanged. Every call builds its own cache and its own random generator; nothing is
shared between requests. The math lives in :mod:`kvlingua.generate` and :mod:`kvlingua.space`.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from kvlingua.align import read_along
from kvlingua.cache import KVBlock, block_from_cache, check_block_fits, extract_prefix, sink_block
from kvlingua.config import from_dict
from kvlingua.generate import (
    GenerationParams,
    as_prompt,
    eos_ids,
    make_generator,
    extend_cache,
    model_cache,
    prefill,
    sample_tokens,
)
from serve_apps.decoding import Decoding, decode, read_and_score
from serve_apps.mixed_replica import TextSegments
from kvlingua.context_store import LRUBytes, tensor_bytes
from kvlingua.models import load_frozen
from kvlingua.modules.port import module_latent
from kvlingua.pool import load_pool
from kvlingua.pool_members import PoolMismatchError, verify_member
from kvlingua.refresh import refresh_cache
from kvlingua.space import LatentBlock
from kvlingua.view import CacheView, model_rotation
from serve_apps.modules import module_library
from serve_apps.options import ServeOptions
from workers.wire import WireTensor, tensor_from_wire, tensor_to_wire

Payload = dict[str, Any]


def _wire(block: KVBlock | LatentBlock) -> dict:
    """``keys``/``values`` of a block as fp32 wire tensors (no copy for contiguous fp32 CPU tensors)."""
    return {"keys": tensor_to_wire(block.keys.float()), "values": tensor_to_wire(block.values.float())}


def _received(payload: Payload):
    """keys/values of a received payload as tensors over its bytes (read-only use, see the module docstring)."""
    return tensor_from_wire(payload["keys"], copy=False), tensor_from_wire(payload["values"], copy=False)


class PoolModelServer(TextSegments):
    """Serve replica of pool model ``name`` (frozen weights + the space's adapters).

    Args:
        pool_dir: the trained pool directory.
        name: which member this replica serves.
        options: ``to_dict(ServeOptions)``.
    """

    def __init__(self, pool_dir: str, name: str, options: dict):
        opts = from_dict(ServeOptions, options)
        torch.set_num_threads(opts.torch_threads)
        pool = load_pool(pool_dir, device=opts.device, load_models=False, verify=False,
                         models_root=opts.models_root)
        members = {m.name: m for m in pool.members}
        if name not in members:
            raise PoolMismatchError(f"pool {pool_dir} has no model {name!r}; it has {sorted(members)}")
        member = members[name]
        model = load_frozen(member.path, device=opts.device)
        if opts.verify:
            verify_member(member, model)
        self.model = model.to(getattr(torch, opts.dtype))
        self.name = name
        self.summary = member.summary
        self.space = pool.space.eval().requires_grad_(False)
        self.space.bind_tokens({self.name: self.model})  # its token readout reads this replica's own embeddings
        self.view = CacheView.of(self.space.cfg)  # what Σ carries: after the target's own sink, keys un-rotated
        self.rotation = model_rotation(self.model) if self.view.unrotate else None
        self.tokenizer = pool.tokenizers.get(name, pool.tokenizer)  # its own: stop strings are found in its text
        # where members tokenize differently, this model's own tokenizer's end-of-sequence token ends generation too
        self.stop_tokenizer = self.tokenizer if pool.mixed_tokenizers else None
        self.decoded: LRUBytes[KVBlock] = LRUBytes(opts.decoded_cache_bytes, lambda b: tensor_bytes(b.keys, b.values))
        self.decoded_hits = 0
        self.modules = module_library(pool, opts.modules_dir, {name: self.model})

    def ping(self) -> str:
        """Liveness: answers once this replica is up."""
        return self.name

    # ------------------------------------------------------------ context store
    @torch.no_grad()
    def encode_context(self, ids: list[int]) -> Payload:
        """Prefill all of ``ids`` and encode it into Σ: ``{"kind": "latent", keys/values [1, C, Q]}``."""
        t0 = time.perf_counter()
        block = extract_prefix(self.model, as_prompt(ids))  # [1, C, L, D]
        t1 = time.perf_counter()
        payload = self._latent_payload(block, ids)
        payload.update(prefill_s=t1 - t0, translate_s=time.perf_counter() - t1)
        return payload

    @torch.no_grad()
    def predecode(self, payload: Payload) -> float:
        """Decode a stored context's latent (``context_id`` set) into this replica's decoded-cache now, ahead of
        its first request; returns the seconds it took (0 when the decoded copy was there already)."""
        t0 = time.perf_counter()
        _, decoded = self._payload_block(payload)
        return time.perf_counter() - t0 if decoded else 0.0

    # ------------------------------------------------------------ hand-off out
    @torch.no_grad()
    def export_latent(self, prompt_ids: list[int]) -> Payload:
        """Prefill ``prompt[:-1]`` and encode it into Σ: ``{"kind": "latent", keys/values [1, P-1, Q]}``."""
        t0 = time.perf_counter()
        block = prefill(self.model, as_prompt(prompt_ids))  # [1, P-1, L, D]
        t1 = time.perf_counter()
        payload = self._latent_payload(block, prompt_ids)
        payload.update(prefill_s=t1 - t0, translate_s=time.perf_counter() - t1)
        return payload

    @torch.no_grad()
    def export_mapped(self, ids: list[int], index: list[int], sink_ids: list[int]) -> Payload:
        """A hand-off to a model that tokenizes differently (:mod:`serve_apps.crosstok`): prefill all of ``ids`` (this
        model's own tokens of the prompt, those ending at or before the target's last handed-over token) and encode
        them into Σ, ``{"kind": "latent", keys/values [1, S-k, Q]}``, with the target's map ``index`` ``[T-k]`` and its
        own ``sink_ids`` (the target reads Σ at its positions and computes its own sink)."""
        t0 = time.perf_counter()
        block = extract_prefix(self.model, as_prompt(ids))  # [1, S, L, D]
        t1 = time.perf_counter()
        payload = self._latent_payload(block, ids)
        payload.update(index=list(index), sink_ids=list(sink_ids), prefill_s=t1 - t0,
                       translate_s=time.perf_counter() - t1)
        return payload

    @torch.no_grad()
    def export_block(self, prompt_ids: list[int]) -> Payload:
        """Prefill ``prompt[:-1]``: ``{"kind": "block", keys/values [1, P-1, L, D], n_kv_heads}``."""
        t0 = time.perf_counter()
        block = prefill(self.model, as_prompt(prompt_ids))  # [1, P-1, L, D]
        return {"kind": "block", **_wire(block), "n_kv_heads": block.n_kv_heads,
                "prefill_s": time.perf_counter() - t0, "translate_s": 0.0}

    @torch.no_grad()
    def export_module(self, module: str) -> Payload:
        """Module ``module`` (learned on this model) in Σ: ``{"kind": "latent", keys/values [1, p, Q]}``."""
        lib = self.modules
        if lib is None or module not in lib.modules or lib.modules[module].model != self.name:
            raise ValueError(f"model {self.name!r} serves no module {module!r} learned on it")
        t0 = time.perf_counter()
        z = module_latent(self.space, lib.modules[module], self.model, source_fingerprint=lib.fingerprints[self.name],
                          max_prompt_len=lib.max_prompt_len)  # [1, p, Q]
        return {"kind": "latent", **_wire(z), "sink": 0, "prefill_s": 0.0,  # a module has no sink (module_view)
                "translate_s": time.perf_counter() - t0}

    def _latent_payload(self, block: KVBlock, ids: list[int] | None = None, start: int = 0) -> Payload:
        """This model's own block of positions ``start ..`` in Σ: ``{"kind": "latent", keys/values [1, S-k, Q],
        "start", "sink", "sink_ids"}``. At ``start == 0`` the first ``k = sink_tokens`` positions stay out of Σ;
        their token ids travel instead (``ids``), and the receiving model reads them itself (its own sink)."""
        k = min(self.view.sink(start), block.seq_len)
        meta = {"start": start, "sink": k, "sink_ids": [int(t) for t in (ids or [])[:k]]}
        if len(meta["sink_ids"]) != k:
            raise ValueError(f"a hand-off from position 0 needs the first {k} token id(s) for the target's own sink")
        if block.seq_len <= k:
            empty = torch.zeros(1, 0, self.space.cfg.q)  # [1, 0, Q]
            return {"kind": "latent", **_wire(LatentBlock(empty, empty)), **meta}
        body = self.view.to_space(block, self.rotation, start)  # [1, S-k, L, D]: after the sink, keys position-free
        return {"kind": "latent", **_wire(self.space.encode(body, self.name)), **meta}  # [1, S-k, Q]

    # ------------------------------------------------------------ hand-off in
    def _payload_block(self, payload: Payload, prompt: torch.Tensor | None = None) -> tuple[KVBlock | None, bool]:
        """A handed-over cache in this model's layout ``[1, S, L, D]`` (Σ payloads decoded with ``OUT_self``),
        and whether it was decoded by this call.

        The space's token prior (:mod:`kvlingua.prior`) reads this model's tokens at the decoded positions: a stored
        context carries them (``ids``, decoded once for every request); a live hand-off's are ``prompt`` ``[1, n]``'s.

        A stored context or a module (``context_id`` set) is decoded once and kept (LRU) for later requests. A Σ
        payload from a model that tokenizes differently carries ``index`` (:mod:`serve_apps.crosstok`): this model's
        positions after its sink read the sender's Σ rows along it before ``OUT_self``, and ``sink_ids`` are this
        model's own; an empty ``index`` leaves only the sink, read here.
        """
        key = payload.get("context_id")
        if key is not None:
            block = self.decoded.get(key)
            if block is not None:
                self.decoded_hits += 1
                return block, False
        if payload["kind"] == "latent":
            latent = LatentBlock(*_received(payload))  # [1, S-k, Q]: the sender's positions after its sink
            index = payload.get("index")
            if index is not None:  # another tokenizer: Σ at this model's positions after its sink
                latent = read_along(latent, torch.tensor([index], dtype=torch.long)) if index else \
                    latent.map(lambda t: t[:, :0])  # [1, T-k, Q]
            view = CacheView(payload.get("sink", 0), self.view.unrotate)
            sink_ids = payload.get("sink_ids") or []
            sink = sink_block(self.model, as_prompt(sink_ids)) if sink_ids else None  # [1, k, L, D]: our own
            if latent.keys.shape[1] == 0:
                return sink, sink is not None
            first, n = payload.get("start", 0) + len(sink_ids), latent.keys.shape[1]
            if payload.get("ids") is not None:  # [1, S-k]: this model's tokens at the decoded positions
                if len(payload["ids"]) != n:
                    raise ValueError(f"a Σ payload's ids name {len(payload['ids'])} positions; it decodes {n}")
                ids = torch.tensor([payload["ids"]], dtype=torch.long)
            else:
                ids = prompt[:, first:first + n] if key is None and prompt is not None and \
                    prompt.shape[1] >= first + n else None
            block = view.to_cache(self.space.decode(latent, self.name, ids), self.rotation, sink,
                                  payload.get("start", 0))  # [1, S, L, D]
            if key is not None and tensor_bytes(block.keys, block.values) <= self.decoded.budget:
                self.decoded.put(key, block)
            return block, True
        if payload["kind"] == "block":
            block = KVBlock(*_received(payload), payload["n_kv_heads"])  # [1, S, L, D]
            check_block_fits(block, self.summary, f"model {self.name!r}")
            return block, False
        raise ValueError(f"unknown hand-off kind {payload['kind']!r}; expected 'latent' or 'block'")

    @torch.no_grad()
    def _start(self, prompt: torch.Tensor, handoff: Payload | None, score_k: int | None = None
               ) -> tuple[Any, dict[str, Any], list[dict | None] | None]:
        """A fresh cache holding ``prompt[:-1]``: re-read it all (None), or take the handed-over first
        ``handoff["positions"]`` positions (default: all it carries) and read the rest here. A module's
        block (``handoff["module"]``) comes before the prompt: all of ``prompt[:-1]`` is read after it.

        With ``score_k`` (echo), also the prompt's log-probabilities ``[P]`` entries: ``None`` for the first
        token and for every token whose predicting position was handed over (tokens ``0..h``); for each later
        token ``j`` the log-probability this model's logits at ``j - 1`` give it, with the ``score_k`` best.
        """
        h = 0
        if handoff is None and score_k is None:
            t0 = time.perf_counter()
            block = prefill(self.model, prompt)  # [1, P-1, L, D]
            return model_cache(self.model, block), {"prefill_s": time.perf_counter() - t0, "translate_s": 0.0,
                                                    "decoded": False}, None
        if handoff is None:
            cache, times = model_cache(self.model, None), {"prefill_s": 0.0, "translate_s": 0.0, "decoded": False}
        else:
            times = {"prefill_s": handoff.get("prefill_s", 0.0), "translate_s": handoff.get("translate_s", 0.0)}
            t0 = time.perf_counter()
            block, times["decoded"] = self._payload_block(handoff, prompt)  # [1, C, L, D] or None
            if handoff.get("module") is None:  # a module's p positions come first: none of the prompt's
                h = min(handoff.get("positions", block.seq_len if block is not None else 0), prompt.shape[1] - 1)
                if block is not None and h < block.seq_len:
                    block = block.map(lambda t: t[:, :h])  # [1, h, L, D]: causal adapters, so a prefix of the decoded block
                if block is not None and self.view.refresh and handoff["kind"] == "latent" and not handoff.get("start"):
                    # the positions this model's next token (prompt[h]) leans on most, re-read here (kvlingua.refresh)
                    block = refresh_cache(self.model, block, prompt[:, :h], prompt[:, h:h + 1], self.view.refresh,
                                          handoff.get("sink", 0))  # [1, h, L, D], on this model's device
            cache = model_cache(self.model, block)
            times["translate_s"] += time.perf_counter() - t0
        rest = prompt[:, h:-1].to(self.model.device)  # [1, P-1-h]: read by this model after the handed-over part
        t0 = time.perf_counter()
        scored = read_and_score(self.model, cache, rest, prompt[0, h + 1:] if score_k is not None else None,
                                score_k or 0)  # tokens h+1 .. P-1
        times["prefill_s"] += time.perf_counter() - t0
        prompt_logprobs = [None] * (h + 1) + scored if score_k is not None else None
        return cache, times, prompt_logprobs

    def _tokens(self, prompt_ids: list[int], params: dict, handoff: Payload | None,
                decoding: dict | None = None) -> Iterator[dict]:
        dec = Decoding.from_dict(decoding)
        n_new = params["max_new_tokens"]
        p = GenerationParams(**{**params, "max_new_tokens": max(n_new, 1)})  # 0: score the prompt only (echo)
        prompt = as_prompt(prompt_ids)  # [1, P]
        generator, seed = make_generator(p.seed, self.model.device)
        begin = time.perf_counter()
        upstream = (handoff or {}).get("prefill_s", 0.0) + (handoff or {}).get("translate_s", 0.0)
        k = (dec.top_logprobs or 0) if dec.echo_logprobs else None
        cache, times, prompt_logprobs = self._start(prompt, handoff, k)
        stops = eos_ids(self.model, self.stop_tokenizer)
        t0 = time.perf_counter()
        tokens: list[int] = []
        logprobs: list[dict] = []
        first_token_s, stop = None, None
        steps = decode(self.model, cache, int(prompt[0, -1]), p, dec, generator, stops, self._detokenize) if n_new else ()
        for ev in steps:
            if first_token_s is None:  # the source's share (prefill, IN) + ours (OUT, reading, first step)
                first_token_s = upstream + time.perf_counter() - begin
            tokens.append(ev["token"])
            if "logprob" in ev:
                logprobs.append({"logprob": ev["logprob"], "top": ev["top"]})
            stop = ev.get("stop", stop)
            yield ev
        if stop is not None:
            finished = "stop"
        else:
            finished = "eos" if p.stop_at_eos and tokens and tokens[-1] in stops else "length"
        done = {"done": True, "tokens": tokens, "finish_reason": finished, "seed": seed,
                "decode_s": time.perf_counter() - t0, "first_token_s": first_token_s or 0.0, **times}
        if dec.top_logprobs is not None:
            done["logprobs"] = logprobs
        if prompt_logprobs is not None:
            done["prompt_logprobs"] = prompt_logprobs
        yield done

    def _detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def generate(self, prompt_ids: list[int], params: dict, handoff: Payload | None = None,
                 decoding: dict | None = None) -> dict:
        """Decode after a hand-off (``None``: re-read the prompt); returns tokens and timings.

        ``decoding`` (``to_dict`` of :class:`serve_apps.decoding.Decoding`) adds penalties, bias, stop
        strings and log-probabilities (``logprobs``, and ``prompt_logprobs`` with echo); with
        ``max_new_tokens: 0`` only the prompt is scored."""
        *_, done = self._tokens(prompt_ids, params, handoff, decoding)
        return done

    def stream(self, prompt_ids: list[int], params: dict, handoff: Payload | None = None,
               decoding: dict | None = None) -> Iterator[dict]:
        """Like :meth:`generate`, yielding ``{"token": id, ...}`` per token, then the final dict."""
        yield from self._tokens(prompt_ids, params, handoff, decoding)

    # ------------------------------------------------------------ mixed schedules
    @torch.no_grad()
    def segment(self, prompt_ids: list[int], pending: int, max_new_tokens: int, params: dict,
                generator_state: WireTensor | None, context: list[Payload] | None, export: bool) -> dict:
        """One segment of a mixed schedule (see :func:`kvlingua.mixed.mixed_generate`; the ingress keeps its :class:`~kvlingua.mixed.Ledger`).

        ``context`` holds every cached position so far as segments in order: this model's own
        (``kind: block``, raw) and the other models' (``kind: latent``, encoded once by the model
        that computed them); ``None`` prefills ``prompt[:-1]`` here, with ``pending = prompt[-1]``.
        Reads ``pending``, decodes up to ``max_new_tokens`` with the request's generator (state
        passed along), and with ``export`` returns the positions it computed as ``own`` (raw,
        for its own later segments) and ``latent`` (``IN_self``, for every other model).
        """
        p = GenerationParams(**params)
        generator, _ = make_generator(p.seed, self.model.device)
        if generator_state is not None:
            generator.set_state(tensor_from_wire(generator_state, copy=True))  # uint8 [n]; tiny
        times = {"prefill_s": 0.0, "translate_s": 0.0}
        t0 = time.perf_counter()
        if context is None:
            cache = model_cache(self.model, prefill(self.model, as_prompt(prompt_ids)))  # [0, P-1)
            times["prefill_s"] = time.perf_counter() - t0
        else:
            cache = model_cache(self.model, None)
            for payload in context:
                extend_cache(self.model, cache, self._payload_block(payload)[0])  # += [1, n, L, D]
            times["translate_s"] = time.perf_counter() - t0
        start = 0 if context is None else cache.get_seq_length()
        stops = eos_ids(self.model, self.stop_tokenizer)
        t0 = time.perf_counter()
        tokens = list(sample_tokens(self.model, cache, pending, p, generator, max_new_tokens=max_new_tokens, stop_ids=stops))
        out = {"tokens": tokens, "eos": bool(p.stop_at_eos and tokens[-1] in stops), "decode_s": time.perf_counter() - t0,
               "generator_state": tensor_to_wire(generator.get_state()), **times}
        if export and not out["eos"]:
            t1 = time.perf_counter()
            own = block_from_cache(cache, self.summary.n_kv_heads).map(lambda t: t[:, start:])  # [1, n, L, D]: computed here
            out["own"] = {"kind": "block", **_wire(own), "n_kv_heads": own.n_kv_heads}
            out["latent"] = self._latent_payload(own, prompt_ids, start=start)  # [1, n, Q]: a sink only from position 0
            out["positions"] = own.seq_len
            out["translate_s"] += time.perf_counter() - t1
        return out
