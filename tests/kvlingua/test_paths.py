"""PathSampler: coverage of all N² paths, subsets, trainable models, determinism, errors."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kvlingua.paths import PathSampler, path_name

NAMES = ["a", "b", "c"]
ALL = [(i, j) for i in NAMES for j in NAMES]


def test_all_paths_including_cyclic_by_default():
    s = PathSampler(NAMES)
    assert s.allowed == ALL
    assert ("a", "a") in s.allowed and len(s.allowed) == 9
    assert s.sample(0) == ALL and s.sample(17) == ALL


@pytest.mark.parametrize("k", [1, 2, 4, 5, 9, 20])
def test_sampling_covers_every_path_and_is_balanced(k):
    s = PathSampler(NAMES, paths_per_step=k, seed=3)
    n = len(ALL)
    counts = Counter()
    window = -(-2 * n // k) + 1  # ceil(2n / k) + 1 consecutive steps always hold one whole epoch
    for step in range(200):
        paths = s.sample(step)
        assert len(paths) == min(k, n)
        assert len(set(paths)) == len(paths), "no path twice in one step"
        assert set(paths) <= set(ALL)
        counts.update(paths)
        if step >= window - 1:
            recent = set(itertools.chain.from_iterable(s.sample(t) for t in range(step - window + 1, step + 1)))
            assert recent == set(ALL)
    assert set(counts) == set(ALL)
    assert max(counts.values()) - min(counts.values()) <= 200 * min(k, n) // n // 4 + 2


def test_deterministic_in_seed_and_step():
    a = PathSampler(NAMES, paths_per_step=2, seed=7)
    b = PathSampler(NAMES, paths_per_step=2, seed=7)
    assert [b.sample(t) for t in reversed(range(30))] == [a.sample(t) for t in reversed(range(30))]
    other = PathSampler(NAMES, paths_per_step=2, seed=8)
    assert [a.sample(t) for t in range(30)] != [other.sample(t) for t in range(30)]
    # consecutive steps differ (not a constant choice)
    assert len({tuple(a.sample(t)) for t in range(30)}) > 5


def test_subset_of_paths_is_respected():
    subset = [("a", "c"), ("c", "a"), ("c", "c"), ("a", "c")]
    s = PathSampler(NAMES, paths_per_step=2, paths=subset)
    assert s.allowed == [("a", "c"), ("c", "a"), ("c", "c")]
    seen = set()
    for t in range(20):
        seen.update(s.sample(t))
    assert seen == {("a", "c"), ("c", "a"), ("c", "c")}


def test_trainable_keeps_paths_touching_a_trainable_model():
    s = PathSampler(NAMES, trainable=["c"])
    assert s.allowed == [("a", "c"), ("b", "c"), ("c", "a"), ("c", "b"), ("c", "c")]
    s = PathSampler(NAMES, paths=[("a", "b"), ("a", "c")], trainable=("c",))
    assert s.allowed == [("a", "c")]


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model.*'z'"):
        PathSampler(NAMES, paths=[("a", "z")])
    with pytest.raises(ValueError, match="empty"):
        PathSampler(NAMES, paths=[])
    with pytest.raises(ValueError, match="pair"):
        PathSampler(NAMES, paths=[("a", "b", "c")])
    with pytest.raises(ValueError, match="trainable.*'q'"):
        PathSampler(NAMES, trainable=["q"])
    with pytest.raises(ValueError, match="no allowed path touches"):
        PathSampler(NAMES, paths=[("a", "b")], trainable=["c"])
    with pytest.raises(ValueError, match="trainable is empty"):
        PathSampler(NAMES, trainable=[])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="paths_per_step"):
            PathSampler(NAMES, paths_per_step=bad)
    with pytest.raises(ValueError, match="at least one"):
        PathSampler([])
    with pytest.raises(ValueError, match="duplicate"):
        PathSampler(["a", "a"])
    with pytest.raises(ValueError, match="step"):
        PathSampler(NAMES, paths_per_step=2).sample(-1)


def test_path_name():
    assert path_name(("a", "b")) == "a->b"
