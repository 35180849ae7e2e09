"""Pre-training one tiny Gemma-2 model from scratch (or fine-tuning one member from another).

setup (tokenizer, packed token chunks, model) -> fit (AdamW, linear warm-up then cosine
decay, gradient norm clipped to 1.0) -> evaluate (held-out loss, context use) -> save.

* Deterministic: the initial weights come from ``torch.manual_seed(seed)`` and the batch
  of step ``s`` is a pure function of ``(seed, s)`` (a seeded permutation per epoch), so
  the same config gives bit-identical weights.
* Resumable: every ``checkpoint_every`` steps ``out_dir/checkpoint/`` receives the model
  (safetensors) and ``state.pt`` (optimizer state, step, RNG, loss log; read back with
  ``torch.load(weights_only=True)``). A killed run restarts from there and ends
  bit-identical to an uninterrupted one.
* Idempotent: a finished ``out_dir`` (``metrics.json`` with the same config) is skipped.

A finished member directory holds a ``save_pretrained`` model (safetensors), the
tokenizer, ``pretrain_config.json`` and ``metrics.json``; ``snapshots/step-<s>/`` hold the
same for every step in ``save_at``.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor
from tqdm.auto import tqdm
from transformers import Gemma2ForCausalLM, PreTrainedModel

from kvlingua.config import ConfigError, from_dict, to_dict
from kvlingua.data.views import DataConfig
from kvlingua.models import quiet_transformers
from kvlingua.pretrain.context import context_use
from kvlingua.pretrain.sizes import SIZES, gemma2_config, param_counts
from kvlingua.schedule import epoch_order, lr_factor

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "pretrain_config.json"


@dataclass(frozen=True)
class PretrainConfig:
    """One pre-training (or fine-tuning) run of one pool member. Defaults: the tuned quickstart budget."""

    size: str = "1.9m-l2-d256"
    """Named size of :data:`kvlingua.pretrain.sizes.SIZES` (``1.9m-l2-d256``, ``3.8m-l4-d256``, ``7.6m-l8-d256``, ``test``)."""
    seed: int = 0
    """Seeds the initial weights and the batch order."""
    data: DataConfig = field(default_factory=lambda: DataConfig(view="en"))
    """Training text (packed consecutive documents; validation split for held-out numbers)."""
    seq_len: int = 128
    """Tokens per training row (the quickstart reads 64-token prefixes and 64-token suffixes)."""
    batch_size: int = 16
    """Rows per optimiser step."""
    steps: int = 300
    """Optimiser steps."""
    lr: float = 1e-2
    """Peak learning rate (1e-2 beat 3e-3 on held-out loss and context use, docs/results/pretraining.md)."""
    warmup_frac: float = 0.05
    """Linear warm-up from 0, as a fraction of ``steps`` (:func:`kvlingua.schedule.lr_factor`)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and embeddings are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16`` runs forward/backward under CPU autocast; weights and optimizer stay fp32."""
    eval_every: int = 0
    """Held-out loss every this many steps (0: only at the end)."""
    eval_rows: int = 256
    """Validation rows for held-out loss and context use."""
    checkpoint_every: int = 100
    """Resumable checkpoint every this many steps (0: never)."""
    init_from: str | None = None
    """A member directory to start from (fine-tuning, e.g. language experts); ``None``: from scratch."""
    save_at: tuple[int, ...] = ()
    """Steps at which to keep a ``snapshots/step-<s>`` model (trajectory pools)."""
    context_prefix_len: int = 64
    """Prefix length of the context-use metric."""
    context_first: int = 16
    """Tokens scored right after the prefix by the context-use metric."""
    threads: int = 2
    """torch CPU threads (0: leave torch's default)."""

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size: unknown {self.size!r}; known sizes are {sorted(SIZES)}")
        for name in ("seq_len", "batch_size", "steps", "eval_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, grad_clip > 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.grad_clip}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup_frac must be in [0, 1) and min_lr_ratio in [0, 1]; got {self.warmup_frac}, "
                             f"{self.min_lr_ratio}")
        bad = [s for s in self.save_at if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"save_at: steps {bad} are outside 1..{self.steps}")
        if self.context_prefix_len + self.context_first >= self.seq_len:
            raise ValueError(f"context_prefix_len + context_first ({self.context_prefix_len} + "
                             f"{self.context_first}) must be < seq_len={self.seq_len} (the suffix's first token is read, not scored)")
        if SIZES[self.size].max_position_embeddings < self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds size {self.size!r}'s "
                             f"{SIZES[self.size].max_position_embeddings} positions")


