"""Pools across tokenizers: the token map, text-first rows, and a job whose members tokenize differently."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from itertools import islice

import pytest
import torch

from kvlingua.align import NO_CHARS, gather_positions, token_map
from kvlingua.backend import LocalBackend
from kvlingua.batch import Batch
from kvlingua.data.rows import text_rows
from kvlingua.data.views import DataConfig, documents
from kvlingua.evaluate import EvalConfig, evaluate
from kvlingua.models import load_frozen
from kvlingua.job import TrainJob, calibration_batches, eval_batches, load_rows, train_batches
from kvlingua.pool import load_pool
from kvlingua.pool_members import PoolMismatchError
from kvlingua.run import pool_job, run_local
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.train import start_adapters, train_step
from kvlingua.train_config import TrainConfig
from tests.helpers import bpe_tokenizer, fake_corpus_home, tiny_model

P, S = 8, 6
WORDS = {"es": "el niño comió piña dijo día sueño corazón mañana también año señor".split(),
         "ru": "и свет земля вода сказал бог народ царь дом сын день пришёл ёлка щит".split(),
         "en": "the light earth water and said god people land king house son day".split()}


def _docs(n: int = 12, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(150, 300)))
            for lang in ("es", "ru", "en") for _ in range(n // 3)]


@pytest.fixture(scope="module")
def toks():
    """Two byte-level BPEs trained on the same text at different sizes; only the second puts <bos> first."""
    docs = _docs(30, seed=1)
    return {"small": bpe_tokenizer(docs, 300), "large": bpe_tokenizer(docs, 420, bos=True)}


def brute_map(src: list[int], tgt: list[int]) -> list[int]:
    out = []
    for e in tgt:
        ok = [i for i, s in enumerate(src) if s <= e]
        out.append(ok[-1] if ok else 0)
    return out


def test_token_map_is_the_last_source_token_ending_at_or_before_each_target_token():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 5, (3, 9), generator=g).cumsum(1) - 30  # [B, S] non-decreasing ends
    tgt = torch.randint(0, 6, (3, 7), generator=g).cumsum(1) - 30  # [B, T]
    idx = token_map(src, tgt)
    for b in range(3):
        assert idx[b].tolist() == brute_map(src[b].tolist(), tgt[b].tolist())
    assert (idx[:, 1:] >= idx[:, :-1]).all()  # monotone
    assert ((src.gather(1, idx) <= tgt) | (idx == 0)).all()  # causal wherever it is not clamped
    distinct = torch.arange(9).expand(3, 9) * 2 - 40  # [B, S] strictly increasing ends: the map is the identity
    assert torch.equal(token_map(distinct, distinct), torch.arange(9).expand(3, 9))


def test_gather_positions_reads_rows_and_carries_gradient():
    t = torch.randn(2, 5, 3, 4, requires_grad=True)  # [B, S, L, D]
    idx = torch.tensor([[0, 0, 2, 4], [1, 3, 3, 3]])  # [B, T]
    out = gather_positions(t, idx)
    assert out.shape == (2, 4, 3, 4)
    assert torch.equal(out[1, 2], t[1, 3]) and torch.equal(out[0, 1], t[0, 0])
    out.sum().backward()
    assert t.grad[1, 3].eq(3).all() and t.grad[0, 1].eq(0).all()


def _decode_clean(tok, ids: list[int]) -> str | None:
    text = tok.decode(ids)
    return None if "\ufffd" in text else text


def test_text_rows_cut_where_every_tokenizer_agrees_and_ends_count_characters(toks):
    docs = _docs(9)
    rows = text_rows(docs, toks, P, S)
    n = rows["ids/small"].shape[0]
    assert n > 20 and rows["ids/large"].shape == (n, P + S) and rows["ends/small"].shape == (n, P)
    assert (rows["ids/large"][:, 0] == 1).all() and (rows["ends/large"][:, 0] == NO_CHARS).all()  # <bos> first
    assert (rows["ids/small"] != 1).all()
    checked = 0
    for r in range(n):
        texts = {}
        for m, tok in toks.items():
            sp = 1 if m == "large" else 0
            ids = rows[f"ids/{m}"][r].tolist()
            pre, suf = ids[sp:P], ids[P:]
            suffix_text = _decode_clean(tok, suf)
            texts[m] = (tok.decode(pre), suffix_text)
            ends = rows[f"ends/{m}"][r].tolist()[sp:]
            assert ends[-1] == 0 and all(a <= b for a, b in zip(ends, ends[1:]))
            for i in range(len(pre)):  # independently: the characters decoded after token i, up to the cut
                after = _decode_clean(tok, pre[i + 1:])
                if after is not None:
                    assert ends[i] == -len(after), (m, r, i)
                    checked += 1
        # both prefixes end at the cut: one decoded text ends the other (past a partial first character)
        a, b = sorted((texts["small"][0].lstrip("\ufffd"), texts["large"][0].lstrip("\ufffd")), key=len)
        assert b.endswith(a)
        # the suffixes start at the cut, with its space, and are text of one document, after the prefix
        sa, sb = texts["small"][1], texts["large"][1]
        if sa is not None and sb is not None:
            short, long_ = sorted((sa, sb), key=len)
            assert long_.startswith(short) and short.startswith(" ")
            assert any(a + short in d for d in docs)
    assert checked > n * P


def test_the_map_never_reads_a_source_token_past_the_target_token_on_multibyte_text(toks):
    rows = text_rows(_docs(9, seed=3), toks, P, S)
    for src, tgt in (("small", "large"), ("large", "small")):
        idx = token_map(rows[f"ends/{src}"][:, 1:], rows[f"ends/{tgt}"][:, 1:])  # after a sink of 1
        src_end = rows[f"ends/{src}"][:, 1:].gather(1, idx)
        tgt_end = rows[f"ends/{tgt}"][:, 1:]
        assert ((src_end <= tgt_end) | (idx == 0)).all()
        assert (idx[:, 1:] >= idx[:, :-1]).all() and idx.shape == tgt_end.shape
        assert (idx[:, -1] == P - 2).all()  # the last prefix token of each ends at the cut: they meet there


def test_a_row_that_a_tokenizer_would_straddle_is_skipped_and_counted(toks):
    class Joiner:
        """A tokenizer that merges every space with the word before it ("word " tokens), so a cut at a space
        splits a token that the text read whole would have."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
            single = isinstance(texts, str)
            out = {"input_ids": [], "offset_mapping": []}
            for t in [texts] if single else texts:
                ids, offs, pos = [], [], 0
                for w in t.split(" "):
                    ids.append(len(w) + 1000 * (pos + len(w) < len(t)))
                    offs.append((pos, min(len(t), pos + len(w) + 1)))
                    pos += len(w) + 1
                out["input_ids"].append(ids)
                out["offset_mapping"].append(offs)
            return {k: v[0] for k, v in out.items()} if single else out

    rows = text_rows(_docs(3), {"small": toks["small"], "joiner": Joiner(toks["small"])}, P, S)
    assert rows["ids/small"].shape[0] == 0 and int(rows["skipped"]) > 0


