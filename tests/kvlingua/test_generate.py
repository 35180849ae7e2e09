"""Cross-model generation checked against transformers' own ``generate`` on tiny models."""
from __future__ import annotations

import pytest
import torch

from kvlingua.cache import arch_summary, as_past_key_values, extract_prefix
from kvlingua.generate import (
    GenerationParams,
    HandoffError,
    cache_block,
    handoff_generate,
    mixed_generate,
    model_cache,
)
from kvlingua.space import SharedSpace
from kvlingua.translator import SpaceConfig
from tests.helpers import tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pool():
    models = {
        "a": tiny_model("gemma2", seed=0, layers=2),
        "b": tiny_model("gemma2", seed=1, layers=2),
        "c": tiny_model("llama", seed=2, layers=4, kv_heads=2),
    }
    torch.manual_seed(0)
    space = SharedSpace({n: arch_summary(m) for n, m in models.items()}, SpaceConfig(q_dim=32))
    space.eval().requires_grad_(False)
    return models, space


PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])  # [1, P]


def reference(model, prompt, n, block=None):
    """``model.generate`` greedy continuation of ``prompt``, optionally after a given prefix block."""
    kw = {"past_key_values": as_past_key_values(block)} if block is not None else {}
    out = model.generate(prompt, do_sample=False, max_new_tokens=n, **kw)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("source", ["a", "c"])
def test_text_handoff_greedy_equals_targets_own_generate(pool, source):
    models, space = pool
    res = handoff_generate(models, space, source, "b", PROMPT, GenerationParams(max_new_tokens=12), handoff="text")
    assert res.tokens == reference(models["b"], PROMPT, 12)
    assert res.prompt_tokens == 10 and res.handoff_positions == 9 and res.new_tokens == len(res.tokens)
    assert min(res.prefill_s, res.decode_s) > 0 and res.translate_s >= 0


def test_one_token_prompt_matches_generate(pool):
    models, space = pool
    prompt = PROMPT[:, :1]  # [1, 1]
    res = handoff_generate(models, space, "a", "b", prompt, GenerationParams(max_new_tokens=6), handoff="latent")
    assert res.handoff_positions == 0
    assert res.tokens == reference(models["b"], prompt, 6)


@pytest.mark.parametrize("target", ["b", "c", "a"])
def test_latent_handoff_decodes_from_the_translated_cache(pool, target):
    models, space = pool
    res = handoff_generate(models, space, "a", target, PROMPT, GenerationParams(max_new_tokens=10))
    with torch.no_grad():
        translated = space.translate(extract_prefix(models["a"], PROMPT[:, :-1]), "a", target)  # [1, P-1, L, D]
    assert res.tokens == reference(models[target], PROMPT, 10, translated)
    # the translated cache is not the target's own: the output differs from plain generation
    assert res.tokens != reference(models[target], PROMPT, 10) or target == "a"


def test_identity_handoff_uses_the_raw_source_cache(pool):
    models, space = pool
    res = handoff_generate(models, None, "a", "b", PROMPT, GenerationParams(max_new_tokens=8), handoff="identity")
    raw = extract_prefix(models["a"], PROMPT[:, :-1])
    assert res.tokens == reference(models["b"], PROMPT, 8, raw)


def test_identity_on_mismatched_shapes_is_refused(pool):
    models, space = pool
    with pytest.raises(HandoffError, match=r"identity handoff needs equal cache layouts.*'a'.*2 layers.*'c'.*4"):
        handoff_generate(models, space, "a", "c", PROMPT, handoff="identity")


