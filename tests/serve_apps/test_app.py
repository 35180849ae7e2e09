"""End to end: a real HTTP server on 127.0.0.1 serving a tiny trained pool through Ray Serve."""
from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kvlingua.generate import GenerationParams, handoff_generate  # noqa: E402
from kvlingua.mixed import mixed_generate  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402

pytestmark = pytest.mark.ray
PROMPT = "the cat sat on the mat and"


@pytest.fixture(scope="module")
def local(pool_dir):
    """The same pool loaded in this process (for independent reference computations)."""
    torch.set_num_threads(1)
    return load_pool(pool_dir)


def post(client, body, path="/v1/generate"):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_models_and_openapi(server, pool_dir):
    health = server.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": ["a", "b", "c"],
                             "replicas": {"a": "RUNNING", "b": "RUNNING", "c": "RUNNING"}}
    listed = server.get("/v1/pool").json()
    meta = json.loads((pool_dir / "pool.json").read_text())
    assert [(m["name"], m["num_layers"], m["fingerprint"]) for m in listed["models"]] == [
        (m["name"], m["summary"]["num_layers"], m["fingerprint"]) for m in meta["members"]]
    assert listed["q_dim"] == meta["space"]["q_dim"] and listed["max_prompt_tokens"] == 64
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/models", "/v1/pool", "/v1/generate", "/v1/generate/mixed", "/v1/completions",
            "/v1/chat/completions", "/v1/contexts", "/metrics"} <= set(paths)


