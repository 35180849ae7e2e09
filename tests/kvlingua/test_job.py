"""Held-out rows and splits of a job, and extending a trained pool (paper §5) through the one route."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvlingua.backend import LocalBackend
from kvlingua.data.tokenizer import load_tokenizer
from kvlingua.data.views import DataConfig, token_chunks
from kvlingua.evaluate import EvalConfig
from kvlingua.job import (TrainJob, build_space, curve_batches, eval_batches, space_config, train_batches,
                          trained_paths)
from kvlingua.pool import load_pool
from kvlingua.run import run_local
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.train_config import TrainConfig
from tests.helpers import fake_corpus_home, tiny_model

P, S = 6, 6
VOCAB = 320


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fake corpus, a tokenizer of the tiny models' vocabulary, three tiny models saved as checkpoints."""
    root = tmp_path_factory.mktemp("job")
    mp = pytest.MonkeyPatch()
    fake_corpus_home(root, mp, VOCAB)
    models = {}
    for i, name in enumerate(("a", "b", "c")):
        tiny_model("gemma2", seed=i, sliding_window=64, vocab=VOCAB).save_pretrained(root / name)
        models[name] = str(root / name)
    yield root, models
    mp.undo()


def job_of(root, models, **kw) -> TrainJob:
    settings = dict(name="t", models=models, tokenizer=str(root / "tok"), out_dir=str(root / "run"),
                    train=TrainConfig(steps=2, checkpoint_every=0), data=DataConfig(view="en"),
                    prefix_len=P, suffix_len=S, batch_size=4, spaces={"translator": SpaceConfig(q_dim=16)},
                    eval=EvalConfig(batches=3, batch_size=2, curve_batches=1))
    settings.update(kw)
    return TrainJob(**settings)


def test_held_out_rows_do_not_depend_on_the_training_batch_size(world):
    root, models = world
    small, large = job_of(root, models, batch_size=4), job_of(root, models, batch_size=8)
    rows = [torch.cat([b.ids["a"] for b in eval_batches(j)]) for j in (small, large)]
    assert torch.equal(rows[0], rows[1]) and rows[0].shape == (6, P + S)
    assert all(b.ids["a"].shape[0] == 2 for b in eval_batches(large))
    reseeded = job_of(root, models, train=TrainConfig(steps=2, checkpoint_every=0, seed=7))  # nor on the train seed
    assert torch.equal(torch.cat([b.ids["a"] for b in eval_batches(reseeded)]), rows[0])
    # which rows of the test split's 58 packed chunks are held out, written down once: spread over the split, not
    # its first rows (neighbouring passages of one chapter would make the content control read related text)
    chunks = token_chunks(DataConfig(view="en"), load_tokenizer(root / "tok"), "test", P + S)
    held = [next(i for i in range(len(chunks)) if torch.equal(chunks[i], r)) for r in rows[0]]
    assert len(chunks) == 58 and held == [36, 43, 23, 28, 29, 11]


def test_final_table_on_test_curves_on_validation(world):
    root, models = world
    job = job_of(root, models)
    assert job.eval_split == "test" and job.eval.curve_split == "validation"
    tok = load_tokenizer(root / "tok")
    val = token_chunks(DataConfig(view="en"), tok, "validation", P + S)
    test = token_chunks(DataConfig(view="en"), tok, "test", P + S)
    as_set = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    curve = torch.cat([b.ids["a"] for b in curve_batches(job)])
    assert as_set(curve) <= as_set(val) and not as_set(curve) & as_set(test)
    final = torch.cat([b.ids["a"] for b in eval_batches(job)])
    assert as_set(final) <= as_set(test)
    with pytest.raises(ValueError, match="curve_split"):
        EvalConfig(curve_split="test")
    with pytest.raises(ValueError, match="asks for"):
        eval_batches(job_of(root, models, eval=EvalConfig(batches=1000, batch_size=2)))


