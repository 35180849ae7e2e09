"""One Σ-training run, described once: what to train, on which data, with which models.

:class:`~kvlingua.job_spec.JobSpec` holds the settings a run YAML gives (data, lengths, spaces,
loop, evaluation); :class:`TrainJob` is a spec resolved against real checkpoints (model
directories, tokenizer, output directory) and is what crosses Ray as a dict. This
module also turns a job into batches (:func:`train_batches`, :func:`eval_batches`) and
fresh spaces (:func:`build_space`). :mod:`kvlingua.run` trains and evaluates a job
against any backend; every entry point (in process, Ray Train, Tune) calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from kvlingua.cache import ArchSummary
from kvlingua.data.tokenizer import load_tokenizer
from kvlingua.align import NO_CHARS
from kvlingua.config import ConfigError, to_dict
from kvlingua.data.rows import text_rows
from kvlingua.data.views import (cached_tensors, documents, parallel_chunks, source_fingerprint, token_chunks,
                                 tokenizer_hash)
from kvlingua.job_spec import JobSpec, check_langs
from kvlingua.paths import PathSampler
from kvlingua.schedule import epoch_order
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig


@dataclass(frozen=True, kw_only=True)
class TrainJob(JobSpec):
    """A :class:`JobSpec` resolved against real checkpoints. Crosses Ray as ``to_dict``/``from_dict``."""

    name: str
    """Run name (MLflow run name, pool name)."""
    models: dict[str, str]
    """Pool member name -> local checkpoint directory, in pool order."""
    tokenizer: str
    """Directory of the pool's shared tokenizer (the first member's where members tokenize differently)."""
    tokenizers: dict[str, str] | None = None
    """Member -> its own tokenizer directory, for a pool whose members tokenize differently: batches are then
    text first (:mod:`kvlingua.data.rows`) and each path reads its source along the token map. None: every
    member reads ``tokenizer``'s ids, position by position."""
    out_dir: str
    """Run directory: checkpoints, evaluation, plots and the trained pool land here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ValueError("models: a pool needs at least one model")
        check_langs(self.langs, self.models)
        if self.tokenizers is not None:
            missing = [m for m in self.models if m not in self.tokenizers]
            if missing:
                raise ValueError(f"tokenizers: member(s) {missing} have no tokenizer; a pool that mixes tokenizers "
                                 "names each member's")
            if self.langs is not None:
                raise ValueError("langs: a parallel corpus is read position by position and needs one tokenizer; "
                                 "this pool's members tokenize differently")

    @classmethod
    def from_spec(cls, spec: JobSpec, *, name: str, models: dict[str, str], tokenizer: str, out_dir: str,
                  tokenizers: dict[str, str] | None = None) -> "TrainJob":
        """The job of ``spec`` (or any subclass of it, e.g. a run config) over these models."""
        settings = {f.name: getattr(spec, f.name) for f in fields(JobSpec)}
        return cls(name=name, models=models, tokenizer=tokenizer, out_dir=out_dir, tokenizers=tokenizers, **settings)

    @property
    def names(self) -> list[str]:
        return list(self.models)


def member_chunks(job: TrainJob, split: str) -> dict[str, torch.Tensor]:
    """Token chunks per model, each ``[N, P+S]``; row n is the same passage for every model.

    Parallel text is cut at one verse boundary in every language (prefix verses, then suffix
    verses; :func:`kvlingua.data.views.parallel_chunks`), so no suffix repeats what any prefix said.
    """
    if job.tokenizers is not None:
        return load_rows(job, split)[0]
    tok = load_tokenizer(job.tokenizer)
    if job.langs is None:
        ids = token_chunks(job.data, tok, split, job.seq_len)  # [N, P+S]
        return {name: ids for name in job.models}
    langs = sorted(set(job.langs.values()))
    per_lang = parallel_chunks(job.data, tok, split, job.prefix_len, job.suffix_len, langs)  # lang -> [N, P+S]
    return {name: per_lang[job.langs[name]] for name in job.models}


def load_rows(job: TrainJob, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Each member's ids ``[N, P+S]`` and, for a pool that mixes tokenizers, each member's prefix ends ``[N, P]``
    (:func:`kvlingua.data.rows.text_rows`, cached; members that share a tokenizer share the tensors); ends are
    None for a one-tokenizer pool, whose ids are :func:`member_chunks`'."""
    if job.tokenizers is None:
        return member_chunks(job, split), None
    toks = {m: load_tokenizer(d) for m, d in job.tokenizers.items()}
    groups: dict[str, str] = {}  # tokenizer hash -> the first member that reads it
    member_group = {m: groups.setdefault(tokenizer_hash(toks[m]), m) for m in job.models}
    firsts = sorted(set(member_group.values()), key=list(job.models).index)
    key = {"toks": [tokenizer_hash(toks[m]) for m in firsts], "cfg": to_dict(job.data), "split": split,
           "P": job.prefix_len, "S": job.suffix_len, "src": source_fingerprint(job.data)}
    rows = cached_tensors("rows", key, lambda: text_rows(documents(job.data, split), {m: toks[m] for m in firsts},
                                                         job.prefix_len, job.suffix_len))
    ids = {m: rows[f"ids/{member_group[m]}"] for m in job.models}
    ends = {m: rows[f"ends/{member_group[m]}"] for m in job.models}
    return ids, ends


