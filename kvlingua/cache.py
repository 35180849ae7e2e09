"""KV blocks: a model's prefix key/value cache as two dense tensors.

A :class:`KVBlock` holds keys and values of one model for a batch of prefixes, each
``[B, S, L, D]`` (batch, positions, layers, width) with ``D = n_kv_heads * head_dim``.
This is the layout the paper's adapters read and write. Blocks cross process
boundaries as plain contiguous tensors, never as transformers ``Cache`` objects.

* :func:`extract_prefix` runs a causal LM over prefix ids and returns its block, with
  full length on sliding-window layers.
* :func:`as_past_key_values` turns a block back into a ``DynamicCache`` to feed a suffix;
  gradients flow from a suffix loss into the block's tensors.
* :func:`arch_summary` and :func:`fingerprint` describe a model (or a checkpoint
  directory) so adapters can refuse a model they were not trained for.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel


class CacheAPIError(TypeError):
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

    def map(self, fn) -> "KVBlock":
        """Apply ``fn`` to keys and values (e.g. ``lambda t: t.to(device)``)."""
        return KVBlock(fn(self.keys), fn(self.values), self.n_kv_heads)

    def to(self, *args, **kwargs) -> "KVBlock":
        return self.map(lambda t: t.to(*args, **kwargs))

    def float(self) -> "KVBlock":
        return self.map(Tensor.float)

    def cpu(self) -> "KVBlock":
        return self.map(Tensor.cpu)

    def detach(self) -> "KVBlock":
        return self.map(Tensor.detach)

    def contiguous(self) -> "KVBlock":
        return self.map(Tensor.contiguous)

    def requires_grad_(self, flag: bool = True) -> "KVBlock":
        self.keys.requires_grad_(flag)
        self.values.requires_grad_(flag)
        return self

    def index(self, idx: Tensor | slice) -> "KVBlock":
        """Select batch rows (``idx`` indexes dim 0)."""
        return self.map(lambda t: t[idx])

    @staticmethod
    def cat(blocks: list["KVBlock"], dim: int = 0) -> "KVBlock":
        """Concatenate blocks along batch (0) or positions (1)."""
        return KVBlock(
            torch.cat([b.keys for b in blocks], dim),
            torch.cat([b.values for b in blocks], dim),
            blocks[0].n_kv_heads,
        )

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


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


def _cache_layers(cache: Any) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(l, "keys") and hasattr(l, "values") for l in layers):
        raise CacheAPIError(
            f"model returned past_key_values of type {type(cache).__name__}, which is not a "
            "transformers Cache with per-layer .keys/.values; kvlingua needs a causal LM "
            "that uses the standard Cache API (DynamicCache)"
        )
    return layers


@torch.no_grad()
def extract_prefix(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> KVBlock:
    """Run ``model`` over prefix ids and return its KV block.

    Args:
        model: a transformers causal LM using the standard ``Cache`` API.
        input_ids: ``[B, S]`` prefix token ids.
        attention_mask: optional ``[B, S]`` (1 = real token).

    Returns:
        KVBlock with keys/values ``[B, S, L, D]`` on the model's device and dtype. An
        empty ``DynamicCache`` (built without a config) keeps the full prefix on
        sliding-window layers; the sliding mask is still applied by position.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    summary = arch_summary(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    layers = _cache_layers(out.past_key_values)
    if len(layers) != summary.num_layers:
        raise CacheAPIError(f"cache has {len(layers)} layers, config says {summary.num_layers}")
    B, S = input_ids.shape
    keys, values = [], []
    for layer in layers:
        k, v = layer.keys, layer.values  # [B, H, S, hd]
        if k.shape[2] != S:
            raise CacheAPIError(f"cache layer holds {k.shape[2]} positions, expected {S}")
        keys.append(k.transpose(1, 2).reshape(B, S, summary.width))  # [B, S, H*hd]
        values.append(v.transpose(1, 2).reshape(B, S, summary.width))
    return KVBlock(torch.stack(keys, dim=2), torch.stack(values, dim=2), summary.n_kv_heads)  # [B, S, L, D]


def check_block_fits(block: KVBlock, summary: ArchSummary, who: str = "model") -> None:
    """Raise ``ValueError`` naming what differs if ``block`` cannot be a cache of that model."""
    if block.num_layers != summary.num_layers or block.width != summary.width or block.n_kv_heads != summary.n_kv_heads:
        raise ValueError(
            f"KV block of {block.num_layers} layers x width {block.width} ({block.n_kv_heads} kv heads) "
            f"does not fit {who}: {summary.num_layers} layers x width {summary.width} "
            f"({summary.n_kv_heads} kv heads)"
        )


def as_past_key_values(block: KVBlock, model: PreTrainedModel | None = None) -> DynamicCache:
    """Build a fresh ``DynamicCache`` holding ``block`` (``[B, S, L, D]`` keys/values).

    Gradients flow from anything computed with the cache back into ``block.keys`` and
    ``block.values``. The forward pass mutates the cache in place: build a new one for
    every forward. If ``model`` is given, the block's layout is checked against it.
    """
    if model is not None:
        check_block_fits(block, arch_summary(model))
    B, S, L, D = block.keys.shape
    H, hd = block.n_kv_heads, block.head_dim
    cache = DynamicCache()
    for l in range(L):
        k = block.keys[:, :, l, :].reshape(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
        v = block.values[:, :, l, :].reshape(B, S, H, hd).transpose(1, 2)
        cache.update(k, v, l)
    return cache
