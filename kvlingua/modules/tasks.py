"""Prompt-recovery tasks from the corpus: a chapter is a task, its verses are the examples.

The paper's tasks (§6) are a hidden context C and texts written under it; a soft prompt must
recover C's effect from the texts alone and is scored by the likelihood of held-out texts of
the same task. A corpus chapter gives that for free: its topic, names and style are the hidden
context, its verses the texts. Per task (one chapter in one language):

* ``held_out`` verses, drawn by a seed on the chapter's verse indices (:func:`held_verses`), are
  set aside; the first ``eval_len`` tokens of their concatenation (:attr:`Task.held_out`,
  ``[eval_len]``) score every condition;
* the other verses, concatenated (:attr:`Task.train`, ``[N]``), are what a soft prompt is
  learned from, ``train_len``-token windows at a time (:func:`example_windows`).

A task is text first: each pool member reads the same verses with its own tokenizer (each verse
as ``" " + verse``, no special tokens), so :func:`member_tasks` gives every member its own
:class:`Task` of each task (same names, same order, same held-out verses; ids in that member's
vocabulary). A chapter is eligible only where it is long enough in *every* member's tokens, and
the seeded choice is made among the eligible chapters, so the chosen tasks are one named set for
the whole pool. With one tokenizer this is exactly the single-tokenizer task list.

Meta-train and meta-test tasks come from disjoint corpus splits, and the corpus splits by
chapter (:func:`kvlingua.data.corpus.split_of`), so they never share a verse. A chapter in
each of the pool's languages is a separate task: the full corpus gives about 3,200
meta-train tasks (train split) and about 340 meta-test tasks (validation + test splits);
chapters too short for the lengths asked are skipped.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    """One prompt-recovery task as one tokenizer reads it (:func:`member_tasks` gives each member its own)."""

    name: str
    """``<lang>/<book>.<chapter>`` (e.g. ``en/19.23``)."""
    train: Tensor
    """``[N]`` token ids: the task's example verses (held-out ones removed), each tokenised, concatenated."""
    held_out: Tensor
    """``[eval_len]`` token ids: the start of its held-out verses, concatenated."""


def held_verses(name: str, n_verses: int, cfg: TaskConfig) -> set[int]:
    """Indices of the ``cfg.held_out`` verses of a chapter of ``n_verses`` set aside for scoring (seeded by the
    task's name and ``cfg.seed``, drawn on verse indices: the same verses whatever tokenizer reads them)."""
    g = task_generator(cfg.seed, name)
    return set(torch.randperm(n_verses, generator=g)[: cfg.held_out].tolist())


def chapter_task(name: str, verses: Sequence[Sequence[int]], cfg: TaskConfig) -> Task | None:
    """The task of one chapter's tokenised verses, or ``None`` if it is too short for ``cfg``'s lengths."""
    if len(verses) <= cfg.held_out:
        return None
    held = held_verses(name, len(verses), cfg)
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


Chapter = tuple[str, list[str]]
"""A task's text: its name (``<lang>/<book>.<chapter>``) and the chapter's verses, in order."""


def corpus_chapters(cfg: TaskConfig, role: str) -> list[Chapter]:
    """Every chapter of ``role``'s splits in ``cfg.langs``, as text: split by split, language by language,
    chapters in (book, chapter) order (the order the seeded choice of tasks is made in)."""
    out: list[Chapter] = []
    for split in cfg.splits(role):
        table = load_split(split).to_dict()
        for lang in cfg.langs:
            chapters: dict[tuple[int, int], list[str]] = {}
            for book, chapter, text in zip(table["book"], table["chapter"], table[lang]):
                chapters.setdefault((book, chapter), []).append(text)
            out += [(f"{lang}/{book}.{chapter}", verses) for (book, chapter), verses in sorted(chapters.items())]
    return out


def choose_tasks(chapters: Sequence[Chapter], tokenizers: Mapping[str, object], cfg: TaskConfig, n: int,
                 what: str) -> dict[str, list[Task]]:
    """``n`` tasks of ``chapters`` for every member: ``{member: [Task]}``, the same names in the same order.

    Each distinct tokenizer reads every verse once (``" " + verse``, no special tokens); a chapter is eligible
    where :func:`chapter_task` keeps it for every tokenizer, and :func:`choose` picks among the eligible ones
    in ``chapters``' order. Members that share one tokenizer object share one list of :class:`Task`.
    """
    if not tokenizers:
        raise ValueError("tasks need at least one member's tokenizer")
    distinct: dict[int, object] = {id(tok): tok for tok in tokenizers.values()}
    flat = [" " + v for _, verses in chapters for v in verses]
    per_tok: dict[int, list[Task | None]] = {}
    for key, tok in distinct.items():
        ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        tasks, at = [], 0
        for name, verses in chapters:
            tasks.append(chapter_task(name, ids[at:at + len(verses)], cfg))
            at += len(verses)
        per_tok[key] = tasks
    first = per_tok[next(iter(distinct))]
    eligible = [c for c in range(len(chapters)) if all(ts[c] is not None for ts in per_tok.values())]
    chosen = choose([first[c] for c in eligible], n, cfg.seed, what)
    index = {t.name: c for c, t in zip(eligible, (first[c] for c in eligible))}
    lists = {key: [ts[index[t.name]] for t in chosen] for key, ts in per_tok.items()}
    return {m: lists[id(tok)] for m, tok in tokenizers.items()}


def member_tasks(tokenizers: Mapping[str, object], cfg: TaskConfig, role: str) -> dict[str, list[Task]]:
    """The ``meta-train`` or ``meta-test`` tasks of the prepared corpus (``cfg.count(role)`` of them), for every
    member in its own tokens (:func:`choose_tasks`)."""
    return choose_tasks(corpus_chapters(cfg, role), tokenizers, cfg, cfg.count(role),
                        f"{role} tasks from splits {list(cfg.splits(role))}")


def corpus_tasks(tokenizer, cfg: TaskConfig, role: str) -> list[Task]:
    """:func:`member_tasks` of one tokenizer: the tasks as that tokenizer's ids."""
    return member_tasks({"": tokenizer}, cfg, role)[""]


def per_member(tasks: Sequence[Task] | Mapping[str, Sequence[Task]], names: Sequence[str]) -> dict[str, Sequence[Task]]:
    """``{member: its tasks}`` for ``names``: a plain list is every member's (one tokenizer); a mapping must give
    every member its own tasks with the same names in the same order."""
    if not isinstance(tasks, Mapping):
        return {n: tasks for n in names}
    missing = [n for n in names if n not in tasks]
    if missing:
        raise ValueError(f"no tasks for model(s) {missing}; have {sorted(tasks)}")
    order = [t.name for t in tasks[names[0]]] if names else []
    for n in names[1:]:
        if [t.name for t in tasks[n]] != order:
            raise ValueError(f"model {n!r}'s tasks are not {names[0]!r}'s (the same names in the same order)")
    return {n: tasks[n] for n in names}


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
