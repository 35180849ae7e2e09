"""A model replica's half of a mixed schedule across tokenizers (the ingress's half: :mod:`serve_apps.mixed`).

The ingress plans every switch with :func:`kvlingua.crossmixed.plan_switch` and holds what each model's cache
holds; a replica only computes, with the functions :func:`kvlingua.crossmixed.mixed_text` uses in one process:

* ``encode_run``: an owner encodes its own run (:func:`kvlingua.crossmixed.encode_run`: its cached positions of text
  it wrote, keys un-rotated) into Σ, once per state of its cache, whichever models read it;
* ``segment_text``: a reader rebuilds the positions it keeps, fills the rest along the plan
  (:func:`kvlingua.crossmixed.read_plan`: its own tokens read itself, Σ read at the picks, decoded and rotated at
  its positions), samples its segment and exports the positions it added, raw, for its own later segments.

A model's cache travels as raw pieces ``[(payload, take)]``: each piece's ``keys``/``values`` are
:class:`~workers.wire.WireTensor` s ``[1, n, L, D]`` (fp32), of which the first ``take`` positions are still cached;
read in place (``copy=False``), as :mod:`serve_apps.model_server` reads received caches.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from kvlingua.cache import KVBlock, block_from_cache, check_block_fits
from kvlingua.crossmixed import SwitchPlan, encode_run, read_plan
from kvlingua.generate import GenerationParams, eos_ids, make_generator, model_cache, sample_tokens
from kvlingua.space import LatentBlock
from workers.wire import WireTensor, tensor_from_wire, tensor_to_wire

Pieces = list[tuple[dict, int]]
"""A cache as raw pieces: ``(payload with keys/values [1, n, L, D], positions of it still cached)``, in order."""


def joined(pieces: Pieces, n_kv_heads: int) -> KVBlock | None:
    """The block the pieces hold, ``[1, sum(take), L, D]`` (None: no positions)."""
    keys, values = [], []
    for payload, take in pieces:
        keys.append(tensor_from_wire(payload["keys"], copy=False)[:, :take])  # [1, take, L, D]
        values.append(tensor_from_wire(payload["values"], copy=False)[:, :take])
    if not keys:
        return None
    return KVBlock(torch.cat(keys, 1), torch.cat(values, 1), n_kv_heads)  # [1, S, L, D]


def _wire(t: torch.Tensor) -> WireTensor:
    return tensor_to_wire(t.float())


class TextSegments:
    """The methods a :class:`~serve_apps.model_server.PoolModelServer` serves for mixed schedules across tokenizers
    (it supplies ``model``, ``name``, ``space``, ``summary`` and ``stop_tokenizer``)."""

    model: Any
    name: str
    space: Any
    summary: Any
    stop_tokenizer: Any

    def _cache_block(self, pieces: Pieces) -> KVBlock | None:
        block = joined(pieces, self.summary.n_kv_heads)
        if block is not None:
            check_block_fits(block, self.summary, f"model {self.name!r}")
        return block

    @torch.no_grad()
    def encode_run(self, pieces: Pieces, run: list[int]) -> dict:
        """This model's run ``run`` (positions of its cache ``pieces``) in Σ: ``{"keys", "values" [1, R, Q]}``."""
        t0 = time.perf_counter()
        block = self._cache_block(pieces).to(self.model.device)  # [1, S, L, D]
        z = encode_run(self.space, self.model, self.name, block, run)  # [1, R, Q]
        return {"kind": "latent", "keys": _wire(z.keys), "values": _wire(z.values),
                "translate_s": time.perf_counter() - t0}

    @torch.no_grad()
    def segment_text(self, pieces: Pieces, plan: SwitchPlan, latents: dict[str, dict], ids: list[int],
                     max_new_tokens: int, params: dict, generator_state: WireTensor | None, export: bool) -> dict:
        """One segment: the ``plan.keep`` positions of ``pieces``, then ``plan``'s runs over this model's tokens
        ``ids`` of the text so far (``latents``: each owner's encoded run ``[1, R, Q]``), then up to
        ``max_new_tokens`` sampled after ``ids[-1]`` with the request's generator (state passed along).

        Returns ``tokens``, ``eos``, ``generator_state``, timings (``prefill_s``: runs read here; ``translate_s``: runs
        read through Σ) and, with ``export``, ``cache``: the positions it added ``[1, n, L, D]`` (raw) and their
        count ``positions``."""
        p = GenerationParams(**params)
        device = self.model.device
        generator, _ = make_generator(p.seed, device)
        if generator_state is not None:
            generator.set_state(tensor_from_wire(generator_state, copy=True))  # uint8 [n]; tiny
        cache = model_cache(self.model, self._cache_block(pieces))  # [1, keep, L, D]
        z = {o: LatentBlock(tensor_from_wire(x["keys"], copy=False), tensor_from_wire(x["values"], copy=False)).to(device)
             for o, x in latents.items()}  # [1, R, Q] each
        seconds = read_plan(self.space, self.model, self.name, cache, plan, ids, z)
        stops = eos_ids(self.model, self.stop_tokenizer)
        t0 = time.perf_counter()
        tokens = list(sample_tokens(self.model, cache, ids[-1], p, generator, max_new_tokens=max_new_tokens,
                                    stop_ids=stops))
        out = {"tokens": tokens, "eos": bool(p.stop_at_eos and tokens[-1] in stops),
               "decode_s": time.perf_counter() - t0, "generator_state": tensor_to_wire(generator.get_state()),
               "prefill_s": sum(s for r, s in zip(plan.runs, seconds) if r.kind == "self"),
               "translate_s": sum(s for r, s in zip(plan.runs, seconds) if r.kind == "sigma")}
        if export and not out["eos"]:
            own = block_from_cache(cache, self.summary.n_kv_heads).map(lambda t: t[:, plan.keep:])  # [1, n, L, D]
            out["cache"] = {"keys": _wire(own.keys), "values": _wire(own.values)}
            out["positions"] = own.seq_len
        return out