def _rows_to_batches(chunks: dict[str, torch.Tensor], rows: torch.Tensor, job: TrainJob, key: str,
                     batch_size: int | None = None, prefix_lens: list[int] | None = None,
                     ends: dict[str, torch.Tensor] | None = None) -> list[Batch]:
    """Cut ``rows`` into full batches of ``batch_size`` (default ``job.batch_size``; remainder dropped).

    ``prefix_lens[b]`` (default ``job.prefix_len``) is batch b's prefix: the last P_b of the P prefix
    tokens, so its ids are ``[B, P_b+S]`` (text rows keep the special tokens their tokenizer puts first).
    ``ends`` (text rows): each member's prefix ends ``[N, P]``, cut the same way.
    """
    batch_size = batch_size or job.batch_size
    n = len(rows) // batch_size
    if n == 0:
        raise ValueError(
            f"{key}: {len(rows)} sequences of {job.seq_len} tokens are fewer than one batch of {batch_size}"
        )
    out = []
    for b in range(n):
        idx = rows[b * batch_size : (b + 1) * batch_size]
        p_b = job.prefix_len if prefix_lens is None else prefix_lens[b]
        cut = job.prefix_len - p_b  # [B, P+S] -> [B, P_b+S]: drop the prefix's first P - P_b tokens
        if ends is None:
            out.append(Batch({m: c[idx][:, cut:] for m, c in chunks.items()}, p_b, key=f"{key}/b{b:05d}"))
            continue
        ids_b: dict[str, torch.Tensor] = {}
        ends_b: dict[str, torch.Tensor] = {}
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # members sharing a tokenizer share tensors
        for m, c in chunks.items():
            if id(c) not in done:
                e = ends[m][idx]  # [B, P]
                n_sp = int((e[0] == NO_CHARS).sum())  # the special tokens first, kept
                keep = torch.cat([torch.arange(n_sp), torch.arange(n_sp + cut, c.shape[1])])  # [P_b+S]
                done[id(c)] = (c[idx][:, keep], e[:, keep[keep < job.prefix_len]])  # [B, P_b+S], [B, P_b]
            ids_b[m], ends_b[m] = done[id(c)]
        out.append(Batch(ids_b, p_b, key=f"{key}/b{b:05d}", ends=ends_b))
    return out


def at_prefix_len(job: TrainJob, prefix_len: int) -> TrainJob:
    """``job`` with every prefix ``prefix_len`` tokens long (held-out rows at another length than training's)."""
    return replace(job, prefix_len=prefix_len, min_prefix_len=None)


def train_prefix_lens(job: TrainJob, n: int) -> list[int] | None:
    """The prefix length of each of ``n`` training batches (None: all ``job.prefix_len``); seeded by the
    train seed, independent of the row order."""
    low, high = job.trained_prefix_len
    if low == high:
        return None
    g = torch.Generator().manual_seed(job.train.seed + 1)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


