"""The seam between the training loop and the frozen pool.

The loop in :mod:`kvlingua.train` talks to frozen models only through
:class:`PoolBackend`: get a source model's prefix block, and get a target model's
suffix loss together with its gradient with respect to a (translated) block. The
in-process :class:`LocalBackend` lives here; ``workers.backend.RayBackend``
implements the same protocol with ``ModelHost`` actors, so the loop, the losses and
the adapters exist once and Ray swaps only the backend. Frozen weights never leave
the backend; only blocks, ids, losses and block gradients cross it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from kvlingua.refresh import attention_mass, refresh_cache
from kvlingua.rotary import KeyRotation
from kvlingua.context_store import LRUBytes
from kvlingua.cache import (
    ArchSummary,
    KVBlock,
    arch_summary,
    as_past_key_values,
    cache_kwargs,
    check_block_fits,
    extract_prefix,
    fingerprint,
    input_embeddings,
)


class PoolBackend(Protocol):
    """Access to a pool of frozen causal LMs by name."""

    def names(self) -> list[str]:
        """Pool member names, in pool order."""

    def summary(self, model: str) -> ArchSummary:
        """Cache layout of ``model``."""

    def fingerprint(self, model: str) -> str:
        """Weight fingerprint of ``model`` (:func:`kvlingua.cache.fingerprint`)."""

    def rotation(self, model: str) -> KeyRotation:
        """``model``'s rotary embedding as a :class:`~kvlingua.rotary.KeyRotation` (checked once on the model)."""

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        """``[B, P]`` prefix ids -> ``model``'s KV block ``[B, P, L, D]`` (fp32, CPU, no grad)."""

    def token_embeddings(self, model: str, input_ids: Tensor) -> Tensor:
        """``[B, P]`` ids -> ``model``'s input embeddings of them ``[B, P, H]`` as its first layer reads them (any scale
        the model applies included; fp32, CPU, no grad): what a token readout reads (:mod:`kvlingua.readout`)."""

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        """Mean next-token cross-entropy of ``suffix_ids`` ``[B, S]`` read after ``block``.

        Returns ``(loss, grad)``: a scalar tensor and d loss / d block (keys and values
        ``[B, P, L, D]``), so a caller can back-propagate into whatever produced the block.
        """

    def suffix_kl_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor,
                           prefix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        """Mean over the tokens of ``suffix_ids[:, 1:]`` of KL(teacher ‖ student), and d loss / d block.

        The student is ``model`` reading ``block``; the teacher is ``model`` reading its own cache of
        ``prefix_ids`` ``[B, P]`` (the *base* condition of every evaluation), computed by the backend itself
        with no grad and kept for recurring ids, so no teacher tensor crosses the seam. Returns
        ``(loss, grad)`` as :meth:`suffix_loss_and_grad` does.
        """

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        """Per-token NLL ``[B, S-1]`` of ``suffix_ids[:, 1:]`` after ``block`` (``None``: no prefix)."""

    def attention_received(self, model: str, block: KVBlock, suffix_ids: Tensor) -> Tensor:
        """Attention mass ``[B, L, P]`` each of ``block``'s positions receives from the suffix (:func:`attention_mass`)."""

    def refresh(self, model: str, block: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int) -> KVBlock:
        """``block`` ``[B, P, L, D]`` (a translated cache of ``model``) with ``share`` of its positions after the first
        ``skip`` recomputed by ``model`` from ``ids`` ``[B, >= P]``: the ones reading ``read_ids`` ``[B, r]`` attends
        to most (:func:`kvlingua.refresh.refresh_cache`). fp32, CPU."""


