"""Soft prompts of a frozen model: ``p`` virtual tokens as trainable input embeddings (prompt tuning).

A soft prompt of a model with residual width ``H`` is a tensor ``[p, H]`` in the space of its
input embeddings (the rows ``embed_tokens`` gives real tokens; a model that rescales its input
embeddings, as Gemma-2 does by ``sqrt(H)``, rescales these the same way). The model stays frozen.

* :func:`prompt_block` — the module's KV block: the model's cache after reading the ``p``
  virtual tokens, ``[T, p, L, D]`` for ``T`` prompts; differentiable in the prompts.
* :func:`init_prompts` — ``T`` prompts initialised as the embeddings of random vocabulary
  tokens (seeded per task); the *random prompt* of the evaluation is this initialisation.
* :func:`learn_prompts` — prompt tuning of ``T`` tasks at once (tasks along the batch
  dimension): the loss of task ``t`` is the NLL of its examples read after its own prompt's
  block (:func:`kvlingua.backend.suffix_token_nll`, the metric every condition is scored
  with). Adam is element-wise and the summed loss gives each prompt exactly its own
  task's gradient, so batching changes the arithmetic's grouping, not the result.
* :class:`Module` + :func:`save_module` / :func:`load_module` — a module file is safetensors:
  tensor ``prompt`` ``[p, H]`` and, in the header, the pool name and weight fingerprint of
  the model it was learned on, the task and the prompt config. :func:`check_module` refuses a
  module on any other model with one line.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from kvlingua.backend import suffix_token_nll
from kvlingua.cache import KVBlock, arch_summary, block_from_cache, cache_kwargs, returned_cache
from kvlingua.config import KvlinguaError
from kvlingua.schedule import warmup_cosine

MODULE_FORMAT = "kvlingua-module/1"
"""``format`` entry of a module file's header."""


class ModuleError(KvlinguaError, ValueError):
    """A module cannot be used where it was asked for (other model, unreadable file, prompt too long)."""


@dataclass(frozen=True)
class PromptConfig:
    """How soft prompts are learned (the ``prompt`` section of a modules config)."""

    length: int = 8
    """p: virtual tokens per soft prompt."""
    steps: int = 100
    """Adam steps of prompt tuning (every task of a batch takes each step)."""
    lr: float = 0.1
    """Peak learning rate (warm-up + cosine, :func:`kvlingua.schedule.warmup_cosine`)."""
    warmup_frac: float = 0.05
    """Warm-up share of ``steps``."""
    tasks_per_batch: int = 128
    """Tasks tuned together along the batch dimension (memory vs. speed; results do not depend on it)."""
    seed: int = 0
    """Seed of the initial prompts (per task) and of the example windows each step draws."""

    def __post_init__(self) -> None:
        for name in ("length", "steps", "tasks_per_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")

    def digest(self) -> str:
        """Short digest of what determines a learned prompt (everything but ``tasks_per_batch``)."""
        import hashlib

        key = {"length": self.length, "steps": self.steps, "lr": self.lr, "warmup_frac": self.warmup_frac,
               "seed": self.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def input_embeddings(model: PreTrainedModel) -> torch.nn.Embedding:
    """The model's input embedding table ``[V, H]``."""
    return model.get_input_embeddings()


def prompt_block(model: PreTrainedModel, prompts: Tensor) -> KVBlock:
    """The model's KV block after reading soft prompts: ``[T, p, H]`` -> keys/values ``[T, p, L, D]``.

    One forward with ``inputs_embeds = prompts`` into an empty ``DynamicCache`` (full length on
    sliding-window layers, as :func:`kvlingua.cache.extract_prefix`); differentiable w.r.t. ``prompts``.
    The block is on the model's device and dtype.
    """
    if prompts.dim() != 3:
        raise ValueError(f"prompts must be [T, p, H], got shape {tuple(prompts.shape)}")
    summary = arch_summary(model)
    if prompts.shape[-1] != summary.hidden_size:
        raise ModuleError(f"soft prompt width {prompts.shape[-1]} does not fit a model of hidden size "
                          f"{summary.hidden_size}")
    weight = input_embeddings(model).weight
    cache = DynamicCache()
    out = model(inputs_embeds=prompts.to(weight.device, weight.dtype), use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, cache))
    return block_from_cache(returned_cache(model, out), summary.n_kv_heads)  # [T, p, L, D]


def task_generator(seed: int, task: str) -> torch.Generator:
    """A generator seeded by ``seed`` and the task's name: a task's draws do not depend on its batch."""
    import zlib

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(task.encode()))


