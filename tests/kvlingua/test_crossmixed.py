"""Mixed schedules across tokenizers: each switch re-tokenizes the text so far; positions read their characters'
writer through Σ (only positions that writer computed itself) or are read by the new model itself."""
from __future__ import annotations

import pytest
import torch

from kvlingua.align import NO_CHARS, text_ends
from kvlingua.cache import arch_summary, cache_kwargs, extract_prefix
from kvlingua.crossmixed import CachedPositions, Run, SwitchPlan, merge_schedule, mixed_text, plan_switch
from kvlingua.generate import GenerationParams, HandoffError
from kvlingua.mixed import mixed_generate
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import CacheView, model_rotation
from tests.helpers import CROSS_TEXT, cross_tokenizer_pool, generate_after, tiny_model

TEXT = CROSS_TEXT


@pytest.fixture(scope="module")
def pool():
    return cross_tokenizer_pool()



def test_one_model_is_plain_generation_on_its_tokens(pool):
    models, space, toks = pool
    res = mixed_text(models, space, TEXT, [("b", 5), ("b", 4)], tokenizers=toks)
    ids = text_ends(toks["b"], TEXT)[0]
    assert res.tokens == generate_after(models["b"], ids, 9) and res.switches == [] and res.models == ["b"] * 9
    assert res.text == toks["b"].decode(res.tokens, skip_special_tokens=True)


def test_one_shared_tokenizer_is_the_id_route(pool):
    models, space, toks = pool
    same = {"a": toks["a"], "c": toks["a"]}
    pair = {"a": models["a"], "c": tiny_model("gemma2", seed=3, layers=3, vocab=300)}
    sp = SharedSpace({n: arch_summary(m) for n, m in pair.items()}, SpaceConfig(q_dim=24, init="random")).eval()
    got = mixed_text(pair, sp, TEXT, [("a", 3), ("c", 3)], tokenizers=same)
    want = mixed_generate(pair, sp, text_ends(toks["a"], TEXT)[0], [("a", 3), ("c", 3)], tokenizer=toks["a"])
    assert got.tokens == want.tokens and len(got.switches) == 1


def test_a_switch_reads_the_writers_own_cache_along_the_token_map(pool):
    models, space, toks = pool
    res = mixed_text(models, space, TEXT, [("a", 3), ("b", 4)], tokenizers=toks)
    ids_a = text_ends(toks["a"], TEXT)[0]
    assert res.models == ["a"] * 3 + ["b"] * 4
    assert res.tokens[:3] == generate_after(models["a"], ids_a, 3)
    # independently: the text after a's segment, as b reads it
    after = TEXT + toks["a"].decode(res.tokens[:3])
    ids_b, ends_b = text_ends(toks["b"], after)
    # a's own cache: its tokens of TEXT and its first two new ones (the third was never read); character ends
    # counted from the end of `after`, as text_ends counts them (a's tokens of TEXT end -len(new text) earlier)
    seq_a = ids_a + res.tokens[:2]
    tail = len(toks["a"].decode(res.tokens[:3]))
    ends_a = [e - tail for e in text_ends(toks["a"], TEXT)[1]]
    for i in range(1, 3):  # a new token ends where its decoded text ends
        ends_a.append(len(toks["a"].decode(res.tokens[:i])) - tail)
    k = space.cfg.sink_tokens
    reads = []  # each of b's positions after its sink: the last of a's tokens after a's sink ending at or before it
    for t in range(k, len(ids_b) - 1):
        ok = [i for i in range(k, len(seq_a)) if ends_a[i] != NO_CHARS and ends_a[i] <= ends_b[t]]
        reads.append(ok[-1] if ok else None)
    own_n = k + reads.count(None)  # b's sink and the positions no token of a has ended before: b reads them
    assert None not in reads[own_n - k:], "a position b reads itself is only at the left edge"
    reads = reads[own_n - k:]
    assert [(s.source, s.target, s.start, s.end) for s in res.switches] == [("a", "b", own_n, len(ids_b) - 1)]
    with torch.no_grad():
        own = extract_prefix(models["a"], torch.tensor([seq_a]))  # [1, S_a, L, D]
        body = CacheView.of(space.cfg).to_space(own, model_rotation(models["a"]))  # after a's sink, keys unrotated
        z = space.encode(body, "a")  # [1, S_a-k, Q]: a's encoded run, every position of its own after its sink
        out = space.decode(z.map(lambda x: x[:, [r - k for r in reads]]), "b")  # [1, T_b-1-own_n, L, D]
        out = model_rotation(models["b"]).rotate(out, start=own_n)
        mine = extract_prefix(models["b"], torch.tensor([ids_b[:own_n]]))  # [1, own_n, L, D]
        block = type(mine)(torch.cat([mine.keys, out.keys], 1), torch.cat([mine.values, out.values], 1),  # b own, then Σ
                           mine.n_kv_heads)  # [1, T_b-1, L, D]
    assert res.tokens[3:] == generate_after(models["b"], ids_b, 4, block)
    assert res.text == after[len(TEXT):] + toks["b"].decode(res.tokens[3:])


