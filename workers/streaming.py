"""Bounded prefetching of source KV blocks.

A trainer rank should wait on a model host only when the host is truly slower than
the rank. :class:`BlockPrefetcher` wraps the rank's batch iterator: while the loop
works on batch ``n``, source-block requests for the next batches are already in
flight at the hosts, at most ``depth`` of them at once (bounded memory in the object
store and no flood of queued work). ``RayBackend.prefix_block`` picks up the block
that was requested for the same model and ids; requests a step did not use are
dropped when the loop moves past their batch.

Which source models a step needs can be given by ``sources(step)`` (e.g. from the
loop's seeded ``PathSampler``); by default every pool model's block is requested.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from workers.backend import RayBackend


class BlockPrefetcher:
    """Iterator over batches that keeps up to ``depth`` source-block requests in flight.

    Args:
        backend: the ``RayBackend`` the loop uses.
        batches: the loop's batches; each has ``ids: dict[model, LongTensor [B, P+S]]``
            and ``prefix_len`` (``kvlingua.batch.Batch``).
        depth: most requests in flight (``0`` disables prefetching).
        sources: step -> source models that step reads; default: every pool model.
        start_step: the step of the first batch (a resumed run starts later).
    """

    def __init__(self, backend: RayBackend, batches: Iterable[Any], depth: int = 4,
                 sources: Callable[[int], Iterable[str]] | None = None, start_step: int = 0):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.backend = backend
        self.depth = depth
        self._source = iter(batches)
        self._sources = sources or (lambda step: backend.names())
        self._next_step = start_step  # step of the next batch pulled from the source
        self._ahead: deque = deque()  # (batch, [(key, ref), ...]) pulled, not yet yielded
        self._current: list = []  # requests of the batch the loop is working on
        self._exhausted = False

    def in_flight(self) -> int:
        """Requests submitted and not yet taken by the loop (nor dropped)."""
        current = sum(self.backend.is_pending(key, ref) for key, ref in self._current)
        return sum(len(reqs) for _, reqs in self._ahead) + current

    def _requests(self, batch: Any, step: int):
        P = batch.prefix_len
        for model in dict.fromkeys(self._sources(step)):
            yield model, batch.ids[model][:, :P]  # [B, P]

    def _fill(self) -> None:
        """Pull batches and submit their requests while fewer than ``depth`` are in flight."""
        while not self._exhausted and self.in_flight() < self.depth:
            try:
                batch = next(self._source)
            except StopIteration:
                self._exhausted = True
                return
            wanted = list(self._requests(batch, self._next_step))
            self._next_step += 1
            room = self.depth - self.in_flight()
            reqs = [self.backend.submit_prefix(m, ids) for m, ids in wanted[: max(room, 0)]]
            self._ahead.append((batch, reqs))

    def _release(self) -> None:
        """Forget the finished batch's requests that its step did not use."""
        for key, ref in self._current:
            self.backend.forget(key, ref)
        self._current = []

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._release()
        if not self._ahead:
            self._fill()
            if not self._ahead:
                if self._exhausted:
                    raise StopIteration
                # depth 0: pass the batch through with nothing prefetched
                batch = next(self._source)
                self._next_step += 1
                return batch
        batch, self._current = self._ahead.popleft()
        self._fill()
        return batch
