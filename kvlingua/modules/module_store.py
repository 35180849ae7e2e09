"""Modules learned once and kept: one file per (model weights, prompt config, task).

``<root>/<fingerprint[:16]>-<PromptConfig.digest()>/<lang>/<book>.<chapter>.safetensors``. A
module is reused when its file exists and was learned from the same task text (the SHA-256 of
the task's training tokens is recorded with it); missing or stale ones are learned, many at a
time (:func:`kvlingua.modules.prompt.learn_prompts`, ``tasks_per_batch`` along the batch).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from kvlingua.cache import fingerprint as weights_fingerprint
from kvlingua.modules.prompt import Module, ModuleError, PromptConfig, learn_prompts, load_module, save_module
from kvlingua.modules.tasks import Task, example_windows


def task_digest(task: Task) -> str:
    """SHA-256 (16 hex) of a task's training tokens: a module learned from other text is stale."""
    return hashlib.sha256(task.train.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class ModuleStore:
    """A directory of learned modules (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.learned = 0
        """Modules :meth:`learn` learned (not read from the store) since this object was made."""
        self.read = 0
        """Modules :meth:`learn` read back from the store since this object was made."""

    def directory(self, fingerprint: str, cfg: PromptConfig) -> Path:
        return self.root / f"{fingerprint[:16]}-{cfg.digest()}"

    def path(self, fingerprint: str, cfg: PromptConfig, task: str) -> Path:
        return self.directory(fingerprint, cfg) / f"{task}.safetensors"

    def _cached(self, fingerprint: str, cfg: PromptConfig, task: Task) -> Module | None:
        path = self.path(fingerprint, cfg, task.name)
        if not path.is_file():
            return None
        try:
            module = load_module(path)
        except ModuleError:
            return None  # damaged (an interrupted write never lands: files are renamed into place)
        ok = module.fingerprint == fingerprint and module.info.get("task_sha") == task_digest(task)
        return module if ok else None

    def learn(self, name: str, model: PreTrainedModel, tasks: Sequence[Task], cfg: PromptConfig, train_len: int,
              log: Callable[[str], None] | None = None, fingerprint: str | None = None) -> list[Module]:
        """The modules of ``tasks`` on ``model`` (pool name ``name``): read where kept, learned where not.

        Returns the modules in the order of ``tasks``.
        """
        fp = fingerprint or weights_fingerprint(model)
        found = {t.name: self._cached(fp, cfg, t) for t in tasks}
        todo = [t for t in tasks if found[t.name] is None]
        self.learned += len(todo)
        self.read += len(tasks) - len(todo)
        for start in range(0, len(todo), cfg.tasks_per_batch):
            batch = todo[start:start + cfg.tasks_per_batch]
            if log:
                log(f"{name}: learning soft prompts {start + 1}-{start + len(batch)} of {len(todo)} "
                    f"({len(tasks) - len(todo)} kept)")
            prompts, losses = learn_prompts(model, [t.name for t in batch], example_windows(batch, train_len, cfg.seed),
                                            cfg)
            for t, prompt, loss in zip(batch, prompts, losses.tolist()):
                info = {"task_sha": task_digest(t), "train_loss": round(loss, 5), "prompt": cfg.digest()}
                module = Module(prompt, name, fp, t.name, info)
                save_module(self.path(fp, cfg, t.name), module)
                found[t.name] = module
        return [found[t.name] for t in tasks]
