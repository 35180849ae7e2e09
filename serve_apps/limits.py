"""What a pool was trained for, read from its ``pool.json``, and the hand-off a request may use.

A latent hand-off ``source -> target`` is trusted only on

* a path the pool trained: the job's ``train.paths`` and ``train.trainable`` decide which
  (:class:`kvlingua.paths.PathSampler`'s rule: all N² paths when neither is set; with
  ``trainable``, only paths touching a trainable model, plus paths between two frozen
  models, whose adapters the pool it extended had trained). A pool written without its job
  (hand-built, tests) trusts every path;
* at most as many positions as its adapters were trained on: ``pool.json``'s
  ``trained_prefix_len: [min, max]`` when present, else the job's ``prefix_len``; no job,
  no limit. A space whose keys travel un-rotated (``keys: unrotated``) carries nothing that says
  where a prefix stood, so positions limit it only where a length was measured to hold
  (``held_prefix_len``, written by ``kvlingua real-model``'s position stage).

Outside those limits a request falls back to text hand-off (the target re-reads the
prompt) and the answer says so (``handoff_used``, ``handoff_reason``); a request with
``strict: true`` is refused instead (HTTP 400 naming the limit, raised by
:class:`serve_apps.planner.Planner`). Pure Python: no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainedLimits:
    """The paths and prefix lengths a pool's adapters were trained on."""

    paths: frozenset[tuple[str, str]] | None
    """Trained (source, target) paths; None: every path."""
    max_positions: int | None
    """Longest handed-over prefix (positions) the adapters saw, or that was measured to hold; None: no known limit."""
    measured: bool = False
    """``max_positions`` is a measured limit (``held_prefix_len``: a pool with un-rotated keys), not the trained top."""

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainedLimits":
        """Read ``pool.json`` (parsed); missing keys mean no limit."""
        names = [m["name"] for m in meta["members"]]
        job = meta.get("job") if isinstance(meta.get("job"), dict) else {}
        train = job.get("train") if isinstance(job.get("train"), dict) else {}
        paths = None
        if train.get("paths"):
            paths = {(s, t) for s, t in train["paths"]}
        if train.get("trainable"):
            trainable = set(train["trainable"])
            allowed = paths if paths is not None else {(s, t) for s in names for t in names}
            touching = {(s, t) for s, t in allowed if s in trainable or t in trainable}
            frozen = {(s, t) for s in names for t in names if s not in trainable and t not in trainable}
            paths = touching | frozen
        max_positions, measured = None, False
        trained = meta.get("trained_prefix_len")
        space = meta.get("space") if isinstance(meta.get("space"), dict) else {}
        if space.get("keys") == "unrotated":  # position-free keys: only a measured limit, if one was recorded
            held = meta.get("held_prefix_len")
            max_positions, measured = (int(held), True) if isinstance(held, int) else (None, False)
        elif isinstance(trained, (list, tuple)) and len(trained) == 2:
            max_positions = int(trained[1])
        elif isinstance(job.get("prefix_len"), int):
            max_positions = int(job["prefix_len"])
        return cls(frozenset(paths) if paths is not None else None, max_positions, measured)

    def why_not_latent(self, source: str, target: str, positions: int) -> str | None:
        """Why a latent hand-off of ``positions`` positions on ``source -> target`` is outside the pool's
        training, or None when it is inside."""
        if self.paths is not None and (source, target) not in self.paths:
            return f"the pool never trained the path {source} -> {target}"
        if self.max_positions is not None and positions > self.max_positions:
            if self.measured:
                return (f"the prefix has {positions} positions; the pool was measured to hold its content up to "
                        f"{self.max_positions}")
            return (f"the prefix has {positions} positions; the pool's adapters were trained on at most "
                    f"{self.max_positions}")
        return None

    def to_dict(self) -> dict:
        return {"paths": sorted(list(p) for p in self.paths) if self.paths is not None else None,
                "max_positions": self.max_positions}