def train_batches(job: TrainJob, *, rank: int = 0, world_size: int = 1, split: str = "train") -> Iterator[Batch]:
    """Endless training batches for one rank.

    Rows are sharded by rank (row r goes to rank ``r % world_size``). Each rank's
    batches are formed once from a seeded permutation, so a batch's composition
    recurs every epoch (its source blocks can be reused from a block store); only the
    order of batches is reshuffled each epoch (:func:`kvlingua.schedule.epoch_order`).
    """
    chunks, ends = load_rows(job, split)
    n = _row_count(chunks)
    g = torch.Generator().manual_seed(job.train.seed)
    rows = torch.randperm(n, generator=g)
    rows = rows[rows % world_size == rank]
    low, high = job.trained_prefix_len
    lengths = f"P{high}" if low == high else f"P{low}-{high}"
    key = f"{split}/{lengths}S{job.suffix_len}/bs{job.batch_size}/w{world_size}r{rank}"
    batches = _rows_to_batches(chunks, rows, job, key, prefix_lens=train_prefix_lens(job, len(rows) // job.batch_size),
                               ends=ends)
    epoch = 0
    while True:
        for i in epoch_order(len(batches), job.train.seed, epoch).tolist():
            yield batches[i]
        epoch += 1


def calibration_batches(job: TrainJob, cfg: SpaceConfig, *, rank: int = 0,
                        world_size: int = 1) -> Iterator[Batch] | None:
    """The ``closed_form`` start's own calibration batches when ``cfg.init_prefix_len`` asks for them: training
    batches of the train split at that one prefix length (rows of ``init_prefix_len + suffix_len`` tokens, so
    other text than training's cut); None: the start reads the first training batches."""
    if cfg.init != "closed_form" or cfg.init_prefix_len is None:
        return None
    return train_batches(replace(job, prefix_len=cfg.init_prefix_len, min_prefix_len=None),
                         rank=rank, world_size=world_size)


EVAL_ROW_SEED = 0
"""Seed of the fixed permutation that picks the held-out rows (independent of the train seed)."""


def eval_batches(job: TrainJob, split: str | None = None, batches: int | None = None) -> list[Batch]:
    """``batches`` (default ``job.eval.batches``) held-out batches of ``split`` (default ``job.eval_split``,
    the final table's split), the same for every run of the job and every training batch size.

    The rows are the first ``batches × eval.batch_size`` of a fixed permutation of the whole
    split (seed :data:`EVAL_ROW_SEED`), then cut into batches of ``eval.batch_size``: which text is
    held out depends on the split, the lengths and that count only, never on the training
    batch size or seed, so every condition and trial of a comparison is scored on the same rows.
    Rows are spread over the split rather than taken in order: consecutive rows of the
    packed stream are neighbouring passages of one chapter, so the content control (each
    row read after the batch's *previous* row's prefix, see :func:`kvlingua.evaluate.evaluate`)
    would read related text. Spread over the split, the control's prefix is an unrelated passage.

    Raises :class:`~kvlingua.config.ConfigError` (a ``ValueError``) when the split has fewer rows than asked for.
    """
    split = split or job.eval_split
    batches = batches or job.eval.batches
    size = job.eval_batch_size
    chunks, ends = load_rows(job, split)
    n = _row_count(chunks)
    want = batches * size
    if n < want:
        raise ConfigError(f"the {split} split has {n} sequences of {job.seq_len} tokens; held-out evaluation asks "
                          f"for {batches} batches of {size} (lower eval.batches or eval.batch_size)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_ROW_SEED))  # [n]
    return _rows_to_batches(chunks, perm[:want], job, f"{split}/P{job.prefix_len}S{job.suffix_len}/eb{size}/spread",
                            batch_size=size, ends=ends)


def held_out_batches(job: TrainJob, split: str | None = None) -> int:
    """How many of ``job.eval.batches`` held-out batches ``split`` (default ``job.eval_split``) holds at the job's
    lengths: all of them, or fewer where long rows are scarce (a 512-token prefix on a split of short texts)."""
    return min(job.eval.batches, _row_count(load_rows(job, split or job.eval_split)[0]) // job.eval_batch_size)


def _row_count(chunks: dict[str, torch.Tensor]) -> int:
    """Rows of a split as :func:`load_rows` gives them (each member's ids ``[N, P+S]``): ``N``."""
    return next(iter(chunks.values())).shape[0]


def check_held_out(job: TrainJob) -> None:
    """Refuse, before anything is trained, a job whose splits cannot hold what it will read at its lengths: one
    training batch of the train split, ``eval.curve_batches`` of ``eval.curve_split`` (the curves) and
    ``eval.batches`` of ``eval_split`` (the final table), each of ``eval.batch_size`` rows of P + S tokens (a long
    prefix on a small split leaves few rows). Raises :class:`~kvlingua.config.ConfigError` in one line naming the
    setting to lower; reads each split's rows once (cached, as training would)."""
    size = job.eval_batch_size
    asks = [("train", 1, job.batch_size, "batch_size"),
            (job.eval.curve_split, job.eval.curve_batches, size, "eval.curve_batches or eval.batch_size"),
            (job.eval_split, job.eval.batches, size, "eval.batches or eval.batch_size")]
    for split, batches, rows, setting in asks:
        if batches <= 0:
            continue
        n = _row_count(load_rows(job, split)[0])
        if n < batches * rows:
            raise ConfigError(f"the {split} split has {n} sequences of {job.seq_len} tokens (prefix_len "
                              f"{job.prefix_len} + suffix_len {job.suffix_len}); the run reads {batches} batch(es) "
                              f"of {rows} there: lower {setting} or prefix_len")


def curve_batches(job: TrainJob) -> list[Batch]:
    """The held-out batches of the training curves: ``eval.curve_batches`` of ``eval.curve_split`` (validation)."""
    return eval_batches(job, job.eval.curve_split, job.eval.curve_batches)


def space_config(job: TrainJob, name: str, summaries: dict[str, ArchSummary]) -> SpaceConfig:
    """``job.spaces[name]`` with ``output: auto`` made concrete for the job's models.

    The model sizes come from each checkpoint's ``config.json`` (built on the meta device: no
    weights read); see :func:`kvlingua.plan.resolve_output`. Any other config is returned as is.
    """
    cfg = job.spaces[name]
    if cfg.output != "auto" or cfg.adapter != "translator":
        return cfg
    from kvlingua.plan import load_model_config, meta_model, n_params, resolve_output

    sizes = {m: n_params(meta_model(load_model_config(path))) for m, path in job.models.items()}
    return resolve_output(cfg, {m: (summaries[m], sizes[m]) for m in job.models})


def build_space(job: TrainJob, name: str, summaries: dict[str, ArchSummary],
                fingerprints: dict[str, str] | None = None) -> SharedSpace:
    """The shared space ``name`` of the job over its models (pool order), seeded by the train seed.

    Fresh, or with ``job.start_from`` the trained pool's space with every new job model added
    (fresh adapters, same seed). The pool's members must be job models with the recorded layout
    and, when ``fingerprints`` (model -> weight digest) are given, the recorded weights; only new
    members may be trainable.
    """
    torch.manual_seed(job.train.seed)
    if job.start_from is None:
        return SharedSpace({m: summaries[m] for m in job.models}, space_config(job, name, summaries))
    from kvlingua.pool import load_pool

    pool = load_pool(job.start_from, load_models=False, verify=False)
    old = {m.name: m for m in pool.members}
    missing = sorted(set(old) - set(job.models))
    if missing:
        raise ValueError(f"start_from {job.start_from}: pool member(s) {missing} are not models of this job "
                         f"{job.names}")
    for m in old.values():
        if m.summary.layout != summaries[m.name].layout:
            raise ValueError(f"start_from {job.start_from}: model {m.name!r} has another cache layout than the pool's")
        if fingerprints is not None and fingerprints.get(m.name) != m.fingerprint:
            raise ValueError(f"start_from {job.start_from}: model {m.name!r} has other weights than the pool's "
                             "(fingerprint differs)")
    want = job.spaces[name]
    if want.output == "auto":  # the pool already made it concrete for its members: keep its choice
        want = replace(want, output=pool.space.cfg.output)
    if to_dict(pool.space.cfg) != to_dict(want):
        raise ValueError(f"start_from {job.start_from}: spaces.{name} must equal the pool's space config "
                         f"{to_dict(pool.space.cfg)}")
    frozen = sorted(set(job.train.trainable or ()) & set(old))
    if frozen:
        raise ValueError(f"start_from {job.start_from}: train.trainable names pool member(s) {frozen}; only new "
                         "members train when extending a pool")
    space = pool.space
    for m in job.models:
        if m not in old:
            space.add_member(m, summaries[m])
    return space


def allowed_paths(job: TrainJob) -> list[tuple[str, str]]:
    """All (source, target) paths the job trains on."""
    return PathSampler(job.names, None, job.train.seed, job.train.paths, job.train.trainable).allowed


def trained_paths(job: TrainJob) -> list[tuple[str, str]]:
    """Every path whose adapters some training trained: the job's own paths and, when it extends a pool
    (``start_from``), the paths that pool recorded as trained (its frozen adapters keep what they learned).
    The other paths of the pool are zero-shot: the paper's §5 claim is about exactly those."""
    own = allowed_paths(job)
    if job.start_from is None:
        return own
    from kvlingua.config import from_dict
    from kvlingua.pool import read_pool_meta

    meta = read_pool_meta(job.start_from)
    if "trained_paths" in meta:
        inherited = [tuple(p) for p in meta["trained_paths"]]
    else:  # a pool written before pool.json recorded them: its own job's paths
        inherited = allowed_paths(from_dict(TrainJob, meta["job"], "start_from job"))
    return own + [p for p in inherited if p not in own]


def all_paths(job: TrainJob) -> list[tuple[str, str]]:
    """Every (source, target) path of the pool, N² of them: what the final table evaluates
    (the paths outside :func:`trained_paths` are marked zero-shot)."""
    return [(i, j) for i in job.names for j in job.names]
