"""KV blocks: a model's prefix key/value cache as two dense tensors.

A :class:`KVBlock` holds keys and values of one model for a batch of prefixes, each
``[B, S, L, D]`` (batch, positions, layers, width) with ``D = n_kv_heads * head_dim``.
This is the layout the paper's adapters read and write. Blocks cross process
boundaries as plain contiguous tensors, never as transformers ``Cache`` objects.

* :func:`cache_kwargs` names the cache argument of a model's forward (``cache`` from
  transformers 5.24, ``past_key_values`` before); every forward that takes a cache uses it.
* :func:`extract_prefix` runs a causal LM over prefix ids and returns its block, with
  full length on sliding-window layers. Prefixes are unpadded: a block has no mask.
* :func:`block_from_cache` reads a ``Cache`` into a block; :func:`as_past_key_values` and
  :func:`append_block` write a block into one to feed a suffix; gradients flow from a
  suffix loss into the block's tensors.
* :func:`arch_summary` and :func:`fingerprint` describe a model (or a checkpoint
  directory) so adapters can refuse a model they were not trained for;
  :func:`check_block_fits`, :func:`check_same_layout` and :func:`check_same_vocab`
  compare layouts and vocabularies.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, DynamicCache, PreTrainedModel

from kvlingua.config import KvlinguaError


class CacheAPIError(KvlinguaError, TypeError):
    """A model does not expose its KV cache through the standard transformers ``Cache`` API."""


@dataclass(frozen=True)
class ArchSummary:
    """What an adapter needs to know about a frozen model's cache layout."""

    model_type: str
    """transformers ``model_type`` (``gemma2``, ``llama``, ...)."""
    num_layers: int
    """L: decoder layers, one KV slice each."""
    n_kv_heads: int
    """Key/value heads per layer (1 for the paper's GQA Gemma-2)."""
    head_dim: int
    """Width of one head."""
    vocab_size: int
    """Tokenizer vocabulary the model was trained with."""
    hidden_size: int
    """Residual stream width (informational)."""

    @property
    def width(self) -> int:
        """D = n_kv_heads * head_dim: per-layer cache width of a KV block."""
        return self.n_kv_heads * self.head_dim

    @property
    def layout(self) -> tuple[int, int, int]:
        """``(num_layers, n_kv_heads, head_dim)``: two models can share a KV block iff these are equal."""
        return (self.num_layers, self.n_kv_heads, self.head_dim)

    def describe(self) -> str:
        """The layout in words: ``2 layers x 1 kv heads x 8 (D=8)``."""
        return f"{self.num_layers} layers x {self.n_kv_heads} kv heads x {self.head_dim} (D={self.width})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diff(self, other: "ArchSummary") -> list[str]:
        """Human-readable list of fields that differ (``num_layers: 2 != 4``)."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]} != {b[k]}" for k in a if a[k] != b[k]]


@dataclass
class KVBlock:
    """Keys and values of one model for a batch of prefixes.

    Attributes:
        keys: ``[B, S, L, D]``.
        values: ``[B, S, L, D]``.
        n_kv_heads: heads the width ``D`` splits into (``D = n_kv_heads * head_dim``).
    """

    keys: Tensor
    values: Tensor
    n_kv_heads: int

    def __post_init__(self) -> None:
        if self.keys.dim() != 4 or self.keys.shape != self.values.shape:
            raise ValueError(
                f"KVBlock needs keys and values of equal shape [B, S, L, D]; got "
                f"{tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if self.keys.shape[-1] % self.n_kv_heads:
            raise ValueError(f"width {self.keys.shape[-1]} is not divisible by n_kv_heads={self.n_kv_heads}")

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[2]

    @property
    def width(self) -> int:
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.width // self.n_kv_heads

    @property
    def layout(self) -> tuple[int, int, int]:
        """``(num_layers, n_kv_heads, head_dim)``, comparable with :attr:`ArchSummary.layout`."""
        return (self.num_layers, self.n_kv_heads, self.head_dim)

    def map(self, fn) -> "KVBlock":
        """Apply ``fn`` to keys and values (e.g. ``lambda t: t.to(device)``)."""
        return KVBlock(fn(self.keys), fn(self.values), self.n_kv_heads)

    def to(self, *args, **kwargs) -> "KVBlock":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "KVBlock":
        return self.map(Tensor.detach)


def _config_of(model_or_config: Any):
    return getattr(model_or_config, "config", model_or_config)


def arch_summary(model_or_dir: PreTrainedModel | Any | str | Path) -> ArchSummary:
    """Cache layout of a model, a transformers config, or a checkpoint directory.

    A directory is read from its ``config.json`` only (no weights are loaded).
    """
    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: not a model checkpoint directory (no config.json)")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        cfg = _config_of(model_or_dir)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ArchSummary(
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
    )


def fingerprint(model: PreTrainedModel | torch.nn.Module) -> str:
    """Stable hex digest of a model's weights (names, dtypes, shapes and bytes).

    Tied tensors are hashed once under the first name in sorted order, so a model
    loaded from disk and the one that was saved give the same fingerprint.
    """
    h = hashlib.blake2b(digest_size=16)
    seen: set[tuple[int, int]] = set()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        t = t.to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.cache
def _cache_argument(model_cls: type) -> str:
    """``"cache"`` if ``model_cls.forward`` takes that argument (transformers >= 5.24), else ``"past_key_values"``.

    Read from the signature (``inspect`` follows transformers' ``deprecate_kwarg`` wrapper to the
    real forward), once per model class.
    """
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    """The keyword argument that passes ``cache`` to ``model``'s forward: ``model(ids, **cache_kwargs(model, c))``.

    transformers 5.24 renamed the forward argument (and the output field) ``past_key_values`` to
    ``cache`` and deprecated the old name; this picks the one the installed version takes.
    """
    return {_cache_argument(type(model)): cache}


def returned_cache(model: torch.nn.Module, output: Any) -> Any:
    """The cache a forward of ``model`` returned (``output.cache``, or ``output.past_key_values`` before 5.24)."""
    return getattr(output, _cache_argument(type(model)))


def _cache_layers(cache: Any) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(l, "keys") and hasattr(l, "values") for l in layers):
        raise CacheAPIError(
            f"model returned a cache of type {type(cache).__name__}, which is not a "
            "transformers Cache with per-layer .keys/.values; kvlingua needs a causal LM "
            "that uses the standard Cache API (DynamicCache)"
        )
    return layers


def block_from_cache(cache: Cache, n_kv_heads: int) -> KVBlock:
    """The block a transformers ``Cache`` holds: keys/values ``[B, S, L, D]`` (public ``cache.layers`` API).

    Raises :class:`CacheAPIError` if ``cache`` has no per-layer ``.keys``/``.values`` or its layers
    hold different numbers of positions (e.g. a sliding-window cache built with a config).
    """
    layers = _cache_layers(cache)
    keys, values = [], []
    for layer in layers:
        B, H, S, hd = layer.keys.shape  # [B, H, S, hd]
        keys.append(layer.keys.transpose(1, 2).reshape(B, S, H * hd))  # [B, S, D]
        values.append(layer.values.transpose(1, 2).reshape(B, S, H * hd))
    if len({k.shape[1] for k in keys}) > 1:
        raise CacheAPIError(f"cache layers hold different numbers of positions: {[k.shape[1] for k in keys]}")
    return KVBlock(torch.stack(keys, dim=2), torch.stack(values, dim=2), n_kv_heads)  # [B, S, L, D]


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's decoder stack without its head (``model.get_decoder()``; transformers returns the model
    itself when it names none), or None where there is none apart from the model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder if decoder is not model else None


@torch.no_grad()
def input_embeddings(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, P]`` ids -> ``model``'s input embeddings ``[B, P, H]`` as its first layer reads them (any scale the model
    applies included, e.g. Gemma's √H), fp32 on the model's device, no grad."""
    embed = model.get_input_embeddings()
    return embed(input_ids.to(next(embed.parameters()).device)).float()


