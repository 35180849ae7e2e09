"""Meta-training Σ for portable modules (paper §6.1), as :func:`kvlingua.train.fit` over tasks.

A meta-training step is a Σ-training step whose source prefix is a task's *module* instead of
text: for a batch of ``B`` meta-train tasks and a path ``i -> j``, model i's module blocks
``[B, p, L_i, D_i]`` go through ``OUT_j(IN_i(.))`` and model j reads each task's held-out
examples after them; that suffix loss is the only signal, and only the adapters move (the soft
prompts and the frozen models never do). So the loop, the optimiser and schedule, gradient
sync across Ray Train ranks, tracking and checkpoints are :func:`kvlingua.train.fit`'s, unchanged:

* :class:`ModuleBackend` wraps any :class:`~kvlingua.backend.PoolBackend` and answers
  ``prefix_block(i, ids)`` with model i's module blocks of the tasks the batch names; the rest
  (the target's suffix loss and its gradient) goes to the wrapped backend;
* :func:`meta_batches` names a batch's tasks in its prefix positions: row ``b`` of a
  :class:`~kvlingua.batch.Batch` is ``[task index] * p + held-out ids`` (``[B, p + eval_len]``).
  The task index is a handle for :class:`ModuleBackend`, never read by a model. The held-out ids
  are each model's own: in a pool whose members tokenize differently, each target reads its own
  tokens of the same held-out verses (:func:`kvlingua.modules.tasks.member_tasks`); the p module
  positions are virtual, so path i -> j carries them one for one (no token map).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kvlingua.backend import PoolBackend
from kvlingua.cache import ArchSummary, KVBlock
from kvlingua.modules.tasks import Task, held_out_ids, per_member
from kvlingua.runtime import Runtime
from kvlingua.schedule import epoch_order
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.train import fit
from kvlingua.train_config import TrainConfig, TrainState
from kvlingua.view import module_view

INITS = ("pretrained", "random")


def _default_train() -> TrainConfig:
    return TrainConfig(steps=100, lr=5e-4, eval_every=10, log_every=10, checkpoint_every=0)


@dataclass(frozen=True)
class MetaConfig:
    """Meta-training settings (the ``meta`` section of a modules config)."""

    train: TrainConfig = field(default_factory=_default_train)
    """The Σ-training loop's settings (steps, lr, paths per step, ``eval_every`` for the curve, ...).
    ``train.paths`` None means every cross path ``i -> j``, ``i != j`` (see ``cyclic``)."""
    batch_size: int = 16
    """Tasks per step (per Ray Train rank)."""
    init: str = "pretrained"
    """Where Σ starts: ``pretrained`` (the pool's trained adapters) or ``random`` (fresh adapters)."""
    cyclic: bool = False
    """Also train the cyclic paths ``i -> i`` (a module through Σ back to its own model)."""

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")

    def loop(self, names: Sequence[str]) -> TrainConfig:
        """``train`` with its paths filled in for a pool of ``names``."""
        if self.train.paths is not None:
            return self.train
        paths = tuple((i, j) for i in names for j in names if self.cyclic or i != j)
        if not paths:
            raise ValueError("meta-training needs at least two models (or cyclic: true)")
        return replace(self.train, paths=paths)


class ModuleBackend:
    """A :class:`PoolBackend` whose prefix blocks are modules: ``prefix_block(m, ids)`` = model m's
    module blocks of the tasks named by ``ids[:, 0]`` (see :func:`meta_batches`).

    Args:
        inner: the frozen pool (suffix losses, NLLs, summaries go here).
        blocks: model -> its modules' blocks, keys/values ``[T, p, L_m, D_m]``, row t the module of task t.
    """

    def __init__(self, inner: PoolBackend, blocks: dict[str, KVBlock]):
        lengths = {b.seq_len for b in blocks.values()}
        counts = {b.batch_size for b in blocks.values()}
        if len(lengths) != 1 or len(counts) != 1:
            raise ValueError(f"every model needs a module of the same length for each task; got prompt lengths "
                             f"{sorted(lengths)} and task counts {sorted(counts)}")
        self.inner, self.blocks = inner, blocks
        self.prompt_len = lengths.pop()

    def names(self) -> list[str]:
        return self.inner.names()

    def summary(self, model: str) -> ArchSummary:
        return self.inner.summary(model)

    def fingerprint(self, model: str) -> str:
        return self.inner.fingerprint(model)

    def rotation(self, model: str):
        return self.inner.rotation(model)

    def token_embeddings(self, model: str, input_ids: Tensor) -> Tensor:
        return self.inner.token_embeddings(model, input_ids)

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        if model not in self.blocks:
            raise KeyError(f"no modules of model {model!r}; have {sorted(self.blocks)}")
        if input_ids.shape[1] != self.prompt_len or not bool((input_ids == input_ids[:, :1]).all()):
            raise ValueError(f"a module batch's prefix is its task index repeated p={self.prompt_len} times; got "
                             f"shape {tuple(input_ids.shape)}")
        rows = input_ids[:, 0].long()  # [B] task indices
        b = self.blocks[model]
        return KVBlock(b.keys[rows], b.values[rows], b.n_kv_heads)  # [B, p, L, D]

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        return self.inner.suffix_loss_and_grad(model, block, suffix_ids)

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        return self.inner.suffix_nll(model, block, suffix_ids)

    def attention_received(self, model: str, block: KVBlock, suffix_ids: Tensor) -> Tensor:
        return self.inner.attention_received(model, block, suffix_ids)

    def refresh(self, model: str, block: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int) -> KVBlock:
        return self.inner.refresh(model, block, ids, read_ids, share, skip)


Tasks = Sequence[Task] | Mapping[str, Sequence[Task]]
"""Meta-train tasks: one list every model reads (one tokenizer), or each model's own list of the same tasks."""


def task_batch(indices: Tensor, tasks: Tasks, names: Sequence[str], prompt_len: int, key: str = "") -> Batch:
    """The batch of tasks ``indices`` ``[B]``: prefix = each task's index repeated ``p`` times, suffix = its
    held-out ids in each model's own tokens; ``[B, p + eval_len]`` for every model (models that share a task
    list share one tensor)."""
    handle = indices.long()[:, None].expand(-1, prompt_len)  # [B, p]
    own, rows = per_member(tasks, names), {}
    for ts in own.values():
        if id(ts) not in rows:
            held = held_out_ids([ts[i] for i in indices.tolist()])  # [B, eval_len]
            rows[id(ts)] = torch.cat([handle, held], dim=1)  # [B, p + eval_len]
    return Batch({n: rows[id(ts)] for n, ts in own.items()}, prompt_len, key)


def meta_batches(tasks: Tasks, names: Sequence[str], prompt_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Endless batches of this rank's meta-train tasks (task t goes to rank ``t % world_size``), in a
    seeded order reshuffled each epoch (:func:`kvlingua.schedule.epoch_order`)."""
    tasks = per_member(tasks, names)
    count = len(next(iter(tasks.values())))
    mine = torch.arange(count)[torch.arange(count) % world_size == rank]
    if len(mine) < batch_size:
        raise ValueError(f"rank {rank} has {len(mine)} meta-train tasks, fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        order = mine[epoch_order(len(mine), seed, epoch)]
        for b in range(len(order) // batch_size):
            yield task_batch(order[b * batch_size:(b + 1) * batch_size], tasks, names, prompt_len,
                             f"meta/e{epoch}/b{b:05d}")
        epoch += 1


def meta_train(space: SharedSpace, backend: PoolBackend, blocks: dict[str, KVBlock], tasks: Tasks,
               cfg: MetaConfig, *, runtime: Runtime | None = None, eval_fn=None,
               state: TrainState | None = None, checkpoint_fn=None) -> TrainState:
    """Meta-train ``space`` on the modules ``blocks`` (``[T, p, L, D]`` per model) of ``tasks`` (one list, or each
    model's own, row t of every model's blocks being task t).

    ``eval_fn(step)`` (rank 0) gets called every ``cfg.train.eval_every`` steps, as in ``fit``.
    Tasks seen after ``step`` steps: ``step * cfg.batch_size * runtime.world_size``.
    """
    runtime = runtime or Runtime()
    modules = ModuleBackend(backend, blocks)
    train = cfg.loop(space.names)
    batches = meta_batches(tasks, space.names, modules.prompt_len, cfg.batch_size, train.seed, runtime.rank,
                           runtime.world_size)
    if state is not None:  # a resumed run continues with the batches from its step on
        batches = islice(batches, state.step, None)
    return fit(space, modules, batches, train, runtime=runtime, state=state, eval_fn=eval_fn,
               checkpoint_fn=checkpoint_fn, view=module_view(space.cfg), fresh=False)