def test_coming_back_keeps_its_own_positions_and_reads_only_what_the_other_wrote(pool, monkeypatch):
    """a writes, b writes, a comes back; the writes are forced to whole words (random tiny models write bytes)."""
    models, space, toks = pool
    writes = {"a": [" the light", " and said"], "b": [" earth water"]}
    ids_of = lambda m, t: toks[m](t, add_special_tokens=False)["input_ids"]
    caches = {}

    def forced(model, cache, first_input, params, generator, max_new_tokens=None, stop_ids=frozenset()):
        name = "a" if model is models["a"] else "b"
        caches.setdefault(name, []).append((cache, cache.get_seq_length()))  # the cache before the segment
        new = ids_of(name, writes[name].pop(0))
        for token in new:  # read every token but the last, as sampling does
            model(input_ids=torch.tensor([[first_input]]), use_cache=True, **cache_kwargs(model, cache))
            first_input = token
        return iter(new)

    monkeypatch.setattr("kvlingua.crossmixed.sample_tokens", forced)
    res = mixed_text(models, space, TEXT, [("a", 9), ("b", 9), ("a", 9)], tokenizers=toks)
    assert res.text == " the light earth water and said"
    assert res.models == ["a"] * len(ids_of("a", " the light")) + ["b"] * len(ids_of("b", " earth water")) + \
        ["a"] * len(ids_of("a", " and said"))
    text1, text2 = TEXT + " the light", TEXT + " the light earth water"
    # independently: a's cache after its first segment is its own reading of its tokens of TEXT and its words
    seq1 = text_ends(toks["a"], TEXT)[0] + ids_of("a", " the light")[:-1]
    ids3, rel3 = text_ends(toks["a"], text2)
    kept = next(i for i, (x, y) in enumerate(zip(seq1 + [-1], ids3)) if x != y)  # tokens a reads as it did
    # b's own positions of its own words: its cache's last len(words) - 1 positions, ending where their text ends
    b_new = ids_of("b", " earth water")
    b_cache, b_before = caches["b"][0]
    b_pos = list(range(b_before + 1, b_before + len(b_new)))  # [pending, new[:-1]]: the new ones after the pending
    b_end = [len(text1) + len(toks["b"].decode(b_new[:i + 1])) for i in range(len(b_new) - 1)]
    # a's positions from `kept` on: it reads b where b wrote the position's last character and a token of b's
    # own has ended by then, else itself
    plan = []
    for t in range(kept, len(ids3) - 1):
        e = rel3[t] + len(text2)
        ok = [p for p, pe in zip(b_pos, b_end) if pe <= e] if e > len(text1) else []
        plan.append(ok[-1] if ok else None)
    assert any(p is not None for p in plan), "the test's premise: a reads some of b's words through Σ"
    reads = [(s.start, s.end) for s in res.switches if (s.source, s.target) == ("b", "a")]
    first_read = kept + next(i for i, p in enumerate(plan) if p is not None)
    assert reads and reads[0][0] == first_read and all(s.source != "a" or s.target != "a" for s in res.switches)
    a_cache, a_len = caches["a"][1]
    assert a_len == len(ids3) - 1  # every position of a's text but its last token, before it writes again
    from kvlingua.cache import block_from_cache
    got = block_from_cache(a_cache, arch_summary(models["a"]).n_kv_heads)
    with torch.no_grad():  # a's kept positions are its own reading of them
        mine = extract_prefix(models["a"], torch.tensor([ids3[:kept]]))
        torch.testing.assert_close(got.keys[:, :kept], mine.keys, atol=1e-5, rtol=1e-4)
        # a position read through Σ: b's own run (its words' cached positions) encoded, read at the pick, decoded
        full = block_from_cache(b_cache, arch_summary(models["b"]).n_kv_heads)  # [1, S_b(+), L, D]
        full = model_rotation(models["b"]).unrotate(full.map(lambda x: x[:, :max(b_pos) + 1]), start=0)
        z = space.encode(full.map(lambda x: x[:, b_pos]), "b")  # [1, R, Q]: b's encoded run, its words' positions
        row = b_pos.index(plan[first_read - kept])
        out = space.decode(z.map(lambda x: x[:, row:row + 1]), "a")  # [1, 1, L_a, D_a]
        out = model_rotation(models["a"]).rotate(out, start=first_read)
    torch.testing.assert_close(got.values[:, first_read:first_read + 1], out.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.keys[:, first_read:first_read + 1], out.keys, atol=1e-5, rtol=1e-4)


