"""One number, one schema: the held-out suffix NLL of a path under a condition, and each place's spelling of it.

The number is :class:`NllKey` — ``source``, ``target`` and ``condition`` (``None`` for the space a curve
trains, which its records name without a condition). Each place that stores it keeps the spelling its stored
files already use, written by one method here and read back by the one parser, :meth:`NllKey.parse`:

==============================  ===========================================================================
``eval/nll/i->j[/cond]``        a curve record (``TrainState.history``, :func:`kvlingua.evaluate.make_eval_fn`);
                                ``<prefix>/nll/i->j/cond`` for :meth:`kvlingua.eval_result.EvalResult.metrics`
``eval_nll/i->j``               what a Ray Tune trial reports (``eval_nll`` alone: the mean over paths)
``nll/<cond>/i->j``             a column of a sweep's results table (``tune_spaces.results``)
==============================  ===========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass

TUNE_MEAN = "eval_nll"
"""The Tune metric of a trial: the mean over its paths of ``eval_nll/i->j``."""


@dataclass(frozen=True)
class NllKey:
    """Held-out suffix NLL per token of ``source -> target`` under ``condition``."""

    source: str
    target: str
    condition: str | None = None
    """``base``, ``control``, ``no-prefix``, a space's name, ...; None: the space a curve trains."""

    @property
    def path(self) -> str:
        """``i->j``, as :func:`kvlingua.paths.path_name` writes it."""
        return f"{self.source}->{self.target}"

    def curve(self, prefix: str = "eval") -> str:
        """``eval/nll/i->j`` or ``eval/nll/i->j/<condition>``."""
        return f"{prefix}/nll/{self.path}" + (f"/{self.condition}" if self.condition else "")

    def tune(self) -> str:
        """``eval_nll/i->j`` (the trained space's number, whatever the condition)."""
        return f"{TUNE_MEAN}/{self.path}"

    def column(self) -> str:
        """``nll/<condition>/i->j``; a column always names its condition."""
        if self.condition is None:
            raise ValueError(f"a results-table column names its condition: {self}")
        return f"nll/{self.condition}/{self.path}"

    @classmethod
    def of_path(cls, path: str, condition: str | None = None) -> NllKey:
        """The key of ``i->j`` under ``condition``."""
        source, arrow, target = path.partition("->")
        if not arrow or not source or not target:
            raise ValueError(f"not a path name (i->j): {path!r}")
        return cls(source, target, condition)

    @classmethod
    def parse(cls, key: str) -> NllKey | None:
        """The key any spelling above names; None for any other metric (``eval/content/...``, ``loss``, ...)."""
        parts = key.split("/")
        try:
            if len(parts) in (3, 4) and parts[1] == "nll" and "->" in parts[2]:  # <prefix>/nll/i->j[/cond]
                return cls.of_path(parts[2], parts[3] if len(parts) == 4 else None)
            if len(parts) == 2 and parts[0] == TUNE_MEAN:  # eval_nll/i->j
                return cls.of_path(parts[1])
            if len(parts) == 3 and parts[0] == "nll" and "->" in parts[2]:  # nll/<cond>/i->j
                return cls.of_path(parts[2], parts[1])
        except ValueError:
            return None
        return None