@dataclass
class PretrainResult:
    """What one call of :func:`pretrain` produced."""

    out_dir: Path
    """The member directory."""
    finished: bool
    """False when stopped early by ``stop_after`` (the checkpoint allows a resume)."""
    skipped: bool
    """True when the directory was already finished and nothing ran."""
    metrics: dict
    """Contents of ``metrics.json`` (empty when not finished)."""
    snapshots: dict[int, Path] = field(default_factory=dict)
    """``save_at`` step -> snapshot directory."""


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): ``cfg.lr`` times the shared warm-up + cosine factor."""
    return cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_frac, min_lr_ratio=cfg.min_lr_ratio)


def batch_rows(seed: int, step: int, batch_size: int, n_rows: int) -> Tensor:
    """Row indices ``[batch_size]`` of step ``step``: the epochs' orders (:func:`kvlingua.schedule.epoch_order`)
    laid end to end and walked in steps of ``batch_size``."""
    orders: dict[int, Tensor] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_rows)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_rows, seed, epoch)  # [n_rows]
        out.append(orders[epoch][i])
    return torch.stack(out)  # [batch_size]


def build_model(cfg: PretrainConfig, vocab_size: int) -> PreTrainedModel:
    """A fresh model of ``cfg.size`` seeded with ``cfg.seed``, or ``cfg.init_from``'s weights."""
    if cfg.init_from is not None:
        from kvlingua.models import load_frozen

        model = load_frozen(cfg.init_from)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"init_from {cfg.init_from}: vocabulary {model.config.vocab_size} != tokenizer's {vocab_size}")
        return model.train().requires_grad_(True)
    torch.manual_seed(cfg.seed)
    return Gemma2ForCausalLM(gemma2_config(cfg.size, vocab_size)).train()


def _optimizer(model: PreTrainedModel, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _loss(model: PreTrainedModel, ids: Tensor, precision: str) -> Tensor:
    """Mean next-token cross-entropy of ``ids`` ``[B, T]``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
    logits = logits[:, :-1].float()  # [B, T-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model: PreTrainedModel, chunks: Tensor, batch_size: int = 16) -> float:
    """Mean next-token NLL over ``chunks`` ``[N, T]`` (fp32, eval mode)."""
    was = model.training
    model.eval()
    total = n = 0.0
    for s in range(0, chunks.shape[0], batch_size):
        ids = chunks[s: s + batch_size]
        total += _loss(model, ids, "fp32").item() * ids[:, 1:].numel()
        n += ids[:, 1:].numel()
    model.train(was)
    return total / n


def save_member(model: PreTrainedModel, out_dir: Path, tokenizer, cfg: PretrainConfig) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + ``pretrain_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=1))


def evaluate_member(model: PreTrainedModel, val: Tensor, cfg: PretrainConfig) -> dict:
    """Held-out loss and context use of ``model`` on validation rows ``val`` ``[N, T]``."""
    model.eval()
    out = {"held_out_loss": held_out_loss(model, val, cfg.batch_size),
           "context_use": context_use(model, val, cfg.context_prefix_len, cfg.context_first, cfg.batch_size)}
    model.train()
    return out


def load_chunks(cfg: PretrainConfig, tokenizer) -> dict[str, Tensor]:
    """Packed ``train`` and ``validation`` rows ``[N, seq_len]`` of ``cfg.data``."""
    from kvlingua.data.views import token_chunks

    train = token_chunks(cfg.data, tokenizer, "train", cfg.seq_len)
    val = token_chunks(cfg.data, tokenizer, "validation", cfg.seq_len)
    return {"train": train, "validation": val}


def check_chunks(chunks: dict[str, Tensor], cfg: PretrainConfig, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Validate ``{"train", "validation"}`` rows; returns train ``[N, T]`` and the first ``eval_rows`` validation rows."""
    train, val = chunks["train"], chunks["validation"]
    for name, t in (("train", train), ("validation", val)):
        if t.dim() != 2 or t.shape[1] != cfg.seq_len:
            raise ValueError(f"{name} chunks must be [N, {cfg.seq_len}], got {tuple(t.shape)}")
        if t.numel() and int(t.max()) >= vocab_size:
            raise ValueError(f"{name} chunks hold token id {int(t.max())} >= vocabulary size {vocab_size}")
    if train.shape[0] < 1:
        raise ValueError("no training rows: the training text is shorter than one seq_len row")
    if val.shape[0] < 2:
        raise ValueError(f"need at least 2 validation rows of {cfg.seq_len} tokens, got {val.shape[0]}")
    return train, val[: cfg.eval_rows]


def read_config(path: Path) -> PretrainConfig:
    """The :class:`PretrainConfig` stored in a member's ``pretrain_config.json``."""
    return from_dict(PretrainConfig, json.loads(path.read_text()), where=str(path))


def is_finished(out_dir: Path, cfg: PretrainConfig) -> bool:
    """True when ``out_dir`` holds a finished run of exactly ``cfg``; error when it holds another run."""
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_FILE).is_file():
        return False
    try:
        stored = read_config(out_dir / CONFIG_FILE)
    except ConfigError as e:  # e.g. written by an older kvlingua (renamed fields or sizes)
        raise ConfigError(f"{out_dir} holds a run whose config this version cannot read ({e}); "
                          "delete it or rerun with --force") from None
    if stored != cfg:
        a, b = to_dict(stored), to_dict(cfg)
        diff = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
        raise ConfigError(f"{out_dir} holds a run of a different config ({'; '.join(diff)}); "
                         "delete it or rerun with --force")
    return (out_dir / METRICS_FILE).is_file()


