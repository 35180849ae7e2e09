"""A served pool whose members tokenize differently: text in, text out, Σ read along the token map.

Two tiny models with two byte-level BPEs (``a``: 290 tokens, no BOS; ``b``: 330 tokens with ``<bos>`` first),
served at ``/mixed`` beside the package's app, checked against the same computation in this process:
:func:`kvlingua.crosstext.handoff_text` for hand-offs, :func:`kvlingua.crossmixed.mixed_text` for mixed schedules,
and a stored context decoded along the map from kvlingua's pieces for the context store.
"""
from __future__ import annotations

import random

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import torch  # noqa: E402

from kvlingua.align import text_ends, token_map  # noqa: E402
from kvlingua.cache import arch_summary, cache_kwargs, extract_prefix, fingerprint  # noqa: E402
from kvlingua.crossmixed import mixed_text  # noqa: E402
from kvlingua.crosstext import handoff_text  # noqa: E402
from kvlingua.generate import (GenerationParams, eos_ids, make_generator, model_cache, sample_tokens,  # noqa: E402
                               translate_block)
from kvlingua.pool import load_pool, save_pool  # noqa: E402
from kvlingua.pool_members import PoolMember  # noqa: E402
from kvlingua.space import SharedSpace  # noqa: E402
from kvlingua.space_config import SpaceConfig  # noqa: E402
from serve_apps.openai_api import render_chat  # noqa: E402
from tests.serve_apps.test_transport import _transport_warnings_logged  # noqa: E402
from tests.helpers import bpe_tokenizer, tiny_model  # noqa: E402

pytestmark = pytest.mark.ray
WORDS = ("the cat sat on the mat and looked at the moon a dog ran in the park with a red ball "
         "el niño comió piña").split()
PROMPT = "the cat sat on the mat and looked at the moon while el niño comió piña"
CONTEXT = "a dog ran in the park with a red ball and the cat sat on the mat"
REST = " and looked at the moon"
N = 6


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory):
    """Models ``a`` (Gemma-2, 2 layers) and ``b`` (Llama, 3 layers, 2 KV heads), each with its own tokenizer."""
    root = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(20)]
    bpe_tokenizer(docs, 290, root / "tok-a")
    bpe_tokenizer(docs, 330, root / "tok-b", bos=True)
    models = {"a": tiny_model("gemma2", seed=0, layers=2, vocab=290),
              "b": tiny_model("llama", seed=1, layers=3, kv_heads=2, vocab=330)}
    members = []
    for name, model in models.items():
        model.save_pretrained(str(root / "models" / name))
        members.append(PoolMember(name, str(root / "models" / name), arch_summary(model), fingerprint(model)))
    torch.manual_seed(0)
    space = SharedSpace({m.name: m.summary for m in members}, SpaceConfig(q_dim=24, init="random"))
    return save_pool(root / "pool", space, members, tokenizers={"a": root / "tok-a", "b": root / "tok-b"})


@pytest.fixture(scope="module")
def local(mixed_pool):
    torch.set_num_threads(1)
    pool = load_pool(mixed_pool)
    assert pool.mixed_tokenizers
    return pool


@pytest.fixture(scope="module")
def mixed(serve_url, mixed_pool):
    """The mixed pool's app at ``/mixed`` beside the package's app; deleted afterwards."""
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.options import ServeOptions

    opts = ServeOptions(num_cpus=0.25, request_timeout_s=60, max_prompt_tokens=128, max_new_tokens=16)
    serve.run(build_app(mixed_pool, opts), name="mixed", route_prefix="/mixed")
    try:
        with httpx.Client(base_url=f"{serve_url}/mixed", timeout=60) as client:
            yield client
    finally:
        serve.delete("mixed")


