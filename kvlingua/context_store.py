"""A keyed, byte-bounded LRU store of cached contexts (the Σ context store of serving).

A shared context (a long text every model may read) is prefilled once by its source model,
encoded once into Σ (``IN_source``) and kept here as one :class:`~kvlingua.space.LatentBlock`
``[1, C, Q]``, instead of one native cache ``[1, C, L_i, D_i]`` per model that reads it.

Keys (:class:`ContextKey`) name exactly what produced an entry: the digest of the context's
token ids, the source model's weight fingerprint and the digest of the adapters that encoded
it (the pool's adapter SHA-256s). A retrained or re-fingerprinted pool therefore never finds a
stale entry: its keys differ. Entries are evicted least-recently-used first to stay within a
byte budget; an entry larger than the whole budget is refused (:class:`StoreFullError`).

:class:`LRUBytes` is the generic part (any value with a byte size), also used by serving
replicas to keep the caches they decoded from the store (``OUT_target`` once per target).
Pure Python + PyTorch; no Ray.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import torch

V = TypeVar("V")


class StoreFullError(ValueError):
    """An entry larger than the store's whole byte budget."""


def token_digest(ids: Sequence[int]) -> str:
    """SHA-256 (hex) of a token-id sequence (little-endian int64s), independent of its container."""
    return hashlib.sha256(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def adapters_digest(adapter_sha256: Iterable[str]) -> str:
    """One digest of a pool's adapter files (their SHA-256s, in pool order)."""
    return hashlib.sha256("\n".join(adapter_sha256).encode()).hexdigest()


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by ``tensors`` (elements × element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ContextKey:
    """What a stored context was computed from; equal keys mean interchangeable entries."""

    tokens: str
    """:func:`token_digest` of the context's token ids."""
    source: str
    """Weight fingerprint of the source model that read the context."""
    adapters: str
    """:func:`adapters_digest` of the pool whose ``IN_source`` encoded it."""

    @property
    def id(self) -> str:
        """A short, URL-safe id of the key (first 24 hex digits of its SHA-256)."""
        return hashlib.sha256(f"{self.tokens}/{self.source}/{self.adapters}".encode()).hexdigest()[:24]


class LRUBytes(Generic[V]):
    """A least-recently-used map within a byte budget.

    Args:
        budget: the most bytes the values may hold together (>= 0; 0 stores nothing).
        size_of: bytes held by a value.
    """

    def __init__(self, budget: int, size_of: Callable[[V], int]):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget must be an integer >= 0 bytes, got {budget!r}")
        self.budget = budget
        self.size_of = size_of
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> V | None:
        """The value (marked most recently used), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def peek(self, key: str) -> V | None:
        """The value without touching its recency."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: str, value: V) -> list[str]:
        """Insert or replace ``key``; evicts least-recently-used entries to fit. Returns the evicted keys.

        Raises:
            StoreFullError: ``value`` alone is larger than the budget (nothing is changed).
        """
        size = self.size_of(value)
        if size > self.budget:
            raise StoreFullError(f"an entry of {size} bytes exceeds the store's budget of {self.budget} bytes")
        self.pop(key)
        evicted = []
        while self.bytes + size > self.budget:
            old, (_, old_size) = self._items.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
            evicted.append(old)
        self._items[key] = (value, size)
        self.bytes += size
        return evicted

    def pop(self, key: str) -> V | None:
        """Remove ``key``; returns its value or None."""
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._items)

    def items(self) -> Iterator[tuple[str, V]]:
        return ((k, v) for k, (v, _) in self._items.items())


@dataclass
class StoredContext:
    """One context kept in Σ."""

    key: ContextKey
    token_ids: list[int]
    """The context's token ids (C of them)."""
    source: str
    """Name of the source model in the pool."""
    keys: torch.Tensor
    """Σ keys ``[1, C-k, Q]``: the positions after the sink."""
    values: torch.Tensor
    """Σ values ``[1, C-k, Q]``: the positions after the sink."""
    sink: int = 0
    """``k``: the context's first positions that stay out of Σ (each target reads ``token_ids[:k]`` itself)."""

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    @property
    def positions(self) -> int:
        """C: the context's positions, the sink's included."""
        return self.sink + self.keys.shape[1]


class ContextStore:
    """Σ contexts by id (:attr:`ContextKey.id`), LRU within ``budget`` bytes, with prefix lookup.

    Counts ``hits`` and ``misses`` of :meth:`get` and :meth:`match` for metrics.
    """

    def __init__(self, budget: int):
        self._lru: LRUBytes[StoredContext] = LRUBytes(budget, lambda c: c.nbytes)
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    @property
    def budget(self) -> int:
        return self._lru.budget

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, ctx: StoredContext) -> list[str]:
        """Keep ``ctx`` (replacing an entry of the same key); returns the ids evicted to make room."""
        if ctx.keys.shape != ctx.values.shape or ctx.keys.dim() != 3 or ctx.positions != len(ctx.token_ids):
            raise ValueError(f"a stored context needs keys/values [1, C-k, Q] with C = {len(ctx.token_ids)} tokens "
                             f"and k = {ctx.sink} sink positions, "
                             f"got {tuple(ctx.keys.shape)} and {tuple(ctx.values.shape)}")
        return self._lru.put(ctx.key.id, ctx)

    def get(self, context_id: str) -> StoredContext | None:
        ctx = self._lru.get(context_id)
        if ctx is None:
            self.misses += 1
        else:
            self.hits += 1
        return ctx

    def peek(self, context_id: str) -> StoredContext | None:
        return self._lru.peek(context_id)

    def delete(self, context_id: str) -> bool:
        return self._lru.pop(context_id) is not None

    def list(self) -> list[StoredContext]:
        """Entries, most recently used first."""
        return [self._lru.peek(k) for k in reversed(self._lru.keys())]

    def match(self, ids: Sequence[int], source_fingerprint: str, adapters: str) -> StoredContext | None:
        """The longest stored context of this source and adapters that ``ids`` starts with (None: a miss).

        A context equal to the whole of ``ids`` matches too (the caller hands over all but the last position).
        """
        best = None
        for _, ctx in self._lru.items():
            n = ctx.positions
            if (ctx.key.source == source_fingerprint and ctx.key.adapters == adapters and n <= len(ids)
                    and (best is None or n > best.positions) and list(ids[:n]) == ctx.token_ids):
                best = ctx
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._lru.get(best.key.id)
        return best
