"""One batch of Σ training or evaluation: each pool model's token ids, and where the prefix ends."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from kvlingua.align import token_map


@dataclass(frozen=True)
class Batch:
    """Token ids of one training batch for every pool model.

    ``ids[m]`` is ``[B, P+S]``. Path i->j reads ``ids[i][:, :P]`` as the source prefix and
    ``ids[j][:, P:]`` as the target suffix. Monolingual views give every model the same
    tensor; a parallel corpus gives each model the aligned text of its own language, so
    the target's own first P tokens are skipped ("weak alignment", paper §4.2).

    A pool whose members tokenize differently reads *text-first* rows
    (:func:`kvlingua.data.rows.text_rows`): each model's ids are its own tokenization of one prefix text
    and one suffix text, P and S tokens each, and ``ends`` says where each prefix token's characters end,
    so a path reads the source's positions along :meth:`align`.
    """

    ids: dict[str, Tensor]
    """model name -> LongTensor ``[B, P+S]``."""
    prefix_len: int
    """P: prefix positions read by the source model."""
    key: str = ""
    """Name of the batch in messages (``"train/P64S64/bs16/w1r0/b00017"``); may be empty. Source blocks
    are cached by the digest of their ids (:func:`ids_digest`), not by this name."""
    ends: dict[str, Tensor] | None = None
    """model name -> ``[B, P]`` character end of each prefix token relative to the cut (``<= 0``;
    :data:`kvlingua.align.NO_CHARS` for a BOS), for rows of text that models tokenize differently; None: every
    model reads the same positions (one tokenizer, or a parallel corpus read position by position)."""

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
        if self.ends is not None:
            for name, t in self.ids.items():
                e = self.ends.get(name)
                if e is None or tuple(e.shape) != (t.shape[0], self.prefix_len):
                    raise ValueError(f"Batch.ends[{name!r}] must be [B, P] = [{t.shape[0]}, {self.prefix_len}], got "
                                     f"{None if e is None else tuple(e.shape)}")

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

    def align(self, source: str, target: str, sink: int = 0) -> Tensor | None:
        """``[B, P-k]`` index of the source position (after its ``k = sink`` sink positions) that each of the target's
        positions after its own sink reads (:func:`kvlingua.align.token_map`); None where both read the same
        tokens (one tokenizer: the identity, skipped so nothing is computed differently)."""
        if self.ends is None or source == target:
            return None
        src, tgt = self._ids(source), self._ids(target)
        if self.ends[source] is self.ends[target] or (
                torch.equal(self.ends[source], self.ends[target]) and torch.equal(src[:, :self.prefix_len],
                                                                                  tgt[:, :self.prefix_len])):
            return None
        return token_map(self.ends[source][:, sink:], self.ends[target][:, sink:])  # [B, P-k]

    def control_prefix(self, model: str, sink: int = 0) -> Tensor:
        """``[B, P]`` prefix ids of *another* sequence for each row (the batch rolled by one) after the row's own
        first ``sink`` tokens: the prefix of the evaluation's content control (right sink, wrong content)."""
        other = self._ids(model).roll(1, dims=0)[:, : self.prefix_len]  # [B, P]
        return torch.cat([self.prefix(model)[:, :sink], other[:, sink:]], dim=1) if sink else other


def ids_digest(input_ids: Tensor) -> str:
    """Hex digest of ``[B, P]`` token ids (shape and int64 bytes): the content key of a batch."""
    if input_ids.dim() != 2:
        raise ValueError(f"prefix ids must be [B, P], got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()  # [B, P]
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()