# ------------------------------------------------------------------------------------------ a mixed pool
VOCAB_A, VOCAB_B = 320, 400


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Fake corpus; member a reads the pool's tokenizer, member b a different BPE that puts <bos> first."""
    root = tmp_path_factory.mktemp("mixed")
    mp = pytest.MonkeyPatch()
    tok_a = fake_corpus_home(root, mp, VOCAB_A)
    docs = documents(DataConfig(view="mixed"), "train")
    bpe_tokenizer(docs, VOCAB_B, out_dir=root / "tok_b", bos=True)
    models = {}
    for name, kind, vocab, tok in (("a", "gemma2", VOCAB_A, tok_a), ("b", "llama", VOCAB_B, root / "tok_b")):
        tiny_model(kind, seed=len(models), sliding_window=64, vocab=vocab).save_pretrained(root / name)
        models[name] = str(root / name)
    job = TrainJob(name="mixed", models=models, tokenizer=str(tok_a), out_dir=str(root / "run"),
                   tokenizers={"a": str(tok_a), "b": str(root / "tok_b")},
                   train=TrainConfig(steps=2, checkpoint_every=0, eval_every=1), data=DataConfig(view="es"),
                   prefix_len=10, suffix_len=6, batch_size=4,
                   spaces={"translator": SpaceConfig(q_dim=16, init_batches=2)},
                   eval=EvalConfig(batches=2, batch_size=4, curve_batches=1))
    yield root, job
    mp.undo()