def test_seeded_sampling_is_reproducible(pool):
    models, space, toks = pool
    run = lambda: mixed_text(models, space, TEXT, [("a", 4), ("b", 4)], GenerationParams(temperature=1.0, seed=7),
                             tokenizers=toks).tokens
    assert run() == run()


def test_bad_requests_are_refused_in_one_line(pool):
    models, space, toks = pool
    with pytest.raises(HandoffError, match="empty"):
        mixed_text(models, space, "", [("a", 2)], tokenizers=toks)
    with pytest.raises(HandoffError, match="has no tokenizer"):
        mixed_text(models, space, TEXT, [("a", 2), ("b", 2)], tokenizers={"a": toks["a"]})
    with pytest.raises(HandoffError, match="schedule is empty"):
        mixed_text(models, space, TEXT, [], tokenizers=toks)
    with pytest.raises(HandoffError, match="max_new_tokens"):
        mixed_text(models, space, TEXT, [("a", 0)], tokenizers=toks)


def test_a_plan_keeps_unchanged_positions_and_reads_only_what_the_owner_computed_of_its_own_text():
    """Pure bookkeeping, no models: ``a`` wrote characters 0-5 (it read the prompt), ``b`` wrote 6-9; sink k = 1."""
    owners = ["a"] * 6 + ["b"] * 4
    cached = {"a": CachedPositions([100, 1, 2, 3], [NO_CHARS, 2, 4, 6], [True] * 4),
              # b: its BOS, two positions read from a through Σ, then two of its own words' tokens
              "b": CachedPositions([200, 11, 12, 13, 14], [NO_CHARS, 3, 6, 8, 9], [True, False, False, True, True])}
    # a comes back: its first four (token, end) are unchanged; position 4 ends at 7, before any token of b's own
    # has ended (b's own run ends at 8, 9): a reads it itself; position 5 ends at 9: b's position 4 through Σ
    plan = plan_switch("a", cached, owners, [100, 1, 2, 3, 4, 5, 6], [NO_CHARS, 2, 4, 6, 7, 9, 10], k=1)
    assert plan == SwitchPlan(4, (Run("self", 4, 5, "a"), Run("sigma", 5, 6, "b", (4,), (3, 4))))
    assert plan.runs[1].rows == [1] and plan.owners() == {"b": (3, 4)}
    # b reads again with one token changed at position 2 (ends at 5, in a's text): a's own run is its positions
    # 1-3 (its sink excluded), the last ending at or before 5 is position 2; positions 3, 4 end in b's own text
    ids, ends = [200, 11, 15, 13, 14, 16], [NO_CHARS, 3, 5, 8, 9, 10]
    plan = plan_switch("b", cached, owners, ids, ends, k=1)
    assert plan == SwitchPlan(2, (Run("sigma", 2, 3, "a", (2,), (1, 2, 3)), Run("self", 3, 5, "b")))
    b = cached["b"]
    b.read(plan, ids, ends)
    b.wrote(ids[-1], ends[-1], [20, 21], [11, 12])  # sampled 20, 21: 21 is pending, never read
    assert (b.ids, b.ends, b.native) == ([200, 11, 15, 13, 14, 16, 20], [NO_CHARS, 3, 5, 8, 9, 10, 11],
                                         [True, False, False, True, True, True, True])
    # a model reading for the first time keeps nothing; its sink is its own even where another model wrote
    plan = plan_switch("c", cached, owners, [7, 8, 9], [2, 6, 10], k=1)
    assert plan == SwitchPlan(0, (Run("self", 0, 1, "c"), Run("sigma", 1, 2, "a", (3,), (1, 2, 3))))


def test_consecutive_segments_of_one_model_are_one_segment():
    assert merge_schedule([("a", 2), ("a", 3), ("b", 1), ("a", 1), ("a", 1)]) == [("a", 5), ("b", 1), ("a", 2)]
