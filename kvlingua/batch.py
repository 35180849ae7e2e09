"""One batch of Σ training or evaluation: each pool model's token ids, and where the prefix ends."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """Token ids of one training batch for every pool model.

    ``ids[m]`` is ``[B, P+S]``. Path i->j reads ``ids[i][:, :P]`` as the source prefix and
    ``ids[j][:, P:]`` as the target suffix. Monolingual views give every model the same
    tensor; a parallel corpus gives each model the aligned text of its own language, so
    the target's own first P tokens are skipped ("weak alignment", paper §4.2).
    """

    ids: dict[str, Tensor]
    """model name -> LongTensor ``[B, P+S]``."""
    prefix_len: int
    """P: prefix positions read by the source model."""
    key: str = ""
    """Name of the batch in messages (``"train/P64S64/bs16/w1r0/b00017"``); may be empty. Source blocks
    are cached by the digest of their ids (:func:`kvlingua.blockstore.ids_digest`), not by this name."""

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("Batch.ids is empty: a batch needs ids for at least one model")
        if isinstance(self.prefix_len, bool) or not isinstance(self.prefix_len, int) or self.prefix_len < 1:
            raise ValueError(f"Batch.prefix_len must be a positive integer, got {self.prefix_len!r}")
        sizes = set()
        for name, t in self.ids.items():
            if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"Batch.ids[{name!r}] must be an integer tensor [B, P+S], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if t.shape[1] < self.prefix_len + 2:
                raise ValueError(f"Batch.ids[{name!r}] has {t.shape[1]} tokens; prefix_len={self.prefix_len} "
                                 "needs at least 2 more for a suffix loss")
            sizes.add(t.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"Batch.ids tensors disagree on batch size: {sorted(sizes)}")

    @staticmethod
    def same_text(ids: Tensor, names: Iterable[str], prefix_len: int, key: str = "") -> "Batch":
        """A monolingual batch: every model reads the same ``[B, P+S]`` ids."""
        return Batch({n: ids for n in names}, prefix_len, key)

    def _ids(self, model: str) -> Tensor:
        if model not in self.ids:
            raise KeyError(f"batch {self.key or '(unnamed)'} has no ids for model {model!r}; it has {list(self.ids)}")
        return self.ids[model]

    def prefix(self, model: str) -> Tensor:
        """``[B, P]`` prefix ids of ``model``'s text."""
        return self._ids(model)[:, : self.prefix_len]

    def suffix(self, model: str) -> Tensor:
        """``[B, S]`` suffix ids of ``model``'s text."""
        return self._ids(model)[:, self.prefix_len:]

    def control_prefix(self, model: str, sink: int = 0) -> Tensor:
        """``[B, P]`` prefix ids of *another* sequence for each row (the batch rolled by one) after the row's own
        first ``sink`` tokens: the prefix of the evaluation's content control (right sink, wrong content)."""
        other = self._ids(model).roll(1, dims=0)[:, : self.prefix_len]  # [B, P]
        return torch.cat([self.prefix(model)[:, :sink], other[:, sink:]], dim=1) if sink else other
