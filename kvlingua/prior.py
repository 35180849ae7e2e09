"""Token prior: what a target's own token says about its cache at that position, added to what Σ decodes.

A target reading a translated cache knows its own tokens (a hand-off re-tokenizes the text; evaluation and training
have them), and for some tokens the target's cache at their positions barely depends on the context: the few
punctuation marks and frequent words its attention parks on past a few hundred positions (its *secondary sinks*,
:mod:`kvlingua.refresh`). A linear Σ fitted over all positions decodes those poorly, and they are the positions a long
prefix's content hangs on. The prior corrects them for the cost of a lookup:

* for each of the target's ``N`` most frequent calibration tokens and each of its layers, keys and values separately,
  the decoded cache becomes ``scale · OUT_j(z) + shift``, with one of two fits chosen by its calibration error:
  *replace* (``scale = 0``, ``shift`` = the target's mean un-rotated entry for that token) where the token's own
  entries vary less than the decoded ones miss by, else *correct* (``scale = 1``, ``shift`` = the mean residual
  ``own − decoded`` shrunk by ``n / (n + PRIOR_SHRINK)`` toward 0);
* other tokens, and positions without a token (a ported soft prompt), decode as Σ gives them.

:func:`kvlingua.prior_fit.fit_token_prior` fits it in the closed-form calibration pass (no gradients), after the short paths, and keeps
a target's prior only where it lowers that target's suffix NLL on the calibration batches, averaged over every source
(the fits minimise a squared error, not the NLL). Fitted to the trained adapters of the real pair trained without it
(P = 512, validation, 4 batches) it moved smollm2 → gemma3 from 0.56 to 0.78 of the content without a refresh and
0.85 → 0.91 with 10 %, while SmolLM2 as a target lost 0.05: the case the gate is for. Trained with it from the start
(configs/real-pair-long.yaml), see docs/results/real-pair-long.md and the README's *Token prior*.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kvlingua.cache import KVBlock


class TokenPrior(nn.Module):
    """Per-token, per-layer affine correction of a decoded block (module docstring); buffers only, no parameters.

    Buffers (saved with the target's adapters): ``ids`` ``[N]`` increasing (``-1``: an unused slot), ``scale_keys`` /
    ``scale_values`` ``[N, L]``, ``shift_keys`` / ``shift_values`` ``[N, L, D]``. Fresh, every slot is unused: the
    prior is the identity until :func:`fit_token_prior` sets it.
    """

    def __init__(self, n: int, num_layers: int, width: int):
        super().__init__()
        self.register_buffer("ids", torch.full((n,), -1, dtype=torch.long))
        for kind in ("keys", "values"):
            self.register_buffer(f"scale_{kind}", torch.ones(n, num_layers))
            self.register_buffer(f"shift_{kind}", torch.zeros(n, num_layers, width))

    @property
    def active(self) -> bool:
        """Whether any token has a prior."""
        return bool((self.ids >= 0).any())

    def forward(self, block: KVBlock, ids: Tensor) -> KVBlock:
        """``block`` ``[B, S, L, D]`` (decoded, keys un-rotated) at positions whose target tokens are ``ids`` ``[B, S]``
        -> the block with each known token's correction applied; other positions unchanged."""
        if ids.shape != block.keys.shape[:2]:
            raise ValueError(f"token prior: ids {tuple(ids.shape)} do not match the block's positions "
                             f"{tuple(block.keys.shape[:2])}")
        ids = ids.to(self.ids.device).contiguous()
        slot = torch.searchsorted(self.ids, ids).clamp_max(self.ids.numel() - 1)  # [B, S]
        hit = (self.ids[slot] == ids) & (ids >= 0)  # [B, S]
        out = []
        for kind in ("keys", "values"):
            x = getattr(block, kind)  # [B, S, L, D]
            scale = torch.where(hit[..., None], getattr(self, f"scale_{kind}")[slot], 1.0)  # [B, S, L]
            shift = getattr(self, f"shift_{kind}")[slot] * hit[..., None, None]  # [B, S, L, D]
            out.append(x * scale[..., None].to(x.dtype) + shift.to(x.dtype))
        return KVBlock(out[0], out[1], block.n_kv_heads)