def init_prompts(model: PreTrainedModel, tasks: list[str], length: int, seed: int) -> Tensor:
    """Initial soft prompts ``[T, p, H]``: embeddings of ``p`` vocabulary tokens drawn per task.

    Drawn from the task name and ``seed`` only (:func:`task_generator`), so a task's initial
    (and *random*) prompt is the same whichever tasks it is learned with.
    """
    table = input_embeddings(model).weight.detach()  # [V, H]
    ids = torch.stack([torch.randint(0, table.shape[0], (length,), generator=task_generator(seed, t))
                       for t in tasks])  # [T, p]
    return table[ids.to(table.device)].float().cpu()  # [T, p, H]


def prompt_nll(model: PreTrainedModel, prompts: Tensor | None, ids: Tensor) -> Tensor:
    """Per-token NLL ``[T, S-1]`` of ``ids[:, 1:]`` read after each task's prompt (``None``: no prompt)."""
    block = prompt_block(model, prompts) if prompts is not None else None
    return suffix_token_nll(model, block, ids.to(input_embeddings(model).weight.device))


def learn_prompts(model: PreTrainedModel, tasks: list[str], examples: Callable[[int], Tensor], cfg: PromptConfig,
                  init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prompt tuning of ``T`` tasks at once; the model is frozen and only the prompts move.

    Args:
        model: the frozen causal LM.
        tasks: the ``T`` task names (seed the initial prompts).
        examples: ``examples(step) -> [T, S]`` token ids, row ``t`` a training window of task ``t``.
        cfg: prompt length, steps, learning rate.
        init: initial prompts ``[T, p, H]`` (default :func:`init_prompts`).

    Returns:
        ``(prompts [T, p, H] fp32 CPU, last_loss [T])``: the learned prompts and each task's mean
        NLL at the last step.
    """
    start = init if init is not None else init_prompts(model, tasks, cfg.length, cfg.seed)
    prompts = start.detach().clone().requires_grad_(True)  # [T, p, H]
    opt = torch.optim.Adam([prompts], lr=cfg.lr)
    sched = warmup_cosine(opt, cfg.steps, cfg.warmup_frac)
    last = torch.zeros(len(tasks))
    with torch.enable_grad():
        for step in range(cfg.steps):
            ids = examples(step)  # [T, S]
            if ids.shape[0] != len(tasks):
                raise ValueError(f"examples({step}) gave {ids.shape[0]} rows for {len(tasks)} tasks")
            per_task = prompt_nll(model, prompts, ids).mean(dim=1)  # [T]
            opt.zero_grad(set_to_none=True)
            per_task.sum().backward()  # each prompt gets its own task's gradient
            opt.step()
            sched.step()
            last = per_task.detach().float().cpu()
    return prompts.detach().float().cpu(), last


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Module:
    """A soft prompt learned on one model for one task."""

    prompt: Tensor
    """``[p, H]`` fp32: the virtual tokens' input embeddings."""
    model: str
    """Pool name of the model it was learned on."""
    fingerprint: str
    """:func:`kvlingua.cache.fingerprint` of that model's weights."""
    task: str
    """Name of the task it was learned for (e.g. ``en/19.23``)."""
    info: dict = field(default_factory=dict)
    """Anything else recorded with it (prompt config, last training loss)."""

    def __post_init__(self) -> None:
        if self.prompt.dim() != 2:
            raise ValueError(f"a module's prompt is [p, H], got shape {tuple(self.prompt.shape)}")

    @property
    def length(self) -> int:
        """p: virtual tokens."""
        return self.prompt.shape[0]


def save_module(path: str | Path, module: Module) -> Path:
    """Write ``module`` as safetensors (tensor ``prompt``; model, fingerprint, task, info in the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": MODULE_FORMAT, "model": module.model, "fingerprint": module.fingerprint,
              "task": module.task, "info": json.dumps(module.info)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"prompt": module.prompt.detach().float().contiguous()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_module(path: str | Path) -> Module:
    """Read a module file; a missing, unreadable or foreign file is a one-line :class:`ModuleError`."""
    path = Path(path)
    if not path.is_file():
        raise ModuleError(f"{path}: module file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != MODULE_FORMAT or "prompt" not in f.keys():
                raise ModuleError(f"{path}: not a kvlingua module (format {header.get('format')!r}, "
                                  f"expected {MODULE_FORMAT!r} with a 'prompt' tensor)")
            prompt = f.get_tensor("prompt")
    except SafetensorError as e:
        raise ModuleError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        return Module(prompt, header["model"], header["fingerprint"], header["task"], json.loads(header["info"]))
    except (KeyError, ValueError) as e:
        raise ModuleError(f"{path}: damaged module header ({e})") from e


def check_module(module: Module, model: str, fingerprint: str) -> None:
    """Refuse ``module`` unless it was learned on exactly this model (name and weights)."""
    if module.fingerprint != fingerprint:
        raise ModuleError(
            f"module {module.task!r} was learned on a model with fingerprint {module.fingerprint[:12]}.. "
            f"({module.model!r}); model {model!r} has fingerprint {fingerprint[:12]}..: a soft prompt only "
            f"means something to the model it was learned on (port it through Σ instead)")