def _save_checkpoint(ckpt: Path, model, opt, step: int, log: list, elapsed: float) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(),
                "log": torch.tensor(log, dtype=torch.float64), "elapsed": elapsed}, tmp / "state.pt")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, tokenizer_dir: str | Path, progress: bool = True,
             stop_after: int | None = None, chunks: dict[str, Tensor] | None = None,
             bar_position: int | None = None) -> PretrainResult:
    """Pre-train (or resume, or skip) one member into ``out_dir``.

    Args:
        cfg: the run.
        out_dir: member directory (created).
        tokenizer_dir: the pool's tokenizer (copied into the member and every snapshot).
        progress: show a tqdm bar with loss and tokens/s.
        stop_after: stop after this step as if killed (no extra checkpoint); for tests and time-boxing.
        chunks: ``{"train": [N, seq_len], "validation": [M, seq_len]}`` token ids to use instead of
            ``cfg.data`` (synthetic data in tests).
        bar_position: terminal line of the progress bar (members trained side by side).

    Returns:
        :class:`PretrainResult`; ``metrics`` holds held-out loss, context use, tokens/s, wall time,
        parameter counts and the loss log.
    """
    from kvlingua.data.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    snaps = {s: out_dir / "snapshots" / f"step-{s}" for s in cfg.save_at}
    if is_finished(out_dir, cfg):
        return PretrainResult(out_dir, True, True, json.loads((out_dir / METRICS_FILE).read_text()), snaps)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    train, val = check_chunks(chunks if chunks is not None else load_chunks(cfg, tokenizer), cfg, vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=1))

    model = build_model(cfg, vocab)
    opt = _optimizer(model, cfg)
    start, log, elapsed = 0, [], 0.0
    ckpt = out_dir / CHECKPOINT_DIR
    if (ckpt / "state.pt").is_file():
        load_model(model, str(ckpt / "model.safetensors"))
        state = torch.load(ckpt / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, log, elapsed = int(state["step"]), state["log"].tolist(), float(state["elapsed"])

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"pretrain {out_dir.name}", dynamic_ncols=True, position=bar_position)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        ids = train[batch_rows(cfg.seed, step, cfg.batch_size, train.shape[0])]  # [B, T]
        loss = _loss(model, ids, cfg.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        entry = [done, loss.item(), float("nan")]
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            entry[2] = held_out_loss(model, val, cfg.batch_size)
        log.append(entry)
        wall = elapsed + time.perf_counter() - t0
        bar.set_postfix(loss=f"{entry[1]:.3f}", tok_s=f"{(done - start) * tokens_per_step / max(wall - elapsed, 1e-9):.0f}")
        if done in snaps:
            save_member(model, snaps[done], tokenizer, cfg)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_checkpoint(ckpt, model, opt, done, log, wall)
        if stop_after is not None and done >= stop_after and done < cfg.steps:
            bar.close()
            return PretrainResult(out_dir, False, False, {}, snaps)
    bar.close()
    wall = elapsed + time.perf_counter() - t0
    run_tokens_s = (cfg.steps - start) * tokens_per_step / max(wall - elapsed, 1e-9)
    cpu_s = time.process_time() - c0  # CPU seconds of all threads: a throughput that survives a busy machine
    save_member(model, out_dir, tokenizer, cfg)
    metrics = {"name": out_dir.name, "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step,
               "tokens_per_s": run_tokens_s, "train_wall_s": wall,
               "tokens_per_cpu_s": (cfg.steps - start) * tokens_per_step / max(cpu_s, 1e-9), "threads": cfg.threads, "params": param_counts(model),
               "train_loss_last": sum(e[1] for e in log[-20:]) / len(log[-20:]),
               **evaluate_member(model, val, cfg),
               "log": [{"step": int(s), "loss": l, **({} if math.isnan(v) else {"held_out_loss": v})}
                       for s, l, v in log]}
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    return PretrainResult(out_dir, True, False, metrics, snaps)
