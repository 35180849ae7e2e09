"""Token readout: a target's own tokens at a position and the one before it, read beside Σ by its OUT adapter.

A target reading a translated cache knows its own tokens (a hand-off re-tokenizes the text; evaluation and training
have them), and much of what a real model's cache holds at a position is about those tokens: the token itself (what
a head copies from a value) and the one before it (what an induction head's key matches on). Σ carries them only as
well as the *source's* cache does, through a linear map between two families' caches; the token prior
(:mod:`kvlingua.prior`) restores them for a target's most frequent tokens only. The readout does it for every token:

* it reads the target's own input embeddings of the tokens (``e_t``, ``e_{t-1}``, ``[H]`` each, through the frozen
  model's embedding, bound at run time and never stored: :meth:`TokenReadout.bind`), centred on their calibration
  mean (``center``);
* ``keys`` / ``values``: linear maps from ``[e_t, e_{t-1}]`` ``[2H]`` to the target's cache layout ``[L·D]``, added to
  what OUT decodes from Σ. The first decoded position reads the mean for the token before it (its sink's token is
  not among the decoded positions; a continued segment's first position likewise).

:func:`kvlingua.readout_fit.fit_token_readout` fits it in the closed-form calibration pass (no gradients), jointly
with OUT's short path: one ridge regression from ``[Σ, e_t, e_{t-1}]`` to the target's own cache, pooled over every
source, so OUT keeps what Σ says and the readout adds what the tokens say besides. Training then updates both.
Positions without tokens (a ported soft prompt) decode from Σ alone. Its maps are ``2H·L·D`` parameters per kind
(Gemma-3-270M: 1280 × 4608), about OUT's short path again, and cost as much per decoded position.

Full width because the tokens' contribution is spread wide: on the real pair (P = 512, validation, no refresh, OUT
refitted on the trained pool's Σ, pooled over sources) smollm2 → gemma3 read 0.61 of the content from Σ alone, 0.74
with the readout at full width, and only 0.67 / 0.68 / 0.71 through a reduced-rank table of 64 / 128 / 256 token
directions (gemma3 → smollm2: 0.78, 0.83; 0.81 / 0.82 / 0.83). Σ at the previous position instead of the tokens
added 0.01–0.06 and nothing on top of them (scratch studies, README *Token readout*).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kvlingua.cache import KVBlock

READ_TOKENS = 2
"""Tokens the readout reads at each position: the position's own and the one before it."""


class TokenReadout(nn.Module):
    """``[B, S]`` target token ids -> a correction of the decoded block ``[B, S, L, D]`` (module docstring).

    Buffer: ``center`` ``[H]`` (the embeddings' calibration mean). Parameters: ``keys`` and ``values``, each
    ``nn.Linear(2H, L·D, bias=False)``, zero until fitted: a fresh readout adds nothing. The embedding it reads is
    bound with :meth:`bind` (not a submodule: never saved, moved or pickled with the space).
    """

    def __init__(self, hidden: int, num_layers: int, width: int):
        super().__init__()
        self.hidden, self.num_layers, self.width = hidden, num_layers, width
        self.register_buffer("center", torch.zeros(hidden))
        self.keys = nn.Linear(READ_TOKENS * hidden, num_layers * width, bias=False)
        self.values = nn.Linear(READ_TOKENS * hidden, num_layers * width, bias=False)
        for lin in (self.keys, self.values):
            nn.init.zeros_(lin.weight)
        object.__setattr__(self, "_embed", None)

    def bind(self, embed: Callable[[Tensor], Tensor]) -> None:
        """Read token embeddings through ``embed``: ``[B, S]`` ids -> ``[B, S, H]`` (the frozen target's own input
        embeddings, e.g. :meth:`kvlingua.backend.PoolBackend.token_embeddings` for this model)."""
        object.__setattr__(self, "_embed", embed)

    @property
    def bound(self) -> bool:
        return self._embed is not None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_embed"] = None  # a model's embedding travels with the model, not with the adapters
        return state

    def features(self, ids: Tensor) -> Tensor:
        """``[B, S]`` ids -> ``[B, S, 2H]``: each position's centred embedding, then its previous position's (zeros,
        i.e. the mean, for the first)."""
        if self._embed is None:
            raise ValueError("this token readout has no embedding to read: bind the space to its models first "
                             "(SharedSpace.bind_tokens)")
        e = self._embed(ids).to(self.center.device, self.center.dtype)  # [B, S, H]
        if e.shape != (*ids.shape, self.hidden):
            raise ValueError(f"token readout: the bound embedding gave {tuple(e.shape)} for ids {tuple(ids.shape)}; "
                             f"expected width {self.hidden}")
        e = e - self.center
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)  # [B, S, H]
        return torch.cat([e, prev], dim=-1)  # [B, S, 2H]

    def forward(self, block: KVBlock, ids: Tensor) -> KVBlock:
        """``block`` ``[B, S, L, D]`` (decoded, keys un-rotated) at positions whose target tokens are ``ids`` ``[B, S]``
        -> ``block`` plus what those tokens say about the target's cache there."""
        B, S = ids.shape
        if (B, S) != tuple(block.keys.shape[:2]):
            raise ValueError(f"token readout: ids {tuple(ids.shape)} do not match the block's positions "
                             f"{tuple(block.keys.shape[:2])}")
        f = self.features(ids).to(self.keys.weight.dtype)  # [B, S, 2H]
        k = self.keys(f).reshape(B, S, self.num_layers, self.width)  # [B, S, 2H] -> [B, S, L, D]
        v = self.values(f).reshape(B, S, self.num_layers, self.width)
        return KVBlock(block.keys + k.to(block.keys.dtype), block.values + v.to(block.values.dtype), block.n_kv_heads)
