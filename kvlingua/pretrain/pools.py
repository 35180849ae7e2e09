"""Pools of pre-trained members, the four kinds the paper uses, from one YAML schema.

A pool YAML is a :class:`PoolConfig`; each member is exactly one of

* ``pretrain: {...}`` — a :class:`PretrainConfig` run (from scratch, or with
  ``init_from: <member>`` fine-tuned from an earlier member's final weights), or
* ``snapshot_of: {member, step}`` — the weights of another member's run at a step
  that member lists in ``save_at`` (checkpoints of one trajectory), or
* ``model: <name or directory>`` — an existing checkpoint, nothing trained: a model
  fetched by ``kvlingua fetch`` (its name, e.g. ``smollm2``; fetched on first use) or a
  local checkpoint directory of your own (``config.json`` + safetensors weights).

A pool shares one tokenizer: trained here (``vocab_size``), or with ``tokenizer_model``
a fetched model's own, so that tiny members pre-trained here read the same ids as a real
model (``tokenizer_model: smollm2`` plus a ``model: smollm2`` member).

So: seeds = several ``pretrain`` members differing in ``seed``; trajectory = one run
with ``save_at: [mid, last]`` plus a ``snapshot_of`` member at ``mid``; experts = a
mixed-language parent plus members with ``init_from: parent`` on one language; sizes =
members differing in ``size``. Every member shares the pool's tokenizer
(``ensure_tokenizer(tokenizer_data, vocab_size)``). With ``concurrent: k`` the
members that depend on no other (no ``init_from``) train ``k`` at a time, each in its
own process with its ``pretrain.threads``: small models use two cores better as two
one-thread runs than as one two-thread run.

On disk: ``data_home()/pools/<name>/<member>/`` (a ``save_pretrained`` model with its
tokenizer and ``metrics.json``) and ``pool_manifest.json`` listing members, paths,
fingerprints and metrics.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvlingua.config import to_dict
from kvlingua.data.views import DataConfig
from kvlingua.home import data_home
from kvlingua.pretrain.loop import METRICS_FILE, PretrainConfig, evaluate_member, is_finished, pretrain
from kvlingua.pretrain.sizes import step_cost

MANIFEST = "pool_manifest.json"


@dataclass(frozen=True)
class SnapshotRef:
    """A step of another member's run, kept through that member's ``save_at``."""

    member: str
    """Name of the member whose run is snapshotted."""
    step: int
    """Optimiser step of the snapshot (must be in that member's ``save_at``)."""


@dataclass(frozen=True)
class MemberConfig:
    """One model of the pool."""

    name: str
    """Directory name and pool name of the model (letters, digits, ``-``, ``_``)."""
    pretrain: PretrainConfig | None = None
    """The run that produces this member (``None`` for a snapshot member)."""
    init_from: str | None = None
    """Fine-tune from this earlier member's final weights instead of a fresh init."""
    snapshot_of: SnapshotRef | None = None
    """Take the weights of another member's run at a step instead of running anything."""
    model: str | None = None
    """Use an existing checkpoint as is: a fetched model's name (:data:`kvlingua.realmodels.MODELS`, fetched
    on first use) or a checkpoint directory (relative paths from the current directory). It must read the
    pool's tokenizer (its vocabulary is checked)."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"member name {self.name!r} must be non-empty letters, digits, '-' or '_'")
        if sum(x is not None for x in (self.pretrain, self.snapshot_of, self.model)) != 1:
            raise ValueError(f"member {self.name!r}: give exactly one of 'pretrain', 'snapshot_of' or 'model'")
        if self.model is not None and self.init_from is not None:
            raise ValueError(f"member {self.name!r}: a model member is used as is and cannot have init_from")
        if self.snapshot_of is not None and self.init_from is not None:
            raise ValueError(f"member {self.name!r}: a snapshot member cannot have init_from")
        if self.pretrain is not None and self.pretrain.init_from is not None:
            raise ValueError(f"member {self.name!r}: set the member's init_from (a member name), "
                             "not pretrain.init_from (a path filled in at run time)")


@dataclass(frozen=True)
class PoolConfig:
    """A pool YAML (``configs/pools/*.yaml``)."""

    name: str
    """Pool directory name under ``data_home()/pools/``."""
    members: tuple[MemberConfig, ...]
    """The models, in order; ``init_from`` and ``snapshot_of`` may only name earlier members."""
    vocab_size: int | None = None
    """Size of the pool's shared tokenizer when it is trained here (None: 8192); with ``tokenizer_model``,
    None or that tokenizer's size."""
    tokenizer_model: str | None = None
    """Share a fetched model's tokenizer (its name, e.g. ``smollm2``) instead of training one."""
    tokenizer_data: DataConfig = field(default_factory=DataConfig)
    """Text the shared tokenizer is trained on (``ensure_tokenizer``)."""
    concurrent: int = 1
    """Independent members (no ``init_from``) pre-trained at the same time, one process each."""

    def __post_init__(self):
        if not isinstance(self.concurrent, int) or self.concurrent < 1:
            raise ValueError(f"concurrent must be an integer >= 1, got {self.concurrent!r}")
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"pool name {self.name!r} must be non-empty letters, digits, '-' or '_'")
        if not self.members:
            raise ValueError("members: a pool needs at least one member")
        seen: dict[str, MemberConfig] = {}
        for m in self.members:
            if m.name in seen:
                raise ValueError(f"members: duplicate name {m.name!r}")
            if m.init_from is not None and (m.init_from not in seen or seen[m.init_from].snapshot_of is not None):
                raise ValueError(f"member {m.name!r}: init_from {m.init_from!r} is not an earlier trained or model "
                                 f"member (earlier: {list(seen)})")
            if m.snapshot_of is not None:
                src = seen.get(m.snapshot_of.member)
                if src is None or src.pretrain is None:
                    raise ValueError(f"member {m.name!r}: snapshot_of.member {m.snapshot_of.member!r} is not an "
                                     f"earlier trained member (earlier: {list(seen)})")
                if m.snapshot_of.step not in src.pretrain.save_at:
                    raise ValueError(f"member {m.name!r}: step {m.snapshot_of.step} is not in "
                                     f"{src.name}.pretrain.save_at {list(src.pretrain.save_at)}")
            seen[m.name] = m


MODEL_EVAL_ROWS = 16
"""At most this many held-out rows score a ``model:`` member (the first rows a pre-trained member is scored on)."""
DEFAULT_VOCAB = 8192
"""Vocabulary of a tokenizer trained for a pool that does not name one."""


def model_member_dir(spec: str, progress: bool = True) -> Path:
    """The checkpoint directory of a ``model:`` member: a fetched model's (fetched once), or ``spec`` itself."""
    from kvlingua.config import KvlinguaError
    from kvlingua.realmodels import MODELS, fetch_model

    if spec in MODELS:
        log = None if progress else (lambda msg: None)
        return fetch_model(spec, log=log).path
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise KvlinguaError(f"model {spec!r}: neither a fetched model ({', '.join(MODELS)}) nor a checkpoint directory "
                            "with config.json and safetensors weights")
    return path


def model_member_dir_if_present(spec: str) -> Path | None:
    """The checkpoint directory of a ``model:`` member when it is on disk already (nothing is fetched)."""
    from kvlingua.realmodels import MODELS, model_dir, read_record

    if spec in MODELS:
        path = model_dir(spec)
        return path if read_record(path) else None
    path = Path(spec).expanduser().resolve()
    return path if (path / "config.json").is_file() else None


def known_vocab_size(cfg: PoolConfig) -> int | None:
    """The pool tokenizer's size when it is known without training or fetching anything (None otherwise)."""
    if cfg.tokenizer_model is None:
        return cfg.vocab_size or DEFAULT_VOCAB
    if cfg.vocab_size is not None:
        return cfg.vocab_size
    path = model_member_dir_if_present(cfg.tokenizer_model)
    if path is None:
        return None
    from kvlingua.data.tokenizer import load_tokenizer

    return len(load_tokenizer(path))


def pool_tokenizer(cfg: PoolConfig, progress: bool = True) -> Path:
    """The pool's shared tokenizer directory: the fetched model's (``tokenizer_model``) or one trained once."""
    from kvlingua.config import KvlinguaError
    from kvlingua.data.tokenizer import ensure_tokenizer, load_tokenizer

    if cfg.tokenizer_model is None:
        return ensure_tokenizer(cfg.tokenizer_data, vocab_size=cfg.vocab_size or DEFAULT_VOCAB)
    path = model_member_dir(cfg.tokenizer_model, progress)
    size = len(load_tokenizer(path))
    if cfg.vocab_size is not None and cfg.vocab_size != size:
        raise KvlinguaError(f"pool {cfg.name}: vocab_size {cfg.vocab_size} != the {size} tokens of "
                            f"{cfg.tokenizer_model}'s tokenizer (leave vocab_size out)")
    return path


def _model_member(cfg: PoolConfig, m: MemberConfig, root: Path, tokenizer_dir: Path, progress: bool) -> Path:
    """The checkpoint of model member ``m``, read with its own tokenizer where its checkpoint holds one (else
    checked against the pool's); its held-out metrics are measured once into ``root/<m.name>/metrics.json``, on the first :data:`MODEL_EVAL_ROWS` of the rows the pool's
    first pre-trained member is scored on (else of ``tokenizer_data`` with the default settings)."""
    from kvlingua.config import KvlinguaError
    from kvlingua.data.tokenizer import is_tokenizer_dir, load_tokenizer
    from kvlingua.models import load_frozen
    from kvlingua.pretrain.loop import check_chunks, load_chunks

    path = model_member_dir(m.model, progress)
    own = is_tokenizer_dir(path)  # a checkpoint saved with its tokenizer is read with it (a pool may mix them)
    tokenizer = load_tokenizer(path if own else tokenizer_dir)
    model = load_frozen(path)
    if not own and model.config.vocab_size < len(tokenizer):
        raise KvlinguaError(f"member {m.name!r}: model {m.model!r} has {model.config.vocab_size} token embeddings, "
                            f"fewer than the pool tokenizer's {len(tokenizer)}")
    metrics_file = root / m.name / METRICS_FILE
    if not metrics_file.is_file():
        run = next((x.pretrain for x in cfg.members if x.pretrain is not None), PretrainConfig(data=cfg.tokenizer_data))
        run = replace(run, eval_rows=min(run.eval_rows, MODEL_EVAL_ROWS))  # a real model is costly to score
        _, val = check_chunks(load_chunks(run, tokenizer), run, model.config.vocab_size)
        metrics = {"name": m.name, "model": m.model, "path": str(path), "eval_rows": int(val.shape[0]),
                   **evaluate_member(model, val, run)}
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text(json.dumps(metrics, indent=1))
    return path


def pool_dir(cfg: PoolConfig, home: Path | None = None) -> Path:
    """``data_home()/pools/<name>``."""
    return Path(home or data_home()) / "pools" / cfg.name


def _snapshot_member(cfg: PoolConfig, m: MemberConfig, root: Path, tokenizer_dir: Path) -> None:
    """Copy ``m.snapshot_of``'s snapshot into ``root/<m.name>`` and evaluate it there (once)."""
    from kvlingua.data.tokenizer import load_tokenizer
    from kvlingua.models import load_frozen
    from kvlingua.pretrain.loop import check_chunks, load_chunks

    dest = root / m.name
    if (dest / METRICS_FILE).is_file():
        return
    src_cfg = next(x for x in cfg.members if x.name == m.snapshot_of.member).pretrain
    src = root / m.snapshot_of.member / "snapshots" / f"step-{m.snapshot_of.step}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    model = load_frozen(dest)
    tokenizer = load_tokenizer(tokenizer_dir)
    _, val = check_chunks(load_chunks(src_cfg, tokenizer), src_cfg, len(tokenizer))
    metrics = {"name": m.name, "snapshot_of": to_dict(m.snapshot_of), **evaluate_member(model, val, src_cfg)}
    (dest / METRICS_FILE).write_text(json.dumps(metrics, indent=1))


def longest_first(members: list[MemberConfig], vocab_size: int) -> list[MemberConfig]:
    """``members`` by estimated pre-training cost, costliest first (ties keep their order)."""
    def cost(m: MemberConfig) -> float:
        run = m.pretrain
        return run.steps * step_cost(run.size, vocab_size, run.batch_size * run.seq_len)
    return sorted(members, key=cost, reverse=True)


def _pretrain_concurrently(members: list[MemberConfig], root: Path, tokenizer_dir: Path, workers: int,
                           progress: bool) -> None:
    """Pre-train independent ``members`` ``workers`` at a time, each in a fresh (spawned) process.

    The costliest members start first (longest-processing-time order: a deep member queued
    last would run alone while the other workers sit idle). A member that fails raises here
    with its own error once the others have finished; finished members are on disk either
    way, so a rerun resumes only what is missing.
    """
    from kvlingua.data.tokenizer import load_tokenizer

    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    vocab = len(load_tokenizer(tokenizer_dir))
    with ProcessPoolExecutor(max_workers=min(workers, len(members)), mp_context=ctx) as pool:
        futures = {m.name: pool.submit(pretrain, m.pretrain, root / m.name, tokenizer_dir, progress=progress,
                                       bar_position=i % workers)
                   for i, m in enumerate(longest_first(members, vocab))}
        errors = {}
        for name, fut in futures.items():
            try:
                fut.result()
            except Exception as e:  # collect, so one failure does not hide the others
                errors[name] = e
    if errors:
        first = next(iter(errors))
        raise RuntimeError(f"pre-training failed for {', '.join(errors)}: {errors[first]}") from errors[first]


def pretrain_pool(cfg: PoolConfig, home: Path | None = None, progress: bool = True,
                  force: bool = False) -> dict[str, Path]:
    """Pre-train every member of ``cfg`` (finished members are reused); returns ``{member: dir}``.

    ``force`` deletes the pool directory first. Writes ``pool_manifest.json`` beside the members.
    """
    from kvlingua.cache import fingerprint
    from kvlingua.data.tokenizer import load_tokenizer
    from kvlingua.models import load_frozen

    root = pool_dir(cfg, home)
    if force and root.exists():
        shutil.rmtree(root)
    if cfg.tokenizer_model is None and all(m.model is not None for m in cfg.members):
        # a pool of existing checkpoints only: nothing is pre-trained, so no tokenizer is trained for it; each
        # member reads its own (the first member's stands for the pool where one is saved without)
        tokenizer_dir = model_member_dir(cfg.members[0].model, progress)
    else:
        tokenizer_dir = pool_tokenizer(cfg, progress)
    independent = [m for m in cfg.members
                   if m.pretrain is not None and m.init_from is None and not is_finished(root / m.name, m.pretrain)]
    if cfg.concurrent > 1 and len(independent) > 1:
        _pretrain_concurrently(independent, root, tokenizer_dir, cfg.concurrent, progress)
    dirs: dict[str, Path] = {}
    for m in cfg.members:
        if m.model is not None:
            dirs[m.name] = _model_member(cfg, m, root, tokenizer_dir, progress)
            continue
        if m.snapshot_of is not None:
            _snapshot_member(cfg, m, root, tokenizer_dir)
        else:
            run = m.pretrain if m.init_from is None else replace(m.pretrain, init_from=str(dirs[m.init_from]))
            if not is_finished(root / m.name, run):
                pretrain(run, root / m.name, tokenizer_dir, progress=progress)
        dirs[m.name] = root / m.name
    entries = []
    for m in cfg.members:
        metrics = json.loads((root / m.name / METRICS_FILE).read_text())
        metrics.pop("log", None)
        path = m.name if m.model is None else str(dirs[m.name])  # model members stay where they are
        entries.append({"name": m.name, "path": path, "fingerprint": fingerprint(load_frozen(dirs[m.name])),
                        "member": to_dict(m), "metrics": metrics})
    manifest = {"name": cfg.name, "vocab_size": len(load_tokenizer(tokenizer_dir)), "tokenizer": str(tokenizer_dir),
                "torch": torch.__version__, "members": entries}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return dirs
