"""The OpenAI-compatible routes, driven by the official ``openai`` client against the live server."""
from __future__ import annotations

import itertools

import pytest

openai = pytest.importorskip("openai")
import torch  # noqa: E402

from kvlingua.generate import GenerationParams, handoff_generate  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from serve_apps.openai_api import render_chat  # noqa: E402

pytestmark = pytest.mark.ray
PROMPT = "the cat sat on the mat and"
PAIRS = list(itertools.product("abc", "abc"))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(pool_dir):
    torch.set_num_threads(1)
    return load_pool(pool_dir)


def greedy(local, source, target, ids, n):
    return handoff_generate(local.models, local.space, source, target, ids, GenerationParams(max_new_tokens=n),
                            handoff="latent", tokenizer=local.tokenizer).tokens


def test_models_in_openai_list_shape(client, pool_dir):
    listed = client.models.list()
    # the members, then TARGET@SOURCE for every trained path (a pool written without its job trusts all nine)
    assert [m.id for m in listed.data] == ["a", "b", "c"] + [f"{t}@{s}" for t in "abc" for s in "abc"]
    assert all(m.object == "model" and m.owned_by == "kvlingua" for m in listed.data)
    alias = listed.data[3 + 1]  # a@b
    assert alias.model_extra["kvlingua"] | {"max_positions": None} == {"target": "a", "source": "b", "handoff": "latent",
                                                                       "trained": True, "max_positions": None}


@pytest.mark.parametrize("source,target", PAIRS)
def test_completion_chat_and_stream_for_every_pair(client, local, source, target):
    ext = {"kvlingua": {"source": source}}
    ids = local.tokenizer.encode(PROMPT)
    want = local.tokenizer.decode(greedy(local, source, target, ids, 6), skip_special_tokens=True)
    got = client.completions.create(model=target, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=ext)
    assert got.object == "text_completion" and got.model == target
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.prompt_tokens == len(ids) and got.usage.total_tokens == len(ids) + got.usage.completion_tokens
    assert got.model_extra["kvlingua"]["handoff_used"] == "latent"

    pieces = list(client.completions.create(model=target, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=ext))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want
    assert pieces[-1].usage.completion_tokens == got.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == got.choices[0].finish_reason

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    chat_ids = local.tokenizer.encode(render_chat(local.tokenizer, messages))
    want_chat = local.tokenizer.decode(greedy(local, source, target, chat_ids, 5), skip_special_tokens=True)
    chat = client.chat.completions.create(model=target, messages=messages, max_tokens=5, temperature=0, extra_body=ext)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want_chat and chat.usage.prompt_tokens == len(chat_ids)
    deltas = list(client.chat.completions.create(model=target, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body=ext))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == want_chat


def test_plain_chat_template_is_documented_lines():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert render_chat(None, msgs) == "system: s\nuser: hi\nassistant:"


def test_stream_ends_with_done_line(server):
    body = {"model": "b", "prompt": PROMPT, "max_tokens": 3, "stream": True, "kvlingua": {"source": "a"}}
    with server.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("call,status,code", [
    (lambda c: c.completions.create(model="zz", prompt=PROMPT, max_tokens=2), 404, "model_not_found"),
    (lambda c: c.completions.create(model="a", prompt=PROMPT, max_tokens=10_000), 400, None),
    (lambda c: c.completions.create(model="a", prompt=PROMPT, max_tokens=2, n=17), 400, "invalid_value"),
    (lambda c: c.chat.completions.create(model="a", messages=[], max_tokens=2), 400, "invalid_value"),
    (lambda c: c.completions.create(model="a", prompt=PROMPT, extra_body={"kvlingua": {"source": "q"}}), 404,
     "model_not_found"),
])
def test_errors_in_openai_shape(client, call, status, code):
    with pytest.raises(openai.APIStatusError) as e:
        call(client)
    assert e.value.status_code == status
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"] and (code is None or err["code"] == code)
