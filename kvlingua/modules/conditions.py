"""The conditions of module portability (paper §6) and the meta-training run, shared by every modules command.

:class:`ModulesConfig` names a trained pool (Σ pre-trained by ``kvlingua train`` without the
reconstruction loss), optionally a second one trained with it over the same models, the tasks,
the prompt tuning and meta-training. :func:`prepare` loads the pool, builds the tasks and learns
(or reuses, :class:`~kvlingua.modules.module_store.ModuleStore`) every model's modules;
:func:`condition_nll` scores a condition per meta-test task, :func:`ported_nll` a module ported
through Σ; :func:`run_meta_training` meta-trains Σ (one rank's share). The experiment
(``experiments.modules.experiment``) scores, for both directions of every pair of models, on the
meta-test tasks:

* ``none`` — the target with no prompt; ``random`` — the target's initial (untrained) soft
  prompt, the lower bound; ``direct`` — a soft prompt learned on the target, the upper bound;
* ``ported/<start>`` before meta-training, Σ from each start: ``pretrained`` (the pool),
  ``pretrained-recon`` (the second pool), ``random`` (fresh adapters);
* ``meta/<start>`` after meta-training from each start, and its curve against the number of
  meta-train tasks seen (with the spread over meta-test tasks);

and the share of the gap recovered, ``(NLL_random - NLL_x) / (NLL_random - NLL_direct)``
(:func:`gap_recovered`).

The pool's members may tokenize differently: the tasks are text (:func:`kvlingua.modules.tasks.member_tasks`),
each member learns its modules on its own tokens of a task and every target is scored on its own tokens of the
task's held-out verses, so an NLL is always the target's, in its vocabulary, and the conditions of one target
compare. A member without a tokenizer is refused (:func:`load_modules_pool`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.cache import KVBlock
from kvlingua.config import ConfigError, to_dict
from kvlingua.home import data_home
from kvlingua.modules.meta import MetaConfig, meta_train
from kvlingua.modules.port import MODULES_KEY
from kvlingua.modules.prompt import PromptConfig, init_prompts, prompt_block
from kvlingua.modules.module_store import ModuleStore
from kvlingua.modules.tasks import Task, TaskConfig, held_out_ids, member_tasks
from kvlingua.view import module_view, translate_cache
from kvlingua.pool import LoadedPool, load_pool, save_pool, TOKENIZER_DIR
from kvlingua.pool_members import PoolMismatchError
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.tracking import NullTracker, Tracker

STARTS = ("pretrained", "pretrained-recon", "random")


@dataclass(frozen=True)
class ModulesConfig:
    """A modules run: pool, tasks, prompt tuning, meta-training (``configs/modules/*.yaml``)."""

    pool: str
    """A trained pool directory (``kvlingua train``; Σ pre-trained without the reconstruction loss)."""
    pool_recon: str | None = None
    """A pool over the same models whose Σ was trained with the reconstruction loss (Table 4); optional."""
    out_dir: str = "runs/modules"
    """Where results, the meta-trained pool and the MLflow store go."""
    store: str | None = None
    """Module store directory; default ``$KVLINGUA_HOME/modules``."""
    results: str | None = "docs/results/modules.md"
    """Where the experiment writes its Markdown (plot and JSON beside it); None: only into ``out_dir``."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    """The prompt-recovery tasks."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt tuning."""
    meta: MetaConfig = field(default_factory=MetaConfig)
    """Meta-training (``meta.init`` is the start of ``kvlingua modules meta-train``)."""
    starts: tuple[str, ...] = STARTS
    """Σ starts the experiment scores before and after meta-training (``pretrained-recon`` needs ``pool_recon``)."""
    eval_batch: int = 64
    """Tasks scored per forward."""
    threads: int = 2
    """torch threads."""
    tracking: bool = True
    """Record meta-training in MLflow (``<out_dir>/mlflow.db``)."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.starts) - set(STARTS))
        if not self.starts or bad:
            raise ValueError(f"starts must be among {list(STARTS)}, got {list(self.starts)}")
        if "pretrained-recon" in self.starts and self.pool_recon is None:
            raise ValueError("starts names 'pretrained-recon' but pool_recon is not set")
        if self.eval_batch < 1 or self.threads < 1:
            raise ValueError("eval_batch and threads must be >= 1")

    def store_dir(self) -> Path:
        return Path(self.store) if self.store else data_home() / "modules"


@dataclass
class Setup:
    """A pool with its tasks and every model's modules of them."""

    pool: LoadedPool
    backend: LocalBackend
    tasks: dict[str, dict[str, list[Task]]]
    """role (``meta-train``, ``meta-test``) -> model -> its tasks in its own tokens: the same names in the same
    order for every model (empty for a role not prepared)."""
    train_blocks: dict[str, KVBlock]
    """model -> blocks of its meta-train modules ``[T_train, p, L, D]``."""
    test_blocks: dict[str, KVBlock]
    """model -> blocks of its meta-test modules (the *direct* prompts) ``[T_test, p, L, D]``."""
    random_blocks: dict[str, KVBlock]
    """model -> blocks of its initial (untrained) prompts of the meta-test tasks."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)
    """``{"learned": n, "read": m}``: modules learned by this run and read back from the module store."""

    def task_names(self, role: str) -> list[str]:
        """The names of ``role``'s tasks (one list for every model)."""
        return [t.name for t in next(iter(self.tasks[role].values()), [])]


def load_modules_pool(path: str | Path) -> LoadedPool:
    """A pool with its models and every member's tokenizer (each member reads the tasks' text with its own)."""
    pool = load_pool(path)
    lacking = [m.name for m in pool.members if pool.tokenizers.get(m.name) is None]
    if lacking:
        raise PoolMismatchError(f"{pool.root}: member(s) {lacking} have no tokenizer; modules need each member's "
                                "to read the tasks' text")
    return pool


@torch.no_grad()
def blocks_of(model, prompts: Tensor, chunk: int) -> KVBlock:
    """:func:`prompt_block` of ``[T, p, H]`` prompts, ``chunk`` at a time; fp32 CPU ``[T, p, L, D]``."""
    parts = [prompt_block(model, prompts[s:s + chunk]).map(lambda t: t.float().cpu()) for s in range(0, len(prompts), chunk)]
    return KVBlock(torch.cat([b.keys for b in parts]), torch.cat([b.values for b in parts]), parts[0].n_kv_heads)


def prepare(cfg: ModulesConfig, log: Callable[[str], None] = print, roles: Sequence[str] = ("meta-train", "meta-test"),
            pool: LoadedPool | None = None) -> Setup:
    """Load the pool, build the tasks of ``roles`` (each model's own tokens of them) and learn (or reuse) every
    model's modules of them, each on its own tokens."""
    pool = pool or load_modules_pool(cfg.pool)
    backend = LocalBackend(pool.models)
    fps = {m.name: m.fingerprint for m in pool.members}
    store = ModuleStore(cfg.store_dir())
    toks = {name: pool.tokenizers[name] for name in pool.models}
    tasks = {role: member_tasks(toks, cfg.tasks, role) if role in roles else {name: [] for name in pool.models}
             for role in ("meta-train", "meta-test")}
    blocks: dict[str, dict[str, KVBlock]] = {"meta-train": {}, "meta-test": {}, "random": {}}
    for name, model in pool.models.items():
        for role, per_model in tasks.items():
            ts = per_model[name]
            if not ts:
                continue
            mods = store.learn(name, model, ts, cfg.prompt, cfg.tasks.train_len, log=log, fingerprint=fps[name])
            blocks[role][name] = blocks_of(model, torch.stack([m.prompt for m in mods]), cfg.eval_batch)
        if tasks["meta-test"][name]:
            init = init_prompts(model, [t.name for t in tasks["meta-test"][name]], cfg.prompt.length, cfg.prompt.seed)
            blocks["random"][name] = blocks_of(model, init, cfg.eval_batch)
    setup = Setup(pool, backend, tasks, blocks["meta-train"], blocks["meta-test"], blocks["random"], fps,
                  {"learned": store.learned, "read": store.read})
    log(f"store: {store.root} ({len(setup.task_names('meta-train'))} meta-train, "
        f"{len(setup.task_names('meta-test'))} meta-test tasks per model; {store.learned} learned now, "
        f"{store.read} read back)")
    return setup


@torch.no_grad()
def condition_nll(backend: PoolBackend, target: str, blocks: KVBlock | None, tasks: Sequence[Task], chunk: int,
                  translate: Callable[[KVBlock], KVBlock] | None = None) -> Tensor:
    """Mean held-out NLL per task ``[T]`` of ``target`` after ``blocks`` (row t before task t; None: no prompt),
    each chunk passed through ``translate`` first when given (a path through Σ). ``tasks`` are the target's own
    (its tokens of the held-out verses)."""
    held = held_out_ids(tasks)  # [T, eval_len]
    out = []
    for s in range(0, len(tasks), chunk):
        block = None
        if blocks is not None:
            block = KVBlock(blocks.keys[s:s + chunk], blocks.values[s:s + chunk], blocks.n_kv_heads)
            block = translate(block) if translate is not None else block
        out.append(backend.suffix_nll(target, block, held[s:s + chunk]).mean(dim=1))  # [chunk]
    return torch.cat(out)


def ported_nll(space: SharedSpace, setup: Setup, source: str, target: str, chunk: int, shift: int = 0) -> Tensor:
    """Per meta-test task NLL of ``target`` (on its own tokens) after ``source``'s modules ported through ``space``.

    ``shift > 0`` is the content control: task t is scored after the module of task ``(t + shift) mod T``
    (another chapter's), so what a ported module adds beyond what any ported module adds is
    ``NLL(shift=0) − NLL(shift)``.
    """
    blocks = setup.test_blocks[source]
    if shift:
        blocks = KVBlock(blocks.keys.roll(-shift, dims=0), blocks.values.roll(-shift, dims=0), blocks.n_kv_heads)
    view = module_view(space.cfg)
    rot_s, rot_t = (setup.backend.rotation(source), setup.backend.rotation(target)) if view.unrotate else (None, None)
    return condition_nll(setup.backend, target, blocks, setup.tasks["meta-test"][target], chunk,
                         lambda b: translate_cache(space, b, source, target, rot_s, rot_t, view=view))


def directions(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(i, j) for i in names for j in names if i != j]


def fresh_space(pool: LoadedPool, seed: int) -> SharedSpace:
    """Σ with the pool's config and fresh (random) adapters, seeded."""
    torch.manual_seed(seed)
    return SharedSpace(dict(pool.space.members), pool.space.cfg)


def start_space(start: str, cfg: ModulesConfig, pool: LoadedPool) -> SharedSpace:
    """The Σ a start names: the pool's, the reconstruction pool's, or a fresh one."""
    if start == "random":
        return fresh_space(pool, cfg.meta.train.seed)
    if start == "pretrained":
        return pool.space
    other = load_pool(cfg.pool_recon, load_models=False)
    ours = [(m.name, m.fingerprint) for m in pool.members]
    if [(m.name, m.fingerprint) for m in other.members] != ours:
        raise PoolMismatchError(f"{other.root}: pool_recon's models (names, fingerprints) differ from {pool.root}'s")
    return other.space


def copy_space(space: SharedSpace) -> SharedSpace:
    twin = SharedSpace(dict(space.members), space.cfg)
    twin.load_state_dict(space.state_dict())
    return twin


def save_meta_pool(out: str | Path, space: SharedSpace, pool: LoadedPool, cfg: ModulesConfig, start: str,
                   tasks_seen: int) -> Path:
    """Write a meta-trained pool: the pool's models and tokenizer(s) (each member's where they differ), the
    meta-trained Σ, and in ``pool.json`` ``modules: {prompt_len, meta_train_tasks, tasks_seen, init, from}`` (what
    porting checks against)."""
    record = {"prompt_len": cfg.prompt.length, "meta_train_tasks": cfg.tasks.meta_train, "tasks_seen": tasks_seen,
              "init": start, "from": str(pool.root), "config": to_dict(cfg)}
    extra = {MODULES_KEY: record, **({"job": pool.meta["job"]} if "job" in pool.meta else {})}
    tok = pool.root / TOKENIZER_DIR if (pool.root / TOKENIZER_DIR).is_dir() else None
    own = {e["name"]: pool.root / e["tokenizer"] for e in pool.meta["members"]} if pool.mixed_tokenizers else None
    return save_pool(out, space, pool.members, tokenizer_dir=tok, extra=extra, tokenizers=own)


def run_meta_training(cfg: ModulesConfig, *, runtime: Runtime | None = None, tracker: Tracker | None = None,
                      progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Meta-train Σ from ``cfg.meta.init`` on this rank's share of the meta-train modules (learned beforehand or
    here); rank 0 writes ``<out_dir>/pool-meta``. ``runtime`` (a Ray Train rank's) wins over ``tracker``."""
    runtime = runtime or Runtime(tracker=tracker or NullTracker(), progress=progress)
    setup = prepare(cfg, log if runtime.is_main else (lambda _: None), roles=("meta-train",))
    space = copy_space(start_space(cfg.meta.init, cfg, setup.pool))
    state = meta_train(space, setup.backend, setup.train_blocks, setup.tasks["meta-train"], cfg.meta,
                       runtime=runtime)
    seen = state.step * cfg.meta.batch_size * runtime.world_size
    last = next((r["loss"] for r in reversed(state.history) if r["kind"] == "train"), float("nan"))
    out = Path(cfg.out_dir) / "pool-meta"
    if runtime.is_main:
        save_meta_pool(out, space, setup.pool, cfg, cfg.meta.init, seen)
    return {"init": cfg.meta.init, "tasks_seen": seen, "loss": last, "pool": str(out), "steps": state.step}


def gap_recovered(nll: float, random: float, direct: float) -> float:
    """``(random - nll) / (random - direct)``: 0 at the random prompt, 1 at the direct prompt (NaN without a gap)."""
    gap = random - direct
    return (random - nll) / gap if gap > 0 else math.nan


def check_config_pool(cfg: ModulesConfig) -> None:
    """One line when the config's pool is not there (before anything is loaded)."""
    if not (Path(cfg.pool) / "pool.json").is_file():
        raise ConfigError(f"pool: {cfg.pool} is not a trained pool directory (no pool.json); train one with "
                          f"`kvlingua train`")
