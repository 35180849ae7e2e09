"""Prompt-recovery tasks from the corpus: a chapter is a task, its verses are the examples.

The paper's tasks (§6) are a hidden context C and texts written under it; a soft prompt must
recover C's effect from the texts alone and is scored by the likelihood of held-out texts of
the same task. A corpus chapter gives that for free: its topic, names and style are the hidden
context, its verses the texts. Per task (one chapter in one language):

* ``held_out`` verses, drawn by a seed, are set aside; the first ``eval_len`` tokens of their
  concatenation (:attr:`Task.held_out`, ``[eval_len]``) score every condition;
* the other verses, concatenated (:attr:`Task.train`, ``[N]``), are what a soft prompt is
  learned from, ``train_len``-token windows at a time (:func:`example_windows`).

Meta-train and meta-test tasks come from disjoint corpus splits, and the corpus splits by
chapter (:func:`kvlingua.data.corpus.split_of`), so they never share a verse. A chapter in
each of the pool's languages is a separate task: the full corpus gives about 3,200
meta-train tasks (train split) and about 340 meta-test tasks (validation + test splits);
chapters too short for the lengths asked are skipped.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvlingua.data.corpus import LANGS, SPLITS, load_split
from kvlingua.modules.prompt import task_generator

ROLES = ("meta-train", "meta-test")


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks, and how long their texts are (the ``tasks`` section of a modules config)."""

    langs: tuple[str, ...] = ("en", "es", "ru")
    """Languages of the tasks: each chapter in each of these is one task."""
    held_out: int = 4
    """Verses per chapter held out for scoring."""
    train_len: int = 32
    """Tokens per training window of a soft prompt."""
    eval_len: int = 48
    """Held-out tokens scored per task (the suffix the target reads after a module)."""
    meta_train: int = 500
    """Meta-train tasks used (a seeded choice among the eligible ones)."""
    meta_test: int = 100
    """Meta-test tasks used."""
    meta_train_splits: tuple[str, ...] = ("train",)
    """Corpus splits the meta-train tasks come from."""
    meta_test_splits: tuple[str, ...] = ("validation", "test")
    """Corpus splits the meta-test tasks come from (disjoint from ``meta_train_splits``)."""
    seed: int = 0
    """Seed of the held-out verses and of the choice of tasks."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.langs) - set(LANGS))
        if not self.langs or bad:
            raise ValueError(f"langs must be among {list(LANGS)}, got {list(self.langs)}")
        for name in ("held_out", "train_len", "eval_len", "meta_train", "meta_test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name.endswith("_len") else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name.endswith('_len') else 1}, got {v!r}")
        for name in ("meta_train_splits", "meta_test_splits"):
            splits = getattr(self, name)
            if not splits or set(splits) - set(SPLITS):
                raise ValueError(f"{name} must be among {list(SPLITS)}, got {list(splits)}")
        shared = sorted(set(self.meta_train_splits) & set(self.meta_test_splits))
        if shared:
            raise ValueError(f"meta-train and meta-test tasks must come from disjoint splits; both use {shared}")

    def splits(self, role: str) -> tuple[str, ...]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
        return self.meta_train_splits if role == "meta-train" else self.meta_test_splits

    def count(self, role: str) -> int:
        return self.meta_train if role == "meta-train" else self.meta_test


@dataclass(frozen=True)
class Task:
    """One prompt-recovery task."""

    name: str
    """``<lang>/<book>.<chapter>`` (e.g. ``en/19.23``)."""
    train: Tensor
    """``[N]`` token ids: the task's example verses (held-out ones removed), concatenated."""
    held_out: Tensor
    """``[eval_len]`` token ids: the start of its held-out verses, concatenated."""


def chapter_task(name: str, verses: Sequence[Sequence[int]], cfg: TaskConfig) -> Task | None:
    """The task of one chapter's tokenised verses, or ``None`` if it is too short for ``cfg``'s lengths."""
    if len(verses) <= cfg.held_out:
        return None
    g = task_generator(cfg.seed, name)
    held = set(torch.randperm(len(verses), generator=g)[: cfg.held_out].tolist())
    train = [t for i, v in enumerate(verses) if i not in held for t in v]
    test = [t for i, v in enumerate(verses) if i in held for t in v]
    if len(train) < cfg.train_len or len(test) < cfg.eval_len:
        return None
    return Task(name, torch.tensor(train, dtype=torch.long), torch.tensor(test[: cfg.eval_len], dtype=torch.long))


def choose(tasks: list[Task], n: int, seed: int, what: str) -> list[Task]:
    """``n`` of ``tasks`` by a seeded choice, in name order; a clear error when there are fewer."""
    if len(tasks) < n:
        raise ValueError(f"{what}: the corpus gives only {len(tasks)} eligible tasks, {n} asked for "
                         f"(lower the count or the lengths)")
    pick = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return sorted((tasks[i] for i in pick), key=lambda t: t.name)


def corpus_tasks(tokenizer, cfg: TaskConfig, role: str) -> list[Task]:
    """The ``meta-train`` or ``meta-test`` tasks of the prepared corpus (``cfg.count(role)`` of them)."""
    tasks = []
    for split in cfg.splits(role):
        table = load_split(split).to_dict()
        for lang in cfg.langs:
            ids = tokenizer([" " + t for t in table[lang]], add_special_tokens=False)["input_ids"]
            chapters: dict[tuple[int, int], list[list[int]]] = {}
            for book, chapter, verse_ids in zip(table["book"], table["chapter"], ids):
                chapters.setdefault((book, chapter), []).append(verse_ids)
            for (book, chapter), verses in sorted(chapters.items()):
                task = chapter_task(f"{lang}/{book}.{chapter}", verses, cfg)
                if task is not None:
                    tasks.append(task)
    return choose(tasks, cfg.count(role), cfg.seed, f"{role} tasks from splits {list(cfg.splits(role))}")


def example_windows(tasks: Sequence[Task], length: int, seed: int) -> Callable[[int], Tensor]:
    """``step -> [T, length]``: a random window of each task's training text, drawn per (task, step).

    A task's windows depend on its name, ``seed`` and the step only, not on its batch.
    """
    bases = [int(torch.randint(0, 2**31 - 1, (), generator=task_generator(seed, t.name))) for t in tasks]

    def windows(step: int) -> Tensor:
        rows = []
        for base, t in zip(bases, tasks):
            g = torch.Generator().manual_seed(base + step)
            start = int(torch.randint(0, len(t.train) - length + 1, (), generator=g))
            rows.append(t.train[start:start + length])
        return torch.stack(rows)  # [T, length]

    return windows


def held_out_ids(tasks: Sequence[Task]) -> Tensor:
    """``[T, eval_len]``: every task's held-out tokens."""
    return torch.stack([t.held_out for t in tasks])