def suffix_token_nll(model: PreTrainedModel, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
    """Per-token NLL ``[B, S-1]`` of ``suffix_ids[:, 1:]`` given the prefix cache ``block``.

    The suffix is read after the block's ``P`` positions (positions ``P .. P+S-1``); with
    ``block=None`` it is read cold from position 0. Differentiable w.r.t. the block.
    """
    cache = as_past_key_values(block) if block is not None else None
    out = model(input_ids=suffix_ids, use_cache=cache is not None, **cache_kwargs(model, cache))
    logits = out.logits[:, :-1].float()  # [B, S-1, V]
    targets = suffix_ids[:, 1:]  # [B, S-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)


def suffix_log_probs(model: PreTrainedModel, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
    """Next-token log-probabilities ``[B, S-1, V]`` (fp32) at the positions that predict ``suffix_ids[:, 1:]``,
    read after ``block`` as :func:`suffix_token_nll` reads it. Differentiable w.r.t. the block."""
    cache = as_past_key_values(block) if block is not None else None
    out = model(input_ids=suffix_ids, use_cache=cache is not None, **cache_kwargs(model, cache))
    return F.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [B, S-1, V]


def token_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher ‖ student) = Σ_v p_t (log p_t − log p_s); both ``[B, T, V]`` log-probs."""
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher log-probs differ in shape: {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    tokens = student.shape[0] * student.shape[1]  # B·T
    return F.kl_div(student, teacher, reduction="sum", log_target=True) / tokens


class TeacherCache:
    """A small LRU of teacher log-probabilities, bounded in bytes; thread-safe (a host serves several ranks).

    Args:
        max_bytes: entries are dropped, least recently used first, while the cache holds more; an entry
            larger than this is computed and not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._lru: LRUBytes[Tensor] = LRUBytes(max_bytes, lambda t: t.numel() * t.element_size())
        self._lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """The entry of ``key``, computed by ``compute()`` on a miss (outside the lock) and kept."""
        name = repr(key)
        with self._lock:
            value = self._lru.get(name)
            if value is not None:
                self.hits += 1
                return value
            self.misses += 1
        value = compute()
        with self._lock:
            if self._lru.size_of(value) <= self.max_bytes and name not in self._lru:
                self._lru.put(name, value)
        return value


TEACHER_CACHE_BYTES = 1 << 30
"""Bytes of teacher log-probabilities a :class:`LocalBackend` keeps (``[B, S-1, V]`` fp32 each: 49 MB for a batch of
8 × 32 suffix tokens over SmolLM2's 49,152 tokens), so the paths into one target share its teacher."""


FROZEN_PRECISIONS = ("fp32", "bf16")
"""How a backend runs its frozen models: ``fp32`` as loaded, or ``bf16`` autocast of their forward passes."""


class LocalBackend:
    """In-process backend: the frozen models live in this process.

    Args:
        models: name -> frozen causal LM (the pool, in order).
        device: where the models run; blocks are returned on CPU in fp32.
        precision: ``fp32`` runs the models as loaded; ``bf16`` runs their forward passes under
            ``torch.autocast(dtype=bfloat16)`` on ``device`` (a backward through them follows the dtypes autocast
            chose): weights stay as loaded; blocks, gradients and NLLs are still returned in fp32 (rounded through
            bf16 inside the model).

    Raises:
        ValueError: no models, or an unknown ``precision`` / one ``device`` cannot autocast to.
    """

    def __init__(self, models: dict[str, PreTrainedModel], device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        if not models:
            raise ValueError("a pool needs at least one model")
        if precision not in FROZEN_PRECISIONS:
            raise ValueError(f"precision must be one of {list(FROZEN_PRECISIONS)}, got {precision!r}")
        self.models = models
        self.device = torch.device(device)
        if precision == "bf16" and not torch.amp.is_autocast_available(self.device.type):
            raise ValueError(f"precision 'bf16' needs autocast, which device type {self.device.type!r} lacks")
        self.precision = precision
        self._summaries = {n: arch_summary(m) for n, m in models.items()}
        self._rotations: dict[str, KeyRotation] = {}
        self._teachers = TeacherCache(TEACHER_CACHE_BYTES)  # (model, prefix digest, suffix digest) -> [B, S-1, V]

    def names(self) -> list[str]:
        return list(self.models)

    def summary(self, model: str) -> ArchSummary:
        return self._summaries[self._check(model)]

    def fingerprint(self, model: str) -> str:
        return fingerprint(self.models[self._check(model)])

    def rotation(self, model: str) -> KeyRotation:
        if model not in self._rotations:
            self._rotations[model] = KeyRotation.from_model(self.models[self._check(model)])
        return self._rotations[model]

    def _check(self, model: str) -> str:
        if model not in self.models:
            raise KeyError(f"unknown pool model {model!r}; pool has {list(self.models)}")
        return model

    def _autocast(self):
        """The context of every frozen forward pass: bf16 autocast, or nothing (fp32, bit for bit as before)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        m = self.models[self._check(model)]
        with self._autocast():
            block = extract_prefix(m, input_ids.to(self.device))
        return block.map(lambda t: t.float().cpu().contiguous())

    @torch.no_grad()
    def token_embeddings(self, model: str, input_ids: Tensor) -> Tensor:
        return input_embeddings(self.models[self._check(model)], input_ids).cpu()  # [B, P, H]

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        m = self.models[self._check(model)]
        check_block_fits(block, self._summaries[model], model)
        dtype = next(m.parameters()).dtype
        leaf = block.map(lambda t: t.detach().to(self.device, dtype).requires_grad_(True))
        with torch.enable_grad():
            with self._autocast():
                loss = suffix_token_nll(m, leaf, suffix_ids.to(self.device)).mean()
            gk, gv = torch.autograd.grad(loss, [leaf.keys, leaf.values])
        grad = KVBlock(gk.float().cpu(), gv.float().cpu(), block.n_kv_heads)
        return loss.detach().float().cpu(), grad

    def suffix_kl_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor,
                           prefix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        m = self.models[self._check(model)]
        check_block_fits(block, self._summaries[model], model)
        if not block.batch_size == prefix_ids.shape[0] == suffix_ids.shape[0]:
            raise ValueError(f"block, prefix ids and suffix ids of {model!r} differ in batch size: "
                             f"{block.batch_size}, {prefix_ids.shape[0]} and {suffix_ids.shape[0]}")
        teacher = self.teacher_log_probs(model, prefix_ids, suffix_ids)  # [B, S-1, V], no grad
        dtype = next(m.parameters()).dtype
        leaf = block.map(lambda t: t.detach().to(self.device, dtype).requires_grad_(True))
        with torch.enable_grad():
            with self._autocast():
                student = suffix_log_probs(m, leaf, suffix_ids.to(self.device))  # [B, S-1, V]
            loss = token_kl(student, teacher)
            gk, gv = torch.autograd.grad(loss, [leaf.keys, leaf.values])
        grad = KVBlock(gk.float().cpu(), gv.float().cpu(), block.n_kv_heads)
        return loss.detach().float().cpu(), grad

    def teacher_log_probs(self, model: str, prefix_ids: Tensor, suffix_ids: Tensor) -> Tensor:
        """``model``'s log-probs ``[B, S-1, V]`` (fp32, on ``device``) of the suffix read after its own cache of
        ``prefix_ids``: the *base* condition, computed as :meth:`suffix_nll` computes it, once per recurring ids."""
        from kvlingua.batch import ids_digest

        def compute() -> Tensor:
            m = self.models[model]
            own = self.prefix_block(model, prefix_ids).to(self.device, next(m.parameters()).dtype)  # [B, P, L, D]
            with torch.no_grad(), self._autocast():
                return suffix_log_probs(m, own, suffix_ids.to(self.device))

        key = (self._check(model), ids_digest(prefix_ids), ids_digest(suffix_ids))
        return self._teachers.get(key, compute)

    @property
    def teacher_hits(self) -> int:
        """Teacher log-probs served from the cache (:meth:`teacher_log_probs`)."""
        return self._teachers.hits

    @property
    def teacher_misses(self) -> int:
        """Teacher log-probs computed."""
        return self._teachers.misses

    @torch.no_grad()
    def attention_received(self, model: str, block: KVBlock, suffix_ids: Tensor) -> Tensor:
        m = self.models[self._check(model)]
        check_block_fits(block, self._summaries[model], model)
        block = block.to(self.device, next(m.parameters()).dtype)
        with self._autocast():
            mass = attention_mass(m, block, suffix_ids.to(self.device))
        return mass.float().cpu()  # [B, L, P]

    @torch.no_grad()
    def refresh(self, model: str, block: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int) -> KVBlock:
        m = self.models[self._check(model)]
        check_block_fits(block, self._summaries[model], model)
        with self._autocast():
            out = refresh_cache(m, block, ids, read_ids, share, skip)  # on the model's device
        return out.map(lambda t: t.float().cpu())  # [B, P, L, D]

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        m = self.models[self._check(model)]
        if block is not None:
            check_block_fits(block, self._summaries[model], model)
            dtype = next(m.parameters()).dtype
            block = block.to(self.device, dtype)
        with self._autocast():
            nll = suffix_token_nll(m, block, suffix_ids.to(self.device))
        return nll.float().cpu()