@pytest.fixture(scope="module")
def client(mixed, serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/mixed/v1", api_key="unused", max_retries=0, timeout=60)


def reference(local, source, target, text, n=N, handoff="latent"):
    return handoff_text(local.models, local.space, source, target, text, GenerationParams(max_new_tokens=n),
                        handoff=handoff, tokenizers=local.tokenizers)


@pytest.mark.parametrize("source,target", [("a", "b"), ("b", "a")])
def test_each_model_answers_from_the_other_s_latent_as_in_process(client, mixed, local, source, target):
    want = reference(local, source, target, PROMPT)
    assert want.prompt_tokens != len(text_ends(local.tokenizers[source], PROMPT)[0])  # the two really differ
    got = client.completions.create(model=target, prompt=PROMPT, max_tokens=N, temperature=0,
                                    extra_body={"kvlingua": {"source": source}})
    ext = got.model_extra["kvlingua"]
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.tokens)
    assert got.usage.prompt_tokens == want.prompt_tokens  # the target's tokens
    assert ext["handoff_used"] == "latent" and ext["handed_over_positions"] == want.handoff_positions
    alias = client.completions.create(model=f"{target}@{source}", prompt=PROMPT, max_tokens=N, temperature=0)
    assert alias.choices[0].text == want.text
    pieces = list(client.completions.create(model=target, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            extra_body={"kvlingua": {"source": source}}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want.text

    r = mixed.post("/v1/generate", json={"source": source, "target": target, "prompt": PROMPT, "max_new_tokens": N})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == want.tokens and r.json()["text"] == want.text

    short = reference(local, source, target, "the")  # nothing past the target's own sink: it reads "the" itself
    r = mixed.post("/v1/generate", json={"source": source, "target": target, "prompt": "the", "max_new_tokens": N})
    assert r.json()["tokens"] == short.tokens

    text = reference(local, source, target, PROMPT, handoff="text")  # the target reads its own tokens
    r = mixed.post("/v1/generate", json={"source": source, "target": target, "prompt": PROMPT, "max_new_tokens": N,
                                         "handoff": "text"})
    assert r.json()["tokens"] == text.tokens

    messages = [{"role": "user", "content": PROMPT}]  # rendered by the target's tokenizer (no template: plain lines)
    chat_want = reference(local, source, target, render_chat(local.tokenizers[target], messages))
    chat = client.chat.completions.create(model=target, messages=messages, max_tokens=N, temperature=0,
                                          extra_body={"kvlingua": {"source": source}})
    assert chat.choices[0].message.content == chat_want.text and chat.usage.prompt_tokens == chat_want.prompt_tokens


def stored_reference(local, source, target, context, rest, n=N):
    """A context read by ``source``, decoded for ``target`` (along the map where they tokenize differently), then
    ``rest`` read by ``target`` and ``n`` greedy tokens: kvlingua's pieces, in process. Returns (tokens, h)."""
    models, space, toks = local.models, local.space, local.tokenizers
    k = space.cfg.sink_tokens
    src_ids, src_ends = text_ends(toks[source], context)
    block = extract_prefix(models[source], torch.tensor([src_ids]))  # [1, C, L_s, D_s]
    if toks[source] is toks[target] or toks[source].get_vocab() == toks[target].get_vocab():
        ctx_ids, ids, index = src_ids, src_ids + text_ends(toks[target], rest)[0], None  # the token-id route
    else:
        ctx_ids, ctx_ends = text_ends(toks[target], context)
        ids = text_ends(toks[target], context + rest)[0]
        index = token_map(torch.tensor([src_ends[k:]]), torch.tensor([ctx_ends[k:]]))  # [1, Tc-k]
    with torch.no_grad():
        decoded = translate_block(space, block, source, target, models[source], models[target],
                                  torch.tensor([ctx_ids]), index=index)  # [1, Tc, L_t, D_t]
        h = next((i for i, (x, y) in enumerate(zip(ids, ctx_ids)) if x != y), min(len(ids), len(ctx_ids)))
        h = min(h, len(ids) - 1)
        cache = model_cache(models[target], decoded.map(lambda t: t[:, :h]))
        if len(ids) - 1 > h:
            models[target](input_ids=torch.tensor([ids[h:-1]]), use_cache=True, **cache_kwargs(models[target], cache))
        gen, _ = make_generator(0)
        tokens = list(sample_tokens(models[target], cache, ids[-1], GenerationParams(max_new_tokens=n), gen,
                                    stop_ids=eos_ids(models[target], toks[target])))
    return tokens, h


def test_one_stored_context_is_decoded_by_both_members_as_in_process(client, mixed, local):
    stored = mixed.post("/v1/contexts", json={"model": "a", "text": CONTEXT, "decode_for": ["a", "b"]})
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["tokens"] == len(text_ends(local.tokenizers["a"], CONTEXT)[0])
    assert set(body["decoded_for"]) == {"a", "b"} and all(s > 0 for s in body["decoded_for"].values())
    cid = body["id"]
    for target in ("b", "a"):
        want, h = stored_reference(local, "a", target, CONTEXT, REST)
        r = mixed.post("/v1/generate", json={"target": target, "prompt": REST, "context_id": cid, "max_new_tokens": N})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == want and r.json()["context_id"] == cid
        got = client.completions.create(model=target, prompt=REST, max_tokens=N, temperature=0,
                                        extra_body={"kvlingua": {"context_id": cid}})
        ext = got.model_extra["kvlingua"]
        assert got.choices[0].text == local.tokenizers[target].decode(want, skip_special_tokens=True)
        assert ext["handed_over_positions"] == h > 0 and ext["decoded"] is False  # decoded once, by decode_for
    assert mixed.delete(f"/v1/contexts/{cid}").json()["deleted"] is True


def test_a_request_after_a_context_takes_the_positions_its_text_alone_tokenizes_to(local):
    from serve_apps.crosstok import TextContext, context_request
    from kvlingua.context_store import ContextKey

    tok_a, tok_b = local.tokenizers["a"], local.tokenizers["b"]
    context, rest = "the mat and the ca", "t sat"  # b reads " cat" across the cut
    src_ids, src_ends = text_ends(tok_a, context)
    z = torch.zeros(1, len(src_ids) - 1, 24)  # [1, C-k, Q]
    ctx = TextContext(ContextKey("t", "s", "d"), src_ids, "a", z, z, 1, text=context, ends=src_ends)
    ids, h, extras = context_request(ctx, tok_b, rest, sink=1)
    alone = text_ends(tok_b, context)[0]
    assert ids == text_ends(tok_b, context + rest)[0] and ids[:h] == alone[:h] and ids[h] != alone[h]
    assert h < len(alone) and extras["sink_ids"] == alone[:1] == [tok_b.bos_token_id]
    assert len(extras["index"]) == len(alone) - 1 and max(extras["index"]) < z.shape[1]
    assert context_request(ctx, tok_b, "", sink=1)[1] == len(alone) - 1  # all but the last at most


def one_line_400(r, *words):
    assert r.status_code == 400, r.text
    body = r.json()
    message = body["error"]["message"] if "error" in body else body["detail"]
    assert isinstance(message, str) and "\n" not in message and all(w in message for w in words), message
    return message


def test_what_needs_one_tokenizer_is_refused_with_one_line(mixed, local):
    ids_a = text_ends(local.tokenizers["a"], PROMPT)[0]
    one_line_400(mixed.post("/v1/completions", json={"model": "b", "prompt": ids_a, "kvlingua": {"source": "a"}}),
                 "token ids", "tokenize differently")
    one_line_400(mixed.post("/v1/generate", json={"source": "a", "target": "b", "prompt": ids_a, "max_new_tokens": 2}),
                 "send the prompt as text")
    one_line_400(mixed.post("/v1/completions", json={"model": "b@a:identity", "prompt": PROMPT}), "identity",
                 "tokenize differently")
    one_line_400(mixed.post("/v1/generate/mixed", json={"prompt": ids_a, "schedule": [
        {"model": "a", "max_new_tokens": 2}, {"model": "b", "max_new_tokens": 2}]}), "token ids", "tokenize differently")
    cid = mixed.post("/v1/contexts", json={"model": "a", "tokens": ids_a}).json()["id"]  # ids: only a can read it
    one_line_400(mixed.post("/v1/completions", json={"model": "b", "prompt": REST, "kvlingua": {"context_id": cid}}),
                 "store it as text")
    mixed.delete(f"/v1/contexts/{cid}")
    one_line_400(mixed.post("/tokenize", json={"prompt": PROMPT}), "name the model")
    # each member's tokenizer over HTTP; its own ids (no source) are accepted
    tok = mixed.post("/tokenize", json={"prompt": PROMPT, "model": "b"}).json()
    assert tok["tokens"] == text_ends(local.tokenizers["b"], PROMPT)[0]
    assert mixed.post("/detokenize", json={"tokens": ids_a[:5], "model": "a"}).json()["prompt"] == \
        local.tokenizers["a"].decode(ids_a[:5])
    assert mixed.get("/tokenizer_info", params={"model": "b"}).json()["vocab_size"] == 330
    plain = mixed.post("/v1/generate", json={"target": "a", "prompt": ids_a, "max_new_tokens": 3})
    assert plain.status_code == 200 and plain.json()["tokens"] == \
        reference(local, "a", "a", PROMPT, n=3, handoff="text").tokens


def schedule_body(sched, **kw):
    return {"prompt": PROMPT, "schedule": [{"model": m, "max_new_tokens": n} for m, n in sched], **kw}


@pytest.mark.parametrize("sched,params", [
    ([("a", 4), ("b", 5), ("a", 3), ("b", 2)], {}),
    ([("b", 3), ("b", 3), ("a", 5), ("b", 4)], {"temperature": 1.0, "seed": 5}),
])
def test_a_mixed_schedule_across_tokenizers_is_mixed_text_in_process(mixed, local, sched, params):
    """Each switch re-tokenizes the text so far for the new model; served, the ingress plans and measures and the
    replicas encode, read and sample: the same tokens, writers, text and switches as in one process."""
    want = mixed_text(local.models, local.space, PROMPT, sched,
                      GenerationParams(stop_at_eos=False, **params), tokenizers=local.tokenizers)
    r = mixed.post("/v1/generate/mixed", json=schedule_body(sched, ignore_eos=True, **params))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"] == want.tokens and got["models"] == want.models and got["text"] == want.text
    assert got["prompt_tokens"] == want.prompt_tokens == len(text_ends(local.tokenizers[sched[0][0]], PROMPT)[0])
    spans = [(s.source, s.target, s.start, s.end, s.positions) for s in want.switches]
    assert [(s["source"], s["target"], s["start"], s["end"], s["positions"]) for s in got["switches"]] == spans
    assert {s[:2] for s in spans} == {("a", "b"), ("b", "a")}, "the test's premise: both read the other through Σ"
    assert got["new_tokens"] == sum(n for _, n in sched) and got["finish_reason"] == "length"
    assert _transport_warnings_logged() == []  # caches and Σ runs crossed as WireTensors, read in place


def test_a_schedule_of_one_tokenizer_keeps_the_token_route_in_a_mixed_pool(mixed, local):
    ids = text_ends(local.tokenizers["b"], PROMPT)[0]
    want = mixed_text(local.models, local.space, PROMPT, [("b", 3), ("b", 2)], tokenizers=local.tokenizers)
    for prompt in (PROMPT, ids):  # text, or b's own token ids
        got = mixed.post("/v1/generate/mixed", json={**schedule_body([("b", 3), ("b", 2)]), "prompt": prompt}).json()
        assert got["tokens"] == want.tokens and got["switches"] == [] and got["text"] == want.text


def test_bad_schedules_across_tokenizers_are_refused_in_one_line(mixed):
    cross = [("a", 2), ("b", 2)]
    one_line_400(mixed.post("/v1/generate/mixed", json={**schedule_body(cross), "prompt": ""}), "prompt", "empty")
    one_line_400(mixed.post("/v1/generate/mixed", json=schedule_body([("a", 10), ("b", 10)])), "schedule", "16")
    one_line_400(mixed.post("/v1/generate/mixed", json={**schedule_body(cross), "prompt": "moon " * 300}),
                 "prompt", "128")
    r = mixed.post("/v1/generate/mixed", json=schedule_body([("a", 2), ("zz", 2)]))
    assert r.status_code == 404 and "zz" in r.json()["detail"]
    assert mixed.post("/v1/generate/mixed", json={"prompt": PROMPT, "schedule": []}).status_code == 422
    assert mixed.post("/v1/generate/mixed", json=schedule_body([("a", 0), ("b", 2)])).status_code == 422
