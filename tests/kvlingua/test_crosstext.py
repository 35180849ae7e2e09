"""Hand-offs between models that tokenize differently: text in, each model's own tokens, Σ read along the map."""
from __future__ import annotations

import pytest
import torch

from kvlingua.align import NO_CHARS, text_ends
from kvlingua.cache import arch_summary, extract_prefix
from kvlingua.crosstext import handoff_text
from kvlingua.generate import GenerationParams, HandoffError, handoff_generate
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from tests.helpers import CROSS_TEXT, cross_tokenizer_pool, generate_after, tiny_model

TEXT = CROSS_TEXT


@pytest.fixture(scope="module")
def pool():
    return cross_tokenizer_pool()



def test_text_ends_count_characters_from_the_end_of_the_text(pool):
    _, _, toks = pool
    ids, ends = text_ends(toks["b"], TEXT)
    assert ids[0] == toks["b"].bos_token_id and ends[0] == NO_CHARS and ends[-1] == 0
    for i in range(1, len(ids)):  # independently: what decodes after token i is -ends[i] characters
        after = toks["b"].decode(ids[i + 1:])
        if "\ufffd" not in after:
            assert ends[i] == -len(after)


def test_latent_handoff_across_tokenizers_reads_sigma_along_the_map(pool):
    models, space, toks = pool
    res = handoff_text(models, space, "a", "b", TEXT, GenerationParams(max_new_tokens=8), tokenizers=toks)
    src, src_ends = text_ends(toks["a"], TEXT)
    tgt, tgt_ends = text_ends(toks["b"], TEXT)
    assert res.prompt_tokens == len(tgt) and res.handoff_positions == len(tgt) - 1
    # independently, position by position: target position t >= 1 reads the last source token (after the
    # source's own sink) that ends at or before t's end; position 0 is b's own <bos>
    k = 1
    with torch.no_grad():
        z = space.encode(_body(models["a"], src, space, k), "a")  # [1, S-k, Q]
        rows = []
        for t in range(k, len(tgt) - 1):
            ok = [i for i in range(k, len(src)) if src_ends[i] <= tgt_ends[t]]
            rows.append((ok[-1] if ok else k) - k)
        zt = z.map(lambda x: x[:, rows])  # [1, T-1-k, Q]
        out = space.decode(zt, "b")
        from kvlingua.refresh import refresh_cache
        from kvlingua.view import CacheView, model_rotation
        view = CacheView.of(space.cfg)
        sink = extract_prefix(models["b"], torch.tensor([tgt[:k]]))
        block = view.to_cache(out, model_rotation(models["b"]), sink)  # [1, T-1, L, D]
        # the space's refresh, probed by the token b reads next (its last prompt token)
        block = refresh_cache(models["b"], block, torch.tensor([tgt]), torch.tensor([tgt[-1:]]), space.cfg.refresh, k)
    assert res.tokens == generate_after(models["b"], tgt, 8, block)
    assert res.text == toks["b"].decode(res.tokens, skip_special_tokens=True)


def _body(model, ids, space, k):
    from kvlingua.view import CacheView, model_rotation
    block = extract_prefix(model, torch.tensor([ids]))  # [1, S, L, D]: the whole text
    return CacheView.of(space.cfg).to_space(block, model_rotation(model))


def test_text_handoff_is_the_target_reading_its_own_tokens(pool):
    models, space, toks = pool
    res = handoff_text(models, space, "a", "b", TEXT, GenerationParams(max_new_tokens=8), handoff="text",
                       tokenizers=toks)
    assert res.tokens == generate_after(models["b"], text_ends(toks["b"], TEXT)[0], 8)


def test_one_tokenizer_hands_over_to_the_id_route_unchanged(pool):
    models, space, toks = pool
    same = {"a": toks["a"], "b": toks["a"]}
    ids = text_ends(toks["a"], TEXT)[0]
    models_same = {"a": models["a"], "b": tiny_model("gemma2", seed=3, layers=3, vocab=300)}
    sp = SharedSpace({n: arch_summary(m) for n, m in models_same.items()}, SpaceConfig(q_dim=24, init="random"))
    sp.eval()
    got = handoff_text(models_same, sp, "a", "b", TEXT, GenerationParams(max_new_tokens=6), tokenizers=same)
    want = handoff_generate(models_same, sp, "a", "b", ids, GenerationParams(max_new_tokens=6), tokenizer=toks["a"])
    assert got.tokens == want.tokens


def test_identity_across_tokenizers_and_missing_tokenizers_are_refused(pool):
    models, space, toks = pool
    with pytest.raises(HandoffError, match="tokenize differently"):
        handoff_text(models, space, "a", "b", TEXT, handoff="identity", tokenizers=toks)
    with pytest.raises(HandoffError, match="has no tokenizer"):
        handoff_text(models, space, "a", "b", TEXT, tokenizers={"a": toks["a"]})
    with pytest.raises(HandoffError, match="empty"):
        handoff_text(models, space, "a", "b", "", tokenizers=toks)