def test_a_mixed_pool_reads_text_first_batches(mixed):
    _, job = mixed
    ids, ends = load_rows(job, "train")
    assert ends is not None and ids["a"].shape[1] == ids["b"].shape[1] == 16
    assert (ids["b"][:, 0] == 1).all() and not torch.equal(ids["a"], ids["b"][:, :16])
    batch = next(train_batches(job))
    idx = batch.align("a", "b", 1)
    assert idx is not None and idx.shape == (4, 9) and batch.align("a", "a", 1) is None
    same = Batch.same_text(batch.ids["a"], ["a", "b"], 10, key="one tokenizer")
    assert same.align("a", "b", 1) is None


def test_training_and_evaluation_read_along_the_map(mixed):
    _, job = mixed
    models = {n: load_frozen(p) for n, p in job.models.items()}
    backend = LocalBackend(models)
    space = SharedSpace({n: backend.summary(n) for n in models}, SpaceConfig(q_dim=16))
    batch = next(train_batches(job))
    metrics = train_step(space, backend, batch, [("a", "b"), ("b", "a")], TrainConfig(steps=1))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and {"suffix/a->b", "suffix/b->a"} <= set(metrics)
    for m in ("a", "b"):  # both members' IN and OUT received gradient through the map
        for side in ("in", "out"):
            grads = [p.grad for p in space.adapters(m)[side].parameters() if p.grad is not None]
            assert grads and sum(float(g.abs().sum()) for g in grads) > 0, (m, side)
    # independently: the translated cache of a -> b equals decoding a's Σ read at the mapped positions
    held = eval_batches(job)
    res = evaluate(backend, held, [("a", "b"), ("b", "a"), ("a", "a")], {"space": space})
    assert "identity" not in res.conditions_of(("a", "b")) and "identity" in res.conditions_of(("a", "a"))
    b = held[0]
    k = space.cfg.sink_tokens
    from kvlingua.view import CacheView, translate_cache
    view = CacheView.of(space.cfg)
    own_a = backend.prefix_block("a", b.prefix("a"))
    own_b = backend.prefix_block("b", b.prefix("b"))
    sink = own_b.map(lambda t: t[:, :k])
    with torch.no_grad():
        z = space.encode(view.to_space(own_a, backend.rotation("a")), "a")  # [B, P-k, Q] at a's positions
        idx = b.align("a", "b", k)
        z_b = z.map(lambda t: torch.stack([t[r, idx[r]] for r in range(t.shape[0])]))  # [B, P-k, Q] at b's
        out = view.to_cache(space.decode(z_b, "b"), backend.rotation("b"), sink)
        direct = translate_cache(space, own_a, "a", "b", backend.rotation("a"), backend.rotation("b"), sink)
    assert not torch.allclose(out.keys, direct.keys)  # position by position would read other tokens
    out = backend.refresh("b", out, b.prefix("b"), b.suffix("b")[:, :1], space.cfg.refresh, k)  # as evaluation reads it
    nll = backend.suffix_nll("b", out, b.suffix("b")).mean()
    first = res.per_batch["all"]["a->b"]["space"][0]
    assert abs(first - float(nll)) < 1e-4


def test_the_closed_form_calibrates_on_its_own_prefix_length_and_leaves_training_its_batches(mixed):
    """``init_prefix_len``: the start reads batches of that length (text rows of their own) and fits exactly what a
    closed form on those batches fits; training still starts at its own first batch."""
    from kvlingua.closedform import closed_form_init, short_maps

    _, job = mixed
    cfg = SpaceConfig(q_dim=16, init_batches=2, init_prefix_len=12)
    assert calibration_batches(job, SpaceConfig(q_dim=16)) is None
    assert calibration_batches(job, SpaceConfig(q_dim=16, init="random", init_prefix_len=12)) is None
    calib = list(islice(calibration_batches(job, cfg), 2))
    assert [b.prefix_len for b in calib] == [12, 12]
    assert all(b.ids[m].shape[1] >= 12 + job.suffix_len for b in calib for m in job.models)
    assert all(b.ends is not None for b in calib)  # text rows: the members are read along the token map
    models = {n: load_frozen(p) for n, p in job.models.items()}
    backend = LocalBackend(models)
    summaries = {n: backend.summary(n) for n in models}
    names = list(models)
    train = list(islice(train_batches(job), 3))
    started = SharedSpace(summaries, cfg)
    _, rest = start_adapters(started, backend, iter(train), names, names, calibration=calibration_batches(job, cfg))
    assert next(iter(rest)) is train[0]  # training's batches untouched by the calibration
    direct = SharedSpace(summaries, cfg)  # independent: the closed form called on the same two batches
    closed_form_init(direct, backend, calib, names)
    on_training = SharedSpace(summaries, replace(cfg, init_prefix_len=None))
    start_adapters(on_training, backend, iter(train), names, names)
    for m in names:
        for side in ("in", "out"):
            for a, b, c in zip(short_maps(started.adapters(m)[side]), short_maps(direct.adapters(m)[side]),
                               short_maps(on_training.adapters(m)[side])):
                assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
                assert not torch.allclose(a.weight, c.weight)  # other positions, another fit


