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

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from kvlingua.rotary import KeyRotation
from kvlingua.cache import (
    ArchSummary,
    KVBlock,
    arch_summary,
    as_past_key_values,
    cache_kwargs,
    check_block_fits,
    check_same_vocab,
    extract_prefix,
    fingerprint,
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

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        """Mean next-token cross-entropy of ``suffix_ids`` ``[B, S]`` read after ``block``.

        Returns ``(loss, grad)``: a scalar tensor and d loss / d block (keys and values
        ``[B, P, L, D]``), so a caller can back-propagate into whatever produced the block.
        """

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        """Per-token NLL ``[B, S-1]`` of ``suffix_ids[:, 1:]`` after ``block`` (``None``: no prefix)."""


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


class LocalBackend:
    """In-process backend: the frozen models live in this process.

    Args:
        models: name -> frozen causal LM (the pool, in order).
        device: where the models run; blocks are returned on CPU in fp32.

    Raises:
        ValueError: no models, or two models with different vocabularies (named, with both sizes).
    """

    def __init__(self, models: dict[str, PreTrainedModel], device: str | torch.device = "cpu"):
        if not models:
            raise ValueError("a pool needs at least one model")
        self.models = models
        self.device = torch.device(device)
        self._summaries = {n: arch_summary(m) for n, m in models.items()}
        self._rotations: dict[str, KeyRotation] = {}
        check_same_vocab(self._summaries)

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

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        m = self.models[self._check(model)]
        block = extract_prefix(m, input_ids.to(self.device))
        return block.map(lambda t: t.float().cpu().contiguous())

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        m = self.models[self._check(model)]
        check_block_fits(block, self._summaries[model], model)
        dtype = next(m.parameters()).dtype
        leaf = block.map(lambda t: t.detach().to(self.device, dtype).requires_grad_(True))
        with torch.enable_grad():
            loss = suffix_token_nll(m, leaf, suffix_ids.to(self.device)).mean()
            gk, gv = torch.autograd.grad(loss, [leaf.keys, leaf.values])
        grad = KVBlock(gk.float().cpu(), gv.float().cpu(), block.n_kv_heads)
        return loss.detach().float().cpu(), grad

    @torch.no_grad()
    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        m = self.models[self._check(model)]
        if block is not None:
            check_block_fits(block, self._summaries[model], model)
            dtype = next(m.parameters()).dtype
            block = block.to(self.device, dtype)
        return suffix_token_nll(m, block, suffix_ids.to(self.device)).float().cpu()
