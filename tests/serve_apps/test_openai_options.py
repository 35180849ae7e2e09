"""The OpenAI options real clients send (stop, logprobs, echo, n, list prompts, penalties, logit_bias),
driven by the official ``openai`` client and checked against independent computations: full-sequence
transformers forwards of the tiny pool's models, and Σ hand-offs computed here with ``kvlingua``."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
import torch  # noqa: E402

from kvlingua.cache import KVBlock, cache_kwargs, extract_prefix  # noqa: E402
from kvlingua.generate import GenerationParams, handoff_generate, model_cache  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from kvlingua.refresh import refresh_cache  # noqa: E402
from kvlingua.rotary import KeyRotation  # noqa: E402

pytestmark = pytest.mark.ray
PROMPT = "the cat sat on the mat and"
OTHER = "a dog ran in the park"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(pool_dir):
    torch.set_num_threads(1)
    return load_pool(pool_dir)


def ids_of(local, text):
    return local.tokenizer.encode(text)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[S, V]`` log-probabilities of one full-sequence forward (row s predicts token s + 1)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def greedy_text(local, target, ids, n, source=None):
    r = handoff_generate(local.models, local.space, source or target, target, ids, GenerationParams(max_new_tokens=n),
                         handoff="latent" if source else "text", tokenizer=local.tokenizer)
    return r.tokens, local.tokenizer.decode(r.tokens, skip_special_tokens=True)


def test_stop_cuts_before_the_stop_string_streaming_too(client, local):
    _, full = greedy_text(local, "b", ids_of(local, PROMPT), 12)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    want = full[:full.index(stop)]
    got = client.completions.create(model="b", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="b", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stop.strip() not in "".join(c.choices[0].text for c in chunks)
    plain = client.completions.create(model="b", prompt=PROMPT, max_tokens=12, temperature=0, stop="qqqq")
    assert plain.choices[0].text == full and plain.choices[0].finish_reason in ("length", "stop")


def test_logprobs_match_a_full_forward(client, local):
    ids = ids_of(local, PROMPT)
    got = client.completions.create(model="a", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    tokens, _ = greedy_text(local, "a", ids, 6)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tokens) == got.usage.completion_tokens
    ref = full_logprobs(local.models["a"], ids + tokens)  # [P+n, V]
    for i, (t, value, top) in enumerate(zip(tokens, lp.token_logprobs, lp.top_logprobs)):
        row = ref[len(ids) - 1 + i]
        assert abs(value - float(row[t])) < TOL
        best = torch.topk(row, 3)
        want = {local.tokenizer.decode([int(j)]): float(v) for v, j in zip(best.values, best.indices)}
        assert all(abs(top[k] - v) < TOL for k, v in want.items()) and len(top) in (3, 4)
        assert abs(max(top.values()) - float(row.max())) < TOL  # greedy: the chosen token is the best one
    assert lp.tokens == [local.tokenizer.decode([t]) for t in tokens]


def test_echo_scores_the_prompt_with_null_first(client, local):
    ids = ids_of(local, PROMPT)
    got = client.completions.create(model="c", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch = got.choices[0]
    assert ch.text == PROMPT and got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    ref = full_logprobs(local.models["c"], ids)
    assert len(ch.logprobs.token_logprobs) == len(ids)
    for j in range(1, len(ids)):
        assert abs(ch.logprobs.token_logprobs[j] - float(ref[j - 1, ids[j]])) < TOL
    # what lm-eval's local-completions sends for a loglikelihood: token ids, echo, max_tokens 1
    lm = client.completions.create(model="c", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0,
                                   seed=1234)
    values = lm.choices[0].logprobs.token_logprobs
    assert len(values) == len(ids) + 1 and values[1:len(ids)] == ch.logprobs.token_logprobs[1:]
    assert abs(values[-1] - float(ref[-1].max())) < TOL


@pytest.mark.parametrize("h", [1, 3])
def test_echo_through_a_path_alias_scores_what_the_target_computed(client, local, h):
    ids = ids_of(local, PROMPT)
    got = client.completions.create(model="b@a", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2,
                                    extra_body={"kvlingua": {"handoff_tokens": h}})
    values = got.choices[0].logprobs.token_logprobs
    assert values[:h + 1] == [None] * (h + 1)
    assert got.model_extra["kvlingua"]["handoff_used"] == "latent"
    assert got.model_extra["kvlingua"]["handed_over_positions"] == h
    # independently: a reads ids[:h]; b reads its own first k (its sink); Σ carries a's positions k..h-1, keys
    # un-rotated at a's positions and rotated at b's; b reads ids[h:] over it
    a, b = local.models["a"], local.models["b"]
    k = min(local.space.cfg.sink_tokens, h)
    with torch.no_grad():
        own = extract_prefix(a, torch.tensor([ids[:h]]))  # [1, h, L_a, D_a]
        block = extract_prefix(b, torch.tensor([ids[:k]]))  # [1, k, L_b, D_b]
        if h > k:
            body = KeyRotation.from_model(a).unrotate(KVBlock(own.keys[:, k:], own.values[:, k:], own.n_kv_heads), k)
            out = KeyRotation.from_model(b).rotate(local.space.decode(local.space.encode(body, "a"), "b"), k)
            block = KVBlock(torch.cat([block.keys, out.keys], 1), torch.cat([block.values, out.values], 1),
                            out.n_kv_heads)  # [1, h, L_b, D_b]
            # the space's refresh: what b's next token (ids[h]) leans on most, re-read by b
            block = refresh_cache(b, block, torch.tensor([ids[:h]]), torch.tensor([ids[h:h + 1]]),
                                  local.space.cfg.refresh, k)
        logits = b(input_ids=torch.tensor([ids[h:]]), **cache_kwargs(b, model_cache(b, block))).logits[0]
    ref = torch.log_softmax(logits.float(), -1)  # row r predicts ids[h + r + 1]
    for j in range(h + 1, len(ids)):
        assert abs(values[j] - float(ref[j - h - 1, ids[j]])) < TOL


def test_list_prompts_and_n_with_seed_equal_solo_requests(client, local):
    both = client.completions.create(model="a", prompt=[PROMPT, OTHER], max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    for c, text in zip(both.choices, (PROMPT, OTHER)):
        assert c.text == greedy_text(local, "a", ids_of(local, text), 5)[1]
    assert both.usage.prompt_tokens == len(ids_of(local, PROMPT)) + len(ids_of(local, OTHER))
    assert both.usage.completion_tokens == sum(len(greedy_text(local, "a", ids_of(local, t), 5)[0]) for t in (PROMPT, OTHER))
    many = client.completions.create(model="b@a", prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for j, c in enumerate(many.choices):
        solo = client.completions.create(model="b@a", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7 + j)
        assert c.text == solo.choices[0].text and c.model_extra["kvlingua"]["seed"] == 7 + j
    assert len({c.text for c in many.choices}) > 1


def test_penalties_and_logit_bias_match_an_independent_loop(client, local):
    ids = ids_of(local, PROMPT)
    model = local.models["a"]
    seq, counts = list(ids), {}
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            for t, n in counts.items():
                logits[t] -= 1.5 * n + 0.5
            seq.append(int(torch.argmax(logits)))
            counts[seq[-1]] = counts.get(seq[-1], 0) + 1
    want = local.tokenizer.decode(seq[len(ids):], skip_special_tokens=True)
    got = client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0, frequency_penalty=1.5,
                                    presence_penalty=0.5, extra_body={"kvlingua": {"ignore_eos": True}})
    assert got.choices[0].text == want
    word = local.tokenizer.encode(" moon")[-1]
    biased = client.completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(word): 100},
                                       logprobs=0)
    assert biased.choices[0].logprobs.tokens == [local.tokenizer.decode([word])] * 4
    assert biased.choices[0].finish_reason == "length" and biased.usage.completion_tokens == 4


def test_chat_logprobs_and_top_logprobs(client, local):
    from serve_apps.openai_api import render_chat

    messages = [{"role": "user", "content": PROMPT}]
    got = client.chat.completions.create(model="c@b", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    chat_ids = local.tokenizer.encode(render_chat(local.tokenizer, messages))
    tokens, text = greedy_text(local, "c", chat_ids, 4, source="b")
    assert got.choices[0].message.content == text
    assert [c.token for c in content] == [local.tokenizer.decode([t]) for t in tokens]
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < TOL for c in content)  # greedy picks the best


def test_concurrent_requests_answer_as_solo_ones(client):
    calls = [dict(model="a", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2),
             dict(model="b@a", prompt=[PROMPT, OTHER], max_tokens=5, temperature=0.9, seed=3, n=2),
             dict(model="c", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1),
             dict(model="b", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, presence_penalty=0.7,
                  logit_bias={"5": 3.0}),
             dict(model="b", prompt=OTHER, max_tokens=8, temperature=0, stop=[" the"], frequency_penalty=1.0),
             dict(model="a@c", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0,
                  extra_body={"kvlingua": {"handoff_tokens": 2}})]

    def run(kw):
        r = client.completions.create(**kw)
        return [(c.text, c.finish_reason, c.logprobs.token_logprobs if c.logprobs else None) for c in r.choices]

    solo = [run(kw) for kw in calls]
    with ThreadPoolExecutor(len(calls) * 2) as pool:
        together = list(pool.map(run, calls * 2))
    assert together == solo * 2


@pytest.mark.parametrize("body,param", [
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "NaN"}, "frequency_penalty"),
    ({"n": 0}, "n"),
    ({"n": 16, "prompt": ["x y"] * 9}, "n"),
    ({"echo": True, "stream": True}, "echo"),
    ({"echo": True, "logprobs": 1, "max_tokens": 0, "model": "b@a"}, "kvlingua.handoff_tokens"),
    ({"model": "b@a", "kvlingua": {"source": "c"}}, "kvlingua.source"),
    ({"model": "b@a:teleport"}, "model"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [PROMPT, [5]]}, "prompt"),
    ({"prompt": [PROMPT, "x" * 10_000]}, "prompt[1]"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"max_tokens": -1}, "max_tokens"),
])
def test_malformed_options_are_4xx_naming_the_field(server, body, param):
    r = server.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2} | body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "\n" not in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"echo": True}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_malformed_chat_options_are_4xx(server, body, param):
    r = server.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}]} | body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_alias_member_is_404(server):
    r = server.post("/v1/completions", json={"model": "b@zz", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_tokenizer_routes_are_the_pools_tokenizer(server, local):
    tok = local.tokenizer
    r = server.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(PROMPT, add_special_tokens=False)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 64
    back = server.post("/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.json()["prompt"] == tok.decode(r.json()["tokens"])
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    bad = server.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert server.post("/tokenize", json={"prompt": 5}).status_code == 400


def test_streamed_choices_interleave_and_equal_the_whole_answer(client):
    kw = dict(model="b@a", prompt=[PROMPT, OTHER], max_tokens=6, temperature=0.8, seed=5, n=2, logprobs=1)
    whole = client.completions.create(**kw)
    parts: dict[int, list] = {}
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            parts.setdefault(c.index, []).append(c)
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert sorted(parts) == [0, 1, 2, 3]
    for c in whole.choices:
        assert "".join(p.text for p in parts[c.index]) == c.text
        assert sum((p.logprobs.token_logprobs for p in parts[c.index] if p.logprobs), []) == c.logprobs.token_logprobs
        assert parts[c.index][-1].finish_reason == c.finish_reason
    chat = dict(model="c", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0.8, seed=2, n=2)
    whole = client.chat.completions.create(**chat)
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **chat):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}