@torch.no_grad()
def extract_prefix(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> KVBlock:
    """Run ``model`` over prefix ids and return its KV block.

    Args:
        model: a transformers causal LM using the standard ``Cache`` API.
        input_ids: ``[B, S]`` prefix token ids, every position real text.
        attention_mask: optional ``[B, S]``; accepted only when all ones. A KV block carries no
            mask (the translator, :func:`as_past_key_values` and the suffix loss read every
            position as text), so padded prefixes are refused rather than silently read as text.

    Returns:
        KVBlock with keys/values ``[B, S, L, D]`` on the model's device and dtype. An
        empty ``DynamicCache`` (built without a config) keeps the full prefix on
        sliding-window layers; the sliding mask is still applied by position.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        if not bool((attention_mask != 0).all()):
            raise ValueError(
                "extract_prefix got a padded prefix (zeros in attention_mask), but a KV block has no "
                "mask: the pad positions would be read as text. Give equal-length unpadded prefixes "
                "(pack the text into fixed-length chunks, or extract each sequence on its own)"
            )
    summary = arch_summary(model)
    cache = DynamicCache()
    decoder = _decoder(model)  # the layers alone: a cache needs no logits, and a 262k-token head is ~50 ms a row
    runner, extra = (model, {"logits_to_keep": 1}) if decoder is None else (decoder, {})
    out = runner(input_ids=input_ids, use_cache=True, **extra, **cache_kwargs(runner, cache))
    block = block_from_cache(returned_cache(runner, out), summary.n_kv_heads)  # [B, S, L, D]
    if block.num_layers != summary.num_layers:
        raise CacheAPIError(f"cache has {block.num_layers} layers, config says {summary.num_layers}")
    if block.seq_len != input_ids.shape[1] or block.width != summary.width:
        raise CacheAPIError(
            f"cache holds {block.seq_len} positions x width {block.width}, expected "
            f"{input_ids.shape[1]} x {summary.width}"
        )
    return block


SINK_MEMO_ENTRIES = 1024
"""Distinct sinks (their token ids, device and dtype) :func:`sink_block` keeps per model, least recently used
dropped first: ~46 KB each for SmolLM2-135M's 1-token sink in fp32, ~47 MB at most."""
_SINKS: "weakref.WeakKeyDictionary[PreTrainedModel, OrderedDict[tuple, KVBlock]]" = weakref.WeakKeyDictionary()


def sink_block(model: PreTrainedModel, ids: Tensor) -> KVBlock:
    """``model``'s own cache of its first ``k`` tokens ``ids`` ``[B, k]`` (the sink it keeps when it reads a
    translated prefix): :func:`extract_prefix` of each row, computed once per model, token ids, device and dtype and
    reused (the cache of a sequence's first ``k`` tokens depends on those tokens alone). A 1-token forward reads every
    weight (~30–40 ms for SmolLM2 or Gemma-3-270M on 2 CPU cores, ~0.1 of a 512-token hand-off); a model whose sink is
    its BOS (Gemma's ``<bos>``) computes it once, one whose sink is a prompt's own first token (SmolLM2) once per
    first token, the last :data:`SINK_MEMO_ENTRIES` kept. Returns ``[B, k, L, D]`` (a single row's memo, as stored).
    """
    if ids.numel() == 0:
        return extract_prefix(model, ids)
    param = next(model.parameters())
    memo = _SINKS.setdefault(model, OrderedDict())
    keys = [(tuple(row), str(param.device), param.dtype) for row in ids.tolist()]
    missing = list(dict.fromkeys(key for key in keys if key not in memo))  # distinct, in order
    if missing:
        rows = [keys.index(key) for key in missing]
        fresh = extract_prefix(model, ids[rows])  # [m, k, L, D]
        for i, key in enumerate(missing):
            memo[key] = KVBlock(fresh.keys[i:i + 1].clone(), fresh.values[i:i + 1].clone(), fresh.n_kv_heads)
    for key in keys:
        memo.move_to_end(key)
    if len(set(keys)) == 1:  # one sink for every row (a BOS): the stored row, expanded
        one = memo[keys[0]]
        out = KVBlock(one.keys.expand(ids.shape[0], -1, -1, -1), one.values.expand(ids.shape[0], -1, -1, -1),
                      one.n_kv_heads)  # [B, k, L, D]
    else:
        rows = [memo[key] for key in keys]
        out = KVBlock(torch.cat([r.keys for r in rows]), torch.cat([r.values for r in rows]), rows[0].n_kv_heads)
    while len(memo) > SINK_MEMO_ENTRIES:
        memo.popitem(last=False)
    return out


def check_block_fits(block: KVBlock, summary: ArchSummary, who: str = "model") -> None:
    """Raise ``ValueError`` naming what differs if ``block`` cannot be a cache of that model."""
    if block.layout != summary.layout:
        raise ValueError(
            f"KV block of {block.num_layers} layers x width {block.width} ({block.n_kv_heads} kv heads) "
            f"does not fit {who}: {summary.num_layers} layers x width {summary.width} "
            f"({summary.n_kv_heads} kv heads)"
        )


def check_same_layout(source: ArchSummary, target: ArchSummary, source_name: str = "source",
                      target_name: str = "target", what: str = "identity translation") -> None:
    """Raise ``ValueError`` naming both layouts unless a block of ``source`` can be read by ``target`` as is."""
    if source.layout != target.layout:
        raise ValueError(
            f"{what} needs equal cache layouts; {source_name} has {source.describe()}, "
            f"{target_name} has {target.describe()}"
        )


def check_same_vocab(summaries: dict[str, ArchSummary]) -> None:
    """Raise ``ValueError`` naming two models and both sizes unless every model has the same ``vocab_size``.

    Pool members read and write the same token ids; members with different vocabularies would
    train on ids that mean different tokens (or are out of range) without any error.
    """
    if not summaries:
        return
    (first, ref), *rest = summaries.items()
    for name, summary in rest:
        if summary.vocab_size != ref.vocab_size:
            raise ValueError(
                f"pool models must share one vocabulary, but {first!r} has vocab_size {ref.vocab_size} and "
                f"{name!r} has vocab_size {summary.vocab_size}"
            )


def append_block(cache: Cache, block: KVBlock) -> Cache:
    """Append ``block``'s positions (keys/values ``[B, S, L, D]``) to ``cache`` layer by layer; returns ``cache``.

    Gradients flow from anything computed with the cache back into ``block.keys`` and ``block.values``.
    """
    B, S, L, D = block.keys.shape
    H, hd = block.n_kv_heads, block.head_dim
    # unbind, not one index per layer: its backward stacks the L gradients once instead of
    # allocating a full [B, S, L, D] zero block per layer (85 ms vs 7 ms at [8, 64, 30, 192])
    for l, (k, v) in enumerate(zip(block.keys.unbind(2), block.values.unbind(2))):  # each [B, S, D]
        cache.update(k.reshape(B, S, H, hd).transpose(1, 2), v.reshape(B, S, H, hd).transpose(1, 2), l)  # [B, H, S, hd]
    return cache


def as_past_key_values(block: KVBlock, model: PreTrainedModel | None = None) -> DynamicCache:
    """Build a fresh ``DynamicCache`` holding ``block`` (``[B, S, L, D]`` keys/values).

    Gradients flow from anything computed with the cache back into ``block.keys`` and
    ``block.values``. The forward pass mutates the cache in place: build a new one for
    every forward. If ``model`` is given, the block's layout is checked against it.
    """
    if model is not None:
        check_block_fits(block, arch_summary(model))
    return append_block(DynamicCache(), block)
