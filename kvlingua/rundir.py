"""Where a training run keeps its pools, and the one reader of them.

A run writes one pool directory per trained space: the run's *main* space (:func:`main_space`: the first
space of its run config, recorded in each pool's ``pool.json`` as ``main_space``) to ``<run>/pool``, every other
space ``s`` to ``<run>/pool-<s>`` (:func:`space_pool_dir`); :func:`read_run_pools` finds them all from the run
directory or from any one of them (``kvlingua eval``, ``kvlingua serve``, :func:`kvlingua.run.finish`), the main
space first. Pools written before ``pool.json`` recorded the main space are read by the rule of their time
(:data:`LEGACY_MAIN`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from kvlingua.pool import POOL_FILE, read_pool_meta
from kvlingua.pool_members import PoolMismatchError, PoolNotFoundError


MAIN_SPACE_KEY = "main_space"
"""The ``pool.json`` key (written by :func:`kvlingua.run.finish`) that names the run's main space."""
LEGACY_MAIN = "translator"
"""A run whose pools do not record their main space made this space its main one when it trained it (else its
first space)."""


def main_space(names: Iterable[str]) -> str:
    """The space a run is about (its pool is ``<run>/pool``): the first of ``names``, the run config's spaces in
    order (or the keys of :func:`read_run_pools`, the main space first)."""
    names = list(names)
    if not names:
        raise ValueError("a run trains at least one space")
    return names[0]


def _recorded_main(meta: dict, spaces: dict) -> str:
    """The main space a pool's ``pool.json`` records, or for an older pool the rule it was written under."""
    main = meta.get(MAIN_SPACE_KEY)
    if isinstance(main, str) and main in spaces:
        return main
    return LEGACY_MAIN if LEGACY_MAIN in spaces else main_space(spaces)


def space_pool_dir(run_dir: str | Path, space: str, main: str) -> Path:
    """Where a run keeps the pool of ``space``: ``<run>/pool`` for the main space, else ``<run>/pool-<space>``."""
    return Path(run_dir) / ("pool" if space == main else f"pool-{space}")


def read_run_pools(path: str | Path) -> dict[str, Path]:
    """Every trained pool of a run that is on disk, space name -> pool directory: the run's main space first (so
    ``main_space(read_run_pools(path))`` names it), then the others in the run's space order.

    Args:
        path: a run directory, or any pool directory of a run (the others are its siblings, placed by
            :func:`space_pool_dir`). A pool with no recorded ``job`` (not written by a run) is a run of
            its one space (``space_name``, else ``translator``); so is a pool copied away from its run
            (its directory name is not the one its run gives it).

    Raises:
        PoolNotFoundError: ``path`` holds no ``pool.json`` and neither do ``pool/`` or ``pool-*/`` in it.
        PoolMismatchError: a pool.json is unreadable, or a sibling holds another run's or space's pool,
            or was trained over other models (names or fingerprints differ).
    """
    given = Path(path)
    if (given / POOL_FILE).is_file():
        pool_dir = given
    else:
        found = [d for d in [given / "pool", *sorted(given.glob("pool-*"))] if (d / POOL_FILE).is_file()]
        if not found:
            raise PoolNotFoundError(f"{given}: not a pool or run directory (no {POOL_FILE} in it, in pool/ "
                                    f"or in pool-*/)")
        pool_dir = found[0]
    meta = read_pool_meta(pool_dir)
    own = meta.get("space_name") or "translator"
    job = meta.get("job")
    spaces = job.get("spaces") if isinstance(job, dict) else None
    if not isinstance(spaces, dict) or own not in spaces:
        return {own: pool_dir}
    main = _recorded_main(meta, spaces)
    if pool_dir.name != space_pool_dir(pool_dir.parent, own, main).name:
        return {own: pool_dir}  # copied away from its run: its siblings are not here
    members = _member_ids(meta)
    out = {}
    for name in [main, *(n for n in spaces if n != main)]:
        d = pool_dir if name == own else space_pool_dir(pool_dir.parent, name, main)
        if name != own and (d / POOL_FILE).is_file():
            other = read_pool_meta(d)
            if (other.get("run"), other.get("space_name")) != (meta.get("run"), name):
                raise PoolMismatchError(
                    f"{d / POOL_FILE}: holds space {other.get('space_name')!r} of run {other.get('run')!r}, but "
                    f"run {meta.get('run')!r} ({pool_dir / POOL_FILE}) keeps its space {name!r} here")
            if _member_ids(other) != members:
                raise PoolMismatchError(f"{d / POOL_FILE}: its models (names, fingerprints) differ from those of "
                                        f"{pool_dir / POOL_FILE}")
        if (d / POOL_FILE).is_file():
            out[name] = d
    return out


def _member_ids(meta: dict) -> list[tuple[Any, Any]]:
    return [(e.get("name"), e.get("fingerprint")) for e in meta["members"]]
