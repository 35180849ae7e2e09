"""The training losses of Σ (paper §2.3, and a distillation variant), computed through the backend seam.

* **Suffix language modelling**: target model j reads the translated prefix block
  ``OUT_j(IN_i(KV_i))`` as its cache and continues the text; the loss is the mean
  cross-entropy of the suffix tokens. The frozen model lives behind a
  :class:`~kvlingua.backend.PoolBackend`, which returns the loss together with its
  gradient with respect to the block; :func:`suffix_lm_loss` hands that gradient to
  autograd so it flows on into the adapters that produced the block.
* **Reconstruction** (paper §2.3.1): ``‖OUT_j(IN_i(KV_i)) − KV_j‖²``, the squared
  Euclidean distance between the translated cache and the target's own cache of the
  same text. The paper sums it over the cache; here the squared norm is taken over each
  position's whole cache entry (keys and values of every layer, ``2·L_j·D_j`` numbers)
  and averaged over batch and positions, the way the suffix cross-entropy is averaged
  over tokens, so a weight means the same thing at any batch size or prefix length
  (Table 2's weights 0, 0.5 and 1 trade a per-token squared distance against a
  per-token cross-entropy). Weight 0 by default: the paper finds it unnecessary next
  to the suffix loss.
* **Suffix KL** (``TrainConfig.objective: kl``): the same suffix, but the target learns the
  distribution it predicts after its *own* cache of its own prefix (the *base* condition every
  evaluation computes) instead of the one observed next token: the mean over suffix tokens of
  KL(p_own ‖ p_translated). The backend computes the teacher from the ids and keeps it for
  recurring batches (:func:`suffix_kl_loss`), so only ids cross the seam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlingua.backend import PoolBackend
from kvlingua.cache import KVBlock


def suffix_lm_loss(backend: PoolBackend, block: KVBlock, target: str, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
    """Suffix LM loss of ``target`` reading ``block``, and the gradient that belongs to the block.

    Args:
        backend: the pool.
        block: translated prefix block in ``target``'s layout, keys/values ``[B, P, L_j, D_j]``
            (may carry autograd history; it is detached before crossing the seam).
        target: target model name.
        suffix_ids: ``[B, S]`` target-language suffix ids (the loss covers ``suffix_ids[:, 1:]``).

    Returns:
        ``(loss, grad)``: the detached scalar loss (fp32, CPU) and d loss / d block as a
        KVBlock cast to ``block``'s dtype and device, ready for
        ``torch.autograd.backward([block.keys, block.values], [grad.keys, grad.values])``.
    """
    wire = block.detach().map(lambda t: t.float().cpu().contiguous())  # [B, P, L, D] fp32 across the seam
    loss, grad = backend.suffix_loss_and_grad(target, wire, suffix_ids)
    return loss.detach().float().cpu(), _grad_like(grad, block, target)


def suffix_kl_loss(backend: PoolBackend, block: KVBlock, target: str, suffix_ids: Tensor,
                   prefix_ids: Tensor) -> tuple[Tensor, KVBlock]:
    """Suffix KL of ``target`` reading ``block`` to ``target`` reading its own cache, and the block's gradient.

    The mean over the tokens of ``suffix_ids[:, 1:]`` of KL(p_teacher ‖ p_student): the student is ``target``
    reading ``block``, the teacher ``target`` reading its own cache of ``prefix_ids`` (the *base* condition),
    computed and cached inside the backend from the ids (:meth:`~kvlingua.backend.PoolBackend.suffix_kl_and_grad`).

    Args:
        backend: the pool.
        block: translated prefix block in ``target``'s layout, keys/values ``[B, P, L_j, D_j]``.
        target: target model name.
        suffix_ids: ``[B, S]`` the target's suffix ids.
        prefix_ids: ``[B, P]`` the target's own prefix ids of the same text.

    Returns:
        ``(loss, grad)`` as :func:`suffix_lm_loss` returns them.
    """
    if not hasattr(backend, "suffix_kl_and_grad"):
        raise TypeError(f"{type(backend).__name__} has no suffix_kl_and_grad: the kl objective needs a backend "
                        "that computes the target's own-cache teacher")
    wire = block.detach().map(lambda t: t.float().cpu().contiguous())  # [B, P, L, D] fp32 across the seam
    loss, grad = backend.suffix_kl_and_grad(target, wire, suffix_ids, prefix_ids)
    return loss.detach().float().cpu(), _grad_like(grad, block, target)


def _grad_like(grad: KVBlock, block: KVBlock, target: str) -> KVBlock:
    """The backend's d loss / d block, checked against ``block``'s shape and cast to its dtype and device."""
    if grad.keys.shape != block.keys.shape:
        raise ValueError(
            f"backend returned a gradient of shape {tuple(grad.keys.shape)} for a block of shape "
            f"{tuple(block.keys.shape)} (target {target!r})"
        )
    return grad.map(lambda t: t.to(device=block.keys.device, dtype=block.keys.dtype))


def reconstruction_loss(block: KVBlock, reference: KVBlock) -> Tensor:
    """``‖block − reference‖²`` per position (keys and values, every layer), mean over batch and positions.

    ``= (Σ (K − K_ref)² + Σ (V − V_ref)²) / (B·P)``: the paper's squared norm of the cache
    difference, per token.

    Args:
        block: translated block ``[B, P, L, D]`` (differentiable).
        reference: the target model's own block of the same text, same shape (no grad).

    Returns:
        Scalar fp32 tensor with autograd history through ``block``.
    """
    if block.keys.shape != reference.keys.shape:
        raise ValueError(
            f"reconstruction needs blocks of equal shape, got {tuple(block.keys.shape)} "
            f"and {tuple(reference.keys.shape)}"
        )
    ref = reference.map(lambda t: t.to(block.keys.device, torch.float32))
    tokens = block.keys.shape[0] * block.keys.shape[1]  # B·P
    sq = (F.mse_loss(block.keys.float(), ref.keys, reduction="sum")
          + F.mse_loss(block.values.float(), ref.values, reduction="sum"))
    return sq / tokens