def test_extending_a_trained_pool_trains_only_the_new_member_and_evaluates_every_path(world):
    root, models = world
    two = {k: models[k] for k in ("a", "b")}
    first = run_local(job_of(root, two, out_dir=str(root / "pool-ab")), progress=False)
    pool_dir = first["files"]["pool_translator"]
    before = load_pool(pool_dir, load_models=False, verify=False).space
    paths = (("b", "c"), ("c", "b"))
    job = job_of(root, models, out_dir=str(root / "ext"), start_from=pool_dir,
                 train=TrainConfig(steps=3, checkpoint_every=0, trainable=("c",), paths=paths))
    backend = LocalBackend({n: tiny_model("gemma2", seed=i, sliding_window=64, vocab=VOCAB) for i, n in enumerate("abc")})
    result = run_local(job, progress=False, backend=backend)
    after = load_pool(result["files"]["pool_translator"], load_models=False, verify=False).space
    for m in ("a", "b"):  # the pool's adapters are bit-identical
        old, new = before.adapter_state(m), after.adapter_state(m)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    fresh = build_space(replace(job, start_from=None), "translator", {n: backend.summary(n) for n in "abc"})
    moved = after.adapter_state("c")
    assert any(not torch.equal(moved[k], fresh.adapter_state("c")[k]) for k in moved)  # the new member trained
    data = json.loads((root / "ext" / "eval.json").read_text())
    assert len(data["paths"]) == 9
    # Trained: this run's b<->c and the four paths the first run trained (their adapters are frozen); zero-shot:
    # the paths no run ever trained.
    assert {n for n, r in data["paths"].items() if not r["trained"]} == {"a->c", "c->a", "c->c"}
    assert "a->c (zero-shot)" in result["markdown"] and "a->b (zero-shot)" not in result["markdown"]
    meta = json.loads((Path(result["files"]["pool_translator"]) / "pool.json").read_text())
    assert sorted(map(tuple, meta["trained_paths"])) == sorted(tuple(n.split("->")) for n, r in data["paths"].items()
                                                                 if r["trained"])
    # A pool written before pool.json recorded its trained paths: they come from its own job.
    old_meta = json.loads((Path(pool_dir) / "pool.json").read_text())
    old_meta.pop("trained_paths")
    (Path(pool_dir) / "pool.json").write_text(json.dumps(old_meta))
    assert sorted(trained_paths(job)) == sorted(map(tuple, meta["trained_paths"]))
    with pytest.raises(ValueError, match="only new"):
        build_space(replace(job, train=replace(job.train, trainable=("a", "c"))), "translator",
                    {n: backend.summary(n) for n in "abc"})
    with pytest.raises(ValueError, match="trainable"):
        job_of(root, models, start_from=pool_dir)


def test_output_auto_is_made_concrete_from_the_checkpoints_sizes(world):
    """``output: auto`` picks per_layer exactly when a member's dense IN + OUT passes max_share of that model."""
    root, models = world
    backend = LocalBackend({n: tiny_model("gemma2", seed=i, sliding_window=64, vocab=VOCAB) for i, n in enumerate("abc")})
    summaries = {n: backend.summary(n) for n in "abc"}
    # independently: the share of each model's own (loaded) parameters the dense adapters would take
    dense = SharedSpace(summaries, SpaceConfig(q_dim=16, output="dense")).param_counts()
    sizes = {n: sum(p.numel() for p in tiny_model("gemma2", seed=0, sliding_window=64, vocab=VOCAB).parameters())
             for n in "abc"}
    share = max((dense[n]["in"] + dense[n]["out"]) / sizes[n] for n in "abc")
    for max_share, want in ((share * 1.01, "dense"), (share * 0.99, "per_layer")):
        job = job_of(root, models, spaces={"translator": SpaceConfig(q_dim=16, max_share=max_share)})
        assert space_config(job, "translator", summaries).output == want
        assert build_space(job, "translator", summaries).cfg.output == want  # what the pool records
    explicit = job_of(root, models, spaces={"translator": SpaceConfig(q_dim=16, output="dense", max_share=1e-9)})
    assert space_config(explicit, "translator", summaries).output == "dense"


def test_a_range_of_prefix_lengths_cuts_each_batch_s_prefix_and_is_recorded_in_the_pool(world):
    root, models = world
    fixed = job_of(root, models, out_dir=str(root / "fixed"))
    ranged = job_of(root, {"a": models["a"], "b": models["b"]}, out_dir=str(root / "ranged"), min_prefix_len=2)
    lens = set()
    for full, cut in zip(train_batches(fixed), [b for _, b in zip(range(12), train_batches(ranged))]):
        p_b = cut.prefix_len
        lens.add(p_b)
        assert 2 <= p_b <= P and cut.ids["a"].shape == (4, p_b + S)
        # the same rows: the suffix unchanged, the prefix its last p_b tokens
        assert torch.equal(cut.ids["a"][:, p_b:], full.ids["a"][:, P:])
        assert torch.equal(cut.ids["a"][:, :p_b], full.ids["a"][:, P - p_b:P])
    assert len(lens) > 1
    run_local(ranged, progress=False)
    meta = json.loads((root / "ranged" / "pool" / "pool.json").read_text())
    assert meta["trained_prefix_len"] == [2, P]
    with pytest.raises(ValueError, match="min_prefix_len"):
        job_of(root, models, min_prefix_len=P + 1)