def test_a_mixed_pool_saves_each_members_tokenizer_and_loads_it_back(mixed):
    root, job = mixed
    result = run_local(job, progress=False)
    pool_dir = result["pool_translator"] if "pool_translator" in result else root / "run" / "pool"
    loaded = load_pool(pool_dir)
    assert loaded.mixed_tokenizers
    assert len(loaded.tokenizers["b"]) == VOCAB_B and len(loaded.tokenizers["a"]) == VOCAB_A
    _, again = pool_job(root / "run")
    assert set(again.tokenizers) == {"a", "b"} and again.tokenizers["b"] != again.tokenizers["a"]
    meta = json.loads((loaded.root / "pool.json").read_text())
    del meta["members"][1]["tokenizer"]
    (loaded.root / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolMismatchError, match=r"record no tokenizer"):
        load_pool(pool_dir)


def test_a_split_short_of_long_rows_is_refused_in_one_line_or_scored_on_what_it_holds(mixed):
    """At a prefix length the test split holds few rows of, ``eval_batches`` refuses with a ConfigError that names the
    counts, and ``held_out_batches`` says how many full batches there are (counted here from the rows themselves)."""
    from kvlingua.config import ConfigError
    from kvlingua.job import held_out_batches

    _, job = mixed
    rows = {P: load_rows(replace(job, prefix_len=P), "test")[0]["a"].shape[0] for P in (10, 60)}
    assert rows[60] < rows[10]
    for P, n in rows.items():
        assert held_out_batches(replace(job, prefix_len=P)) == min(job.eval.batches, n // job.eval.batch_size)
    many = replace(job, prefix_len=60, eval=replace(job.eval, batches=rows[60] // job.eval.batch_size + 1))
    with pytest.raises(ConfigError, match=rf"the test split has {rows[60]} sequences of 66 tokens; held-out evaluation "
                                          rf"asks for {rows[60] // 4 + 1} batches of 4 \(lower eval.batches"):
        eval_batches(many)
    assert held_out_batches(many) == rows[60] // 4


def test_a_job_whose_splits_cannot_hold_its_reads_is_refused_before_training(mixed):
    """``check_held_out`` (called by ``experiments.training.train_run`` and the sweep driver, before any compute) passes a job whose splits hold
    its final table, its curves and a training batch, and refuses in one line, naming the setting to lower, one whose
    final table (test) or curves (validation) ask more rows than the split holds at its lengths: the counts come
    from the rows themselves."""
    from kvlingua.config import ConfigError
    from kvlingua.job import check_held_out

    _, job = mixed
    check_held_out(job)
    long = replace(job, prefix_len=60)
    test_rows = load_rows(long, "test")[0]["a"].shape[0]
    val_rows = load_rows(long, job.eval.curve_split)[0]["a"].shape[0]
    size = job.eval.batch_size
    fits = replace(long, eval=replace(job.eval, batches=test_rows // size, curve_batches=val_rows // size))
    check_held_out(fits)
    with pytest.raises(ConfigError, match=rf"^the test split has {test_rows} sequences of 66 tokens \(prefix_len 60 "
                                          rf"\+ suffix_len 6\); the run reads {test_rows // size + 1} batch\(es\) of "
                                          rf"{size} there: lower eval.batches or eval.batch_size or prefix_len$"):
        check_held_out(replace(fits, eval=replace(fits.eval, batches=test_rows // size + 1)))
    with pytest.raises(ConfigError, match=rf"^the {job.eval.curve_split} split has {val_rows} sequences .* lower "
                                          rf"eval.curve_batches"):
        check_held_out(replace(fits, eval=replace(fits.eval, curve_batches=val_rows // size + 1)))