def test_text_handoff_greedy_equals_transformers_generate(server, pool_dir):
    tok = AutoTokenizer.from_pretrained(str(pool_dir / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(pool_dir.parent / "models" / "b"), attn_implementation="eager")
    ids = torch.tensor([tok.encode(PROMPT)])
    want = model.generate(ids, do_sample=False, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    got = post(server, {"source": "a", "target": "b", "prompt": PROMPT, "max_new_tokens": 12, "handoff": "text"})
    assert got["tokens"] == want and got["text"] == tok.decode(want, skip_special_tokens=True)
    assert got["prompt_tokens"] == ids.shape[1] and got["new_tokens"] == len(want)
    assert got["timings"]["decode_s"] > 0 and got["finish_reason"] in ("eos", "length")


@pytest.mark.parametrize("source,target,handoff", [("a", "c", "latent"), ("c", "b", "latent"), ("a", "b", "identity")])
def test_handoffs_equal_the_in_process_computation(server, local, source, target, handoff):
    ids = local.tokenizer.encode(PROMPT)
    want = handoff_generate(local.models, local.space, source, target, ids, GenerationParams(max_new_tokens=10),
                            handoff=handoff, tokenizer=local.tokenizer)
    got = post(server, {"source": source, "target": target, "prompt": ids, "max_new_tokens": 10, "handoff": handoff})
    assert got["tokens"] == want.tokens and got["handoff"] == handoff


def test_mixed_schedule_equals_in_process_mixed_generate(server, local):
    ids = local.tokenizer.encode(PROMPT)
    sched = [("a", 3), ("c", 4), ("c", 1), ("b", 3), ("a", 2), ("b", 2)]
    want = mixed_generate(local.models, local.space, ids, sched,
                          GenerationParams(temperature=1.0, seed=9, stop_at_eos=False))
    body = {"prompt": PROMPT, "schedule": [{"model": m, "max_new_tokens": n} for m, n in sched],
            "temperature": 1.0, "seed": 9, "ignore_eos": True}
    got = post(server, body, "/v1/generate/mixed")
    assert got["tokens"] == want.tokens
    assert got["models"] == want.models == ["a"] * 3 + ["c"] * 5 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    P = len(ids)
    # each segment is translated once into each model that reads it, from the model that computed it
    a1, c1, b1, a2 = P - 1 + 3, 5, 3, 2
    assert [(s["source"], s["target"], s["positions"]) for s in got["switches"]] == [
        (s.source, s.target, s.positions) for s in want.switches] == [
        ("a", "c", a1), ("a", "b", a1), ("c", "b", c1), ("c", "a", c1), ("b", "a", b1), ("a", "b", a2)]
    assert all(set(s) == {"source", "target", "positions"} for s in got["switches"])  # spans only across tokenizers


def test_fixed_seed_same_output_other_seed_differs(server):
    body = {"source": "a", "target": "c", "prompt": PROMPT, "max_new_tokens": 24, "temperature": 1.5}
    first = post(server, {**body, "seed": 5})
    assert post(server, {**body, "seed": 5})["tokens"] == first["tokens"] and first["seed"] == 5
    assert post(server, {**body, "seed": 6})["tokens"] != first["tokens"]


def sse(client, body):
    """Token ids of a streamed request and its final ``done`` event."""
    tokens, done, event = [], None, None
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert event != "error", data
                if event == "done":
                    done = data
                else:
                    tokens.append(data["token"])
    return tokens, done


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_streaming_yields_the_non_streaming_tokens(server, extra):
    body = {"source": "b", "target": "c", "prompt": PROMPT, "max_new_tokens": 12, **extra}
    plain = post(server, body)
    tokens, done = sse(server, body)
    assert tokens == plain["tokens"] == done["tokens"] and done["text"] == plain["text"]


OK = {"source": "a", "target": "b", "prompt": PROMPT, "max_new_tokens": 4}
MALFORMED = [
    ({**OK, "target": "zz"}, 404, "target: unknown model 'zz'"),
    ({**OK, "source": "nope"}, 404, "source: unknown model 'nope'"),
    ({**OK, "prompt": ""}, 400, "prompt: empty"),
    ({**OK, "prompt": []}, 400, "prompt: empty"),
    ({**OK, "prompt": list(range(4, 104))}, 400, "100 tokens; this server accepts at most 64"),
    ({**OK, "prompt": [5, 999]}, 400, "outside the vocabulary"),
    ({**OK, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({**OK, "max_new_tokens": 10_000}, 400, "max_new_tokens: 10000 exceeds"),
    ({**OK, "temperature": -1}, 422, "temperature"),
    ({**OK, "top_p": 0}, 422, "top_p"),
    ({**OK, "top_p": 1.5}, 422, "top_p"),
    ({**OK, "seed": -2}, 422, "seed"),
    ({**OK, "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({**OK, "prompt": 5}, 422, "prompt"),
    ({**OK, "handoff": "fax"}, 422, "handoff"),
    ({**OK, "speed": 11}, 422, "speed"),
    ({k: v for k, v in OK.items() if k != "target"}, 422, "target"),
    ({**OK, "target": "c", "handoff": "identity"}, 400, "identity handoff needs equal cache layouts"),
    ("{not json", 422, "JSON"),
    ([1, 2, 3], 422, "valid dictionary"),
]
MIXED_BAD = [
    ({"prompt": PROMPT, "schedule": []}, 422, "schedule"),
    ({"prompt": PROMPT, "schedule": [{"model": "a", "max_new_tokens": 2}, {"model": "q", "max_new_tokens": 2}]},
     404, "schedule[1].model: unknown model 'q'"),
    ({"prompt": PROMPT, "schedule": [{"model": "a", "max_new_tokens": 40}, {"model": "b", "max_new_tokens": 40}]},
     400, "total max_new_tokens"),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    cases = [(b, s, m, "/v1/generate") for b, s, m in MALFORMED] + [(b, s, m, "/v1/generate/mixed") for b, s, m in MIXED_BAD]
    assert len(cases) >= 10
    for body, status, message, path in cases:
        if isinstance(body, str):
            r = server.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = server.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        assert message.lower() in r.text.lower(), (message, r.text)
    assert post(server, OK)["new_tokens"] >= 1


def test_concurrent_clients_under_load_have_zero_errors(server):
    """8 loopback clients for at most ~10 s (or 12 requests each), mixing every kind of request.

    Every request is deterministic, so each answer must equal the one given to a lone
    request: concurrent requests never share a cache or a random generator.
    """
    bodies = [
        ("/v1/generate", {"source": "a", "target": "c", "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0.7,
                          "seed": 4, "ignore_eos": True}),
        ("/v1/generate", {"source": "c", "target": "b", "prompt": PROMPT, "max_new_tokens": 8, "handoff": "text"}),
        ("/v1/generate", {"target": "a", "prompt": PROMPT, "max_new_tokens": 8, "stream": True}),
        ("/v1/generate/mixed", {"prompt": PROMPT, "seed": 1, "schedule": [{"model": "b", "max_new_tokens": 4},
                                                                          {"model": "c", "max_new_tokens": 4}]}),
    ]
    alone = [post(server, body, path)["tokens"] if not body.get("stream") else None for path, body in bodies]
    base = str(server.base_url)
    deadline = time.monotonic() + 10
    done, errors = [], []

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            for k in range(12):
                if time.monotonic() > deadline:
                    return
                j = (i + k) % len(bodies)
                path, body = bodies[j]
                try:
                    r = c.post(path, json=body)
                    ok = r.status_code == 200 and '"tokens"' in r.text
                    if ok and alone[j] is not None:
                        ok = r.json()["tokens"] == alone[j]
                    (done if ok else errors).append((j, r.status_code, r.text[:200]))
                except httpx.HTTPError as e:
                    errors.append((j, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and len(done) >= 8
