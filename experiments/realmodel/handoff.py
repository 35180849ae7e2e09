"""Hand-off benchmark: translating a prefix cache through Σ vs the target re-reading the prefix.

For a 512-token prefix already read by the source model, the target can either re-read
the text itself (re-prefill, the ``text`` hand-off) or take the source's cache through
Σ (``OUT_target(IN_source(block))``). Reported side by side in one run, median of
``--repeats`` timings each, with the target's suffix NLL after each cache:

* ``re-prefill``: target's own cache (its NLL is the *base*);
* ``translate (default)``: the pool's adapters (stack depth = model layers), read as the pool reads them (with its
  ``refresh``, timed with the translation);
* ``translate (latency)``: ``SpaceConfig(num_layers=1, embed_dim_factor=1, refresh=0)``: one translator layer
  (fewer than the model's) at half the default residual width, the translation read as is (no refresh);
* ``translate (1 layer)``: ``SpaceConfig(num_layers=1)`` alone. Measured: with the translator's
  grouping (one layer attends to all slices of its group) depth alone saves little; the width does.

Targets: default <= 1.0x re-prefill time, latency-oriented <= 0.5x. Without
``--pool`` the models are random ``3.8m-l4-d256`` Gemma-2s and the spaces random (timings
are real, NLLs are not meaningful: nothing is trained). ``--pool`` / ``--latency-pool``
take trained pools; ``--text FILE`` gives real text (tokenized with the pool's tokenizer; in a pool whose members
tokenize differently, each model reads its own tokens of one cut of the text and Σ is read along the token map).

:func:`measure_handoff` measures, :func:`handoff_lines` prints the table; ``bench/bench_handoff.py`` is the
command line over both and ``kvlingua real-model`` calls them on its trained pool. Underneath,
:func:`handoff_inputs` cuts the tokens and :func:`time_handoff` times re-prefill against any trained spaces (the
real-model training arms time theirs with it).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from kvlingua.align import token_map
from kvlingua.backend import suffix_token_nll
from kvlingua.cache import arch_summary, extract_prefix, sink_block
from kvlingua.refresh import refresh_cache
from kvlingua.run import refresh_condition
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import CacheView, model_rotation, translate_cache


@dataclass(frozen=True)
class HandoffConfig:
    """One hand-off measurement (the fields of ``bench/bench_handoff.py``'s flags)."""

    pool: Path | None = None
    """A trained pool (its adapters are the default space); None: random models and spaces."""
    latency_pool: Path | None = None
    """A trained pool with ``SpaceConfig(num_layers < L)``."""
    source: str | None = None
    """The model that read the prefix (default the first)."""
    target: str | None = None
    """The model that continues (default the second)."""
    text: Path | None = None
    """A text file for prefix + suffix (default random ids)."""
    size: str = "3.8m-l4-d256"
    """Size rung of the self-built random models."""
    prefix: int = 512
    suffix: int = 64
    batch: int = 1
    repeats: int = 7
    """Timed rounds (median)."""
    threads: int = 1
    """torch threads."""
    json: Path | None = None
    """Where the measurement is written as JSON (None: nowhere)."""
    no_variants: bool = False
    """Time only re-prefill and the pool's own space (no random latency/1-layer spaces: pools whose shapes the
    default ``SpaceConfig`` does not fit, e.g. 30-layer models)."""
    refresh: tuple[float, ...] = ()
    """Also the default space read with each of these refresh shares (:mod:`kvlingua.refresh`): the translation
    plus the target re-reading that share of the positions, timed together (0: the translation alone, for a pool
    whose own share is not 0)."""

    def __post_init__(self) -> None:
        if any(not 0 <= r <= 1 for r in self.refresh):
            raise ValueError(f"--refresh shares must lie in [0, 1] (0: the translation read as is), "
                             f"got {list(self.refresh)}")


def timed(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median wall time of each ``fn()`` and its last result, interleaved round by round.

    One warm-up call each, then ``repeats`` rounds that call every function once, so load
    changes on a shared machine hit every candidate alike.
    """
    outs = {k: fn() for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def random_models(size: str) -> dict:
    """Two random Gemma-2 models (``src``, ``tgt``) of size rung ``size``, vocabulary 8192."""
    from transformers import Gemma2ForCausalLM

    from kvlingua.models import freeze
    from kvlingua.pretrain.sizes import gemma2_config

    models = {}
    for seed, name in enumerate(("src", "tgt")):
        torch.manual_seed(seed)
        cfg = gemma2_config(size, vocab_size=8192)
        cfg._attn_implementation = "eager"
        models[name] = freeze(Gemma2ForCausalLM(cfg))
    return models


@dataclass(frozen=True)
class HandoffInputs:
    """One hand-off's tokens: the target's prefix and suffix, the source's prefix, and where the two tokenize
    differently, each one's token ends (the token map's input)."""

    prefix: Tensor
    """``[B, P]`` the target's prefix tokens."""
    suffix: Tensor
    """``[B, S]`` the target's suffix tokens (scored after each cache)."""
    source_prefix: Tensor
    """``[B, P]`` the source's tokens of the same prefix text (the target's own where they share a tokenizer)."""
    ends: tuple[Tensor, Tensor] | None = None
    """``([B, P], [B, P])`` the character end of each source and target prefix token; None: one tokenizer."""


def handoff_inputs(models: dict, tokenizer, tokenizers: dict | None, source: str, target: str, text: Path | None,
                   prefix: int, suffix: int, batch: int) -> HandoffInputs:
    """The tokens a hand-off reads: ``text``'s first rows in each model's own tokens where ``tokenizers`` (the
    members tokenize differently; ``text`` required), else ``tokenizer``'s ids of ``text``, else random ids."""
    n = prefix + suffix
    ends = None
    if tokenizers is not None:  # two tokenizers: each model reads its own tokens of one cut of the text
        if text is None:
            raise ValueError("a pool whose members tokenize differently needs --text")
        from kvlingua.data.rows import text_rows

        rows = text_rows([text.read_text()], {m: tokenizers[m] for m in (source, target)}, prefix, suffix)
        if rows[f"ids/{target}"].shape[0] < batch:
            raise ValueError(f"--text yields {rows[f'ids/{target}'].shape[0]} rows of {n} tokens; --batch asks {batch}")
        ids = rows[f"ids/{target}"][:batch]  # [B, P+S] the target's tokens
        src_ids = rows[f"ids/{source}"][:batch]  # [B, P+S] the source's tokens of the same text
        ends = (rows[f"ends/{source}"][:batch], rows[f"ends/{target}"][:batch])  # each [B, P]
    elif text is not None and tokenizer is not None:
        ids = torch.tensor(tokenizer.encode(text.read_text())[: n * batch]).view(batch, n)  # [B, P+S]
        src_ids = ids
    else:
        vocab = min(arch_summary(m).vocab_size for m in models.values())
        ids = torch.randint(4, vocab, (batch, n), generator=torch.Generator().manual_seed(0))  # [B, P+S]
        src_ids = ids
    return HandoffInputs(ids[:, :prefix], ids[:, prefix:], src_ids[:, :prefix], ends)  # [B, P], [B, S], [B, P]


@torch.no_grad()
def time_handoff(models: dict, spaces: dict[str, SharedSpace], source: str, target: str, inputs: HandoffInputs,
                 repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of ``target`` re-reading the prefix (``"prefill"``) and of each space carrying ``source``'s
    cache of it to ``target`` (the target reads its own sink, timed with it), interleaved (:func:`timed`); and
    each one's last cache ``[B, P, L_t, D_t]``."""
    src_block = extract_prefix(models[source], inputs.source_prefix)  # [B, P, L_s, D_s]: read by the source anyway
    prefix, ends = inputs.prefix, inputs.ends

    def through(sp):
        sp.bind_tokens({target: models[target]}, replace=False)
        view = CacheView.of(sp.cfg)
        k = view.sink_tokens
        rot = (model_rotation(models[source]), model_rotation(models[target])) if view.unrotate else (None, None)
        sink = sink_block(models[target], prefix[:, :k]) if k else None
        index = token_map(ends[0][:, k:], ends[1][:, k:]) if ends is not None else None  # [B, P-k]
        out = translate_cache(sp, src_block, source, target, *rot, sink, view=view, index=index,
                              ids=prefix[:, k:])  # [B, P, L_t, D_t]
        # the target re-reads what its next token (the suffix's first) leans on most, as serving does
        return refresh_cache(models[target], out, prefix, inputs.suffix[:, :1], view.refresh, k) if view.refresh else out

    fns = {"prefill": lambda: extract_prefix(models[target], prefix)}
    fns.update({k: (lambda sp=sp: through(sp)) for k, sp in spaces.items()})
    return timed(fns, repeats)


def measure_handoff(args: HandoffConfig) -> dict:
    """Time re-prefill against each space's translation, interleaved, with the target's suffix NLL after each.

    Returns ``{"config": {flag: str(value)}, "rows": [{method, ms, ratio, suffix_nll, trained}], "no_prefix_nll"}``,
    also written to ``args.json`` when set.
    """
    torch.set_num_threads(args.threads)
    trained = {"default": False, "latency": False, "1 layer": False}
    tokenizer = tokenizers = None
    if args.pool is not None:
        from kvlingua.pool import load_pool

        pool = load_pool(args.pool)
        models, spaces, tokenizer = pool.models, {"default": pool.space}, pool.tokenizer
        tokenizers = pool.tokenizers if pool.mixed_tokenizers else None
        trained["default"] = True
    else:
        models = random_models(args.size)
        spaces = {}
    names = list(models)
    source = args.source or names[0]
    target = args.target or names[min(1, len(names) - 1)]
    members = {n: arch_summary(m) for n, m in models.items()}
    L = members[target].num_layers
    if args.latency_pool is not None:
        from kvlingua.pool import load_pool

        spaces["latency"] = load_pool(args.latency_pool).space
        trained["latency"] = True
    torch.manual_seed(0)
    wanted = {"default": SpaceConfig()}  # built only where no trained space was given
    if not args.no_variants:
        wanted |= {"latency": SpaceConfig(num_layers=1, embed_dim_factor=1.0, refresh=0),
                   "1 layer": SpaceConfig(num_layers=1)}
    for kind, cfg in wanted.items():
        if kind not in spaces:
            spaces[kind] = SharedSpace(members, cfg)
    for s in spaces.values():
        s.eval().requires_grad_(False)

    inputs = handoff_inputs(models, tokenizer, tokenizers, source, target, args.text, args.prefix, args.suffix,
                            args.batch)
    refreshed = {refresh_condition("default", share): share for share in args.refresh}
    for kind, share in refreshed.items():
        spaces[kind], trained[kind] = spaces["default"].with_refresh(share), trained["default"]
    kinds = tuple(k for k in ("default", "latency", "1 layer") if k in spaces) + tuple(refreshed)
    secs, outs = time_handoff(models, {k: spaces[k] for k in kinds}, source, target, inputs, args.repeats)
    t_pre = secs["prefill"]
    with torch.no_grad():
        nll = suffix_token_nll(models[target], outs["prefill"], inputs.suffix).mean().item()
        rows = [{"method": "re-prefill (target reads the text)", "ms": 1e3 * t_pre, "ratio": 1.0, "suffix_nll": nll,
                 "trained": True}]
        for kind in kinds:
            space, t = spaces[kind], secs[kind]
            nll = suffix_token_nll(models[target], outs[kind], inputs.suffix).mean().item()
            depth = space.cfg.num_layers or L
            layout = "" if space.cfg.adapter == "linear" else f", {space.cfg.output_layout}"
            label = f"translate ({kind}: {min(depth, L)}/{L} layers, D'={space.cfg.embed_factor:g}D{layout})"
            rows.append({"method": label, "ms": 1e3 * t, "ratio": t / t_pre, "suffix_nll": nll,
                         "trained": trained[kind]})
        none_nll = suffix_token_nll(models[target], None, inputs.suffix).mean().item()

    out = {"config": {k: str(v) for k, v in asdict(args).items()}, "rows": rows, "no_prefix_nll": none_nll,
           "names": {"source": source, "target": target}}
    if args.json:
        args.json.write_text(json.dumps({k: out[k] for k in ("config", "rows", "no_prefix_nll")}, indent=2) + "\n")
    return out


def handoff_lines(measured: dict) -> list[str]:
    """The measurement as the benchmark prints it."""
    cfg, rows, names = measured["config"], measured["rows"], measured["names"]
    lines = [f"source {names['source']} -> target {names['target']}; prefix {cfg['prefix']} tokens, suffix "
             f"{cfg['suffix']}, batch {cfg['batch']}, {cfg['threads']} torch thread(s), median of {cfg['repeats']} "
             "interleaved rounds",
             f"{'method':48s} {'time ms':>9s} {'x re-prefill':>13s} {'suffix NLL':>11s}"]
    for r in rows:
        flag = "" if r["trained"] else "  (untrained adapters)"
        lines.append(f"{r['method']:48s} {r['ms']:9.2f} {r['ratio']:13.2f} {r['suffix_nll']:11.3f}{flag}")
    lines += [f"{'no prefix (floor)':48s} {'':9s} {'':13s} {measured['no_prefix_nll']:11.3f}",
              "targets: default <= 1.0x, latency-oriented <= 0.5x re-prefill time"]
    return lines