def test_bad_requests_are_named(pool):
    models, space = pool
    with pytest.raises(HandoffError, match="unknown target model 'zz'"):
        handoff_generate(models, space, "a", "zz", PROMPT)
    with pytest.raises(HandoffError, match="unknown handoff 'fax'"):
        handoff_generate(models, space, "a", "b", PROMPT, handoff="fax")
    with pytest.raises(ValueError, match="empty"):
        handoff_generate(models, space, "a", "b", [])
    with pytest.raises(HandoffError, match="needs a shared space"):
        handoff_generate(models, None, "a", "b", PROMPT)
    for bad in [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationParams(**bad)


def test_fixed_seed_fixes_the_sample_and_seeds_differ(pool):
    models, space = pool
    run = lambda seed, **kw: handoff_generate(
        models, space, "a", "c", PROMPT, GenerationParams(max_new_tokens=20, temperature=1.5, seed=seed, **kw)).tokens
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, top_p=0.9) == run(7, top_p=0.9)


def test_tiny_top_p_is_greedy(pool):
    models, space = pool
    sampled = handoff_generate(models, space, "a", "b", PROMPT,
                               GenerationParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3), "text")
    assert sampled.tokens == reference(models["b"], PROMPT, 10)


def test_eos_stops_generation(pool):
    models, space = pool
    first = reference(models["b"], PROMPT, 3)
    models["b"].generation_config.eos_token_id = first[1]
    try:
        res = handoff_generate(models, space, "a", "b", PROMPT, GenerationParams(max_new_tokens=10), "text")
    finally:
        models["b"].generation_config.eos_token_id = 1
    assert res.tokens == first[:first.index(first[1]) + 1] and res.finish_reason == "eos"


def test_cache_block_round_trips(pool):
    models, _ = pool
    block = extract_prefix(models["c"], PROMPT)  # [1, P, 4, 16]
    back = cache_block(model_cache(models["c"], block), 2)
    assert torch.equal(back.keys, block.keys) and torch.equal(back.values, block.values)


class RecordingSpace:
    """Delegates to a real space and records every translated block."""

    def __init__(self, space):
        self.space, self.calls = space, []

    def translate(self, block, source, target):
        self.calls.append((source, target, block.seq_len, block.num_layers))
        return self.space.translate(block, source, target)


def test_mixed_schedule_translates_the_whole_cache_at_each_switch(pool):
    models, space = pool
    rec = RecordingSpace(space)
    res = mixed_generate(models, rec, PROMPT, [("a", 3), ("c", 4), ("c", 2), ("b", 3)])
    P = PROMPT.shape[1]
    assert res.models == ["a"] * 3 + ["c"] * 6 + ["b"] * 3 and len(res.tokens) == 12
    # the cache holds every read token: the prompt and the tokens generated so far, minus the pending one
    assert rec.calls == [("a", "c", P - 1 + 3, 2), ("c", "b", P - 1 + 9, 4)]
    assert [(s.source, s.target, s.positions) for s in res.switches] == [("a", "c", P + 2), ("c", "b", P + 8)]
    # independent: each segment equals generate() after the translated cache of the full text so far
    assert res.tokens[:3] == reference(models["a"], PROMPT, 3)
    seq = torch.cat([PROMPT, torch.tensor([res.tokens[:3]])], 1)  # [1, P+3]
    with torch.no_grad():
        moved = space.translate(extract_prefix(models["a"], seq[:, :-1]), "a", "c")
    assert res.tokens[3:9] == reference(models["c"], seq, 6, moved)


def test_mixed_with_one_model_equals_plain_generation(pool):
    models, space = pool
    rec = RecordingSpace(space)
    res = mixed_generate(models, rec, PROMPT, [("b", 4), ("b", 5)])
    assert res.tokens == reference(models["b"], PROMPT, 9) and rec.calls == [] and res.switches == []


def test_mixed_seeded_sampling_is_reproducible(pool):
    models, space = pool
    sched = [("a", 5), ("c", 5)]
    run = lambda seed: mixed_generate(models, space, PROMPT, sched, GenerationParams(temperature=1.0, seed=seed)).tokens
    assert run(11) == run(11) and run(11) != run(12)
    with pytest.raises(HandoffError, match=r"schedule\[1\].*'zz'"):
        mixed_generate(models, space, PROMPT, [("a", 2), ("zz", 2)])
    with pytest.raises(HandoffError, match="empty"):
        mixed_generate(models, space, PROMPT, [])
