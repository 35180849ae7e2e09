"""Live: the Σ context store, trained limits, metrics, schema fuzzing, the pending cap and a pool that does not fit."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
import torch  # noqa: E402

from kvlingua.cache import KVBlock, cache_kwargs, extract_prefix  # noqa: E402
from kvlingua.generate import GenerationParams, make_generator, model_cache, sample_tokens  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from kvlingua.refresh import refresh_cache  # noqa: E402
from kvlingua.rotary import KeyRotation  # noqa: E402
from serve_apps.app import build_app  # noqa: E402
from serve_apps.options import ServeOptions  # noqa: E402
from tests.serve_apps.tiny_pool import SENTENCES  # noqa: E402

pytestmark = pytest.mark.ray
LIMITED_JOB = {"prefix_len": 6, "train": {"paths": [["a", "b"], ["b", "a"], ["a", "a"], ["b", "b"]]}}


@pytest.fixture(scope="module")
def local(pool_dir):
    torch.set_num_threads(1)
    return load_pool(pool_dir)


@pytest.fixture(scope="module")
def limited(serve_url, pool_dir, tmp_path_factory):
    """The same pool with a training job recorded (paths a<->b only, prefix_len 6), a pending cap of 2, at /limited."""
    from ray import serve

    root = tmp_path_factory.mktemp("limited") / "pool"
    shutil.copytree(pool_dir, root)
    meta = json.loads((root / "pool.json").read_text())
    meta["job"] = LIMITED_JOB
    meta["held_prefix_len"] = 6  # un-rotated keys: positions limit the pool only where measured (test_context_store.py)
    (root / "pool.json").write_text(json.dumps(meta))
    opts = ServeOptions(num_cpus=0.1, max_prompt_tokens=64, max_new_tokens=64, max_pending_requests=2,
                        request_timeout_s=30, verify=False)
    serve.run(build_app(root, opts), name="limited", route_prefix="/limited")
    with httpx.Client(base_url=f"{serve_url}/limited", timeout=60) as client:
        yield client
    serve.delete("limited")


def completion(client, body, status=200):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    return r.json()


def in_process_with_context(local, source, target, context, rest, n):
    """Independent reference: the target's own cache of the context's first k tokens (its sink), then
    OUT_target(IN_source(source's cache of the rest)) with keys un-rotated at the source's positions and rotated
    at the target's, and the space's refresh (probe ``rest[0]``); the target reads ``rest[:-1]``."""
    k = local.space.cfg.sink_tokens
    with torch.no_grad():
        model = local.models[target]
        own = extract_prefix(local.models[source], torch.tensor([context]))  # [1, C, L_s, D_s]
        body = KeyRotation.from_model(local.models[source]).unrotate(
            KVBlock(own.keys[:, k:], own.values[:, k:], own.n_kv_heads), k)  # [1, C-k, L_s, D_s]
        out = KeyRotation.from_model(model).rotate(local.space.decode(local.space.encode(body, source), target), k)
        sink = extract_prefix(model, torch.tensor([context[:k]]))  # [1, k, L, D]
        block = KVBlock(torch.cat([sink.keys, out.keys], 1), torch.cat([sink.values, out.values], 1),
                        out.n_kv_heads)  # [1, C, L, D]
        # the space's refresh: the positions the first token read after the context leans on, re-read by the target
        block = refresh_cache(model, block, torch.tensor([context]), torch.tensor([rest[:1]]), local.space.cfg.refresh, k)
        cache = model_cache(model, block)
        if len(rest) > 1:
            model(input_ids=torch.tensor([rest[:-1]]), use_cache=True, **cache_kwargs(model, cache))
        gen, _ = make_generator(0)
        return list(sample_tokens(model, cache, rest[-1], GenerationParams(max_new_tokens=n, stop_at_eos=False), gen))


def test_stored_context_answers_equal_the_plain_prompt_through_the_same_handoff(server, local):
    tok = local.tokenizer
    context = tok.encode(" ".join(SENTENCES[:3]))
    rest = tok.encode("the cat sat")
    stored = server.post("/v1/contexts", json={"model": "a", "tokens": context}).json()
    assert stored["positions"] == len(context) and stored["bytes"] == 2 * (len(context) - local.space.cfg.sink_tokens) * local.space.cfg.q_dim * 4  # the sink stays out of Σ
    cid = stored["id"]
    ext = {"ignore_eos": True}
    for target in ("b", "c", "b"):  # b twice: its decoded copy of the context is reused
        want = in_process_with_context(local, "a", target, context, rest, 8)
        named = completion(server, {"model": target, "prompt": rest, "max_tokens": 8, "temperature": 0,
                                    "kvlingua": {"context_id": cid, **ext}})
        plain = completion(server, {"model": target, "prompt": context + rest, "max_tokens": 8, "temperature": 0,
                                    "kvlingua": {"source": "a", "handoff_tokens": len(context), "use_store": False,
                                                 **ext}})
        auto = completion(server, {"model": target, "prompt": context + rest, "max_tokens": 8, "temperature": 0,
                                   "kvlingua": {"source": "a", **ext}})
        assert named["choices"][0]["text"] == plain["choices"][0]["text"] == auto["choices"][0]["text"] \
            == tok.decode(want, skip_special_tokens=True)
        assert named["kvlingua"]["context_id"] == auto["kvlingua"]["context_id"] == cid
        assert plain["kvlingua"]["context_id"] is None
        assert named["usage"]["prompt_tokens"] == len(context) + len(rest)
    # a one-token question: the default plain hand-off (all but the last token) is exactly the context
    one = completion(server, {"model": "c", "prompt": context + rest[:1], "max_tokens": 6, "temperature": 0,
                              "kvlingua": {"source": "a", "use_store": False}})
    named = completion(server, {"model": "c", "prompt": rest[:1], "max_tokens": 6, "temperature": 0,
                                "kvlingua": {"context_id": cid}})
    assert named["choices"][0]["text"] == one["choices"][0]["text"]

    listed = server.get("/v1/contexts").json()
    assert [c["id"] for c in listed["data"]] == [cid] and listed["bytes"] == stored["bytes"] and listed["hits"] >= 4
    assert server.post("/v1/contexts", json={"model": "a", "tokens": context}).json()["id"] == cid  # kept once
    assert server.delete(f"/v1/contexts/{cid}").json()["deleted"] is True
    gone = server.post("/v1/completions", json={"model": "b", "prompt": rest, "kvlingua": {"context_id": cid}})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "context_not_found"
    assert server.get("/v1/contexts").json()["bytes"] == 0


def test_decode_for_decodes_a_stored_context_before_the_first_request(server, local):
    tok = local.tokenizer
    context, rest = tok.encode(" ".join(SENTENCES[3:5])), tok.encode("the dog")
    stored = server.post("/v1/contexts", json={"model": "a", "tokens": context, "decode_for": ["b", "c", "b"]})
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert set(body["decoded_for"]) == {"b", "c"} and all(s > 0 for s in body["decoded_for"].values())
    for target in ("b", "c"):
        want = in_process_with_context(local, "a", target, context, rest, 6)
        named = completion(server, {"model": target, "prompt": rest, "max_tokens": 6, "temperature": 0,
                                    "kvlingua": {"context_id": body["id"], "ignore_eos": True}})
        assert named["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        assert named["kvlingua"]["decoded"] is False  # the first request found the decoded copy
    again = server.post("/v1/contexts", json={"model": "a", "tokens": context, "decode_for": ["b"]}).json()
    assert again["decoded_for"] == {"b": 0.0}  # held already: nothing decoded twice
    bad = server.post("/v1/contexts", json={"model": "a", "tokens": context, "decode_for": ["zz"]})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "decode_for[0]"
    server.delete(f"/v1/contexts/{body['id']}")


def test_outside_trained_limits_falls_back_to_text_or_is_refused_when_strict(limited, local):
    ids = local.tokenizer.encode("the cat sat")  # 3 tokens: 2 handed-over positions, within prefix_len 6
    text = completion(limited, {"model": "c", "prompt": ids, "max_tokens": 5, "temperature": 0,
                                "kvlingua": {"source": "a", "handoff": "text"}})
    fell = completion(limited, {"model": "c", "prompt": ids, "max_tokens": 5, "temperature": 0,
                                "kvlingua": {"source": "a"}})
    assert fell["kvlingua"]["handoff_used"] == "text" and "never trained the path a -> c" in fell["kvlingua"]["handoff_reason"]
    assert fell["choices"][0]["text"] == text["choices"][0]["text"]
    ok = completion(limited, {"model": "b", "prompt": ids, "max_tokens": 2, "kvlingua": {"source": "a"}})
    assert ok["kvlingua"]["handoff_used"] == "latent" and ok["kvlingua"]["handoff_reason"] is None
    long = local.tokenizer.encode(SENTENCES[0])  # 10 tokens: 9 positions > 6
    fell = completion(limited, {"model": "b", "prompt": long, "max_tokens": 2, "kvlingua": {"source": "a"}})
    assert "measured to hold its content up to 6" in fell["kvlingua"]["handoff_reason"]
    for prompt, what in ((ids, "a -> c"), (long, "up to 6")):
        r = limited.post("/v1/completions", json={"model": "c" if prompt is ids else "b", "prompt": prompt,
                                                  "kvlingua": {"source": "a", "strict": True}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "outside_trained_limits", r.text
        assert what in r.json()["error"]["message"]
    r = limited.post("/v1/generate", json={"source": "a", "target": "c", "prompt": ids, "strict": True})
    assert r.status_code == 400 and "a -> c" in r.json()["detail"]


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + want + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_requests_ttft_and_store(server, local):
    before = server.get("/metrics").text
    ids = local.tokenizer.encode("a dog ran in the park")
    for _ in range(3):
        completion(server, {"model": "b", "prompt": ids, "max_tokens": 2, "kvlingua": {"source": "c"}})
    server.post("/v1/completions", json={"model": "zz", "prompt": ids})
    cid = server.post("/v1/contexts", json={"model": "c", "tokens": ids[:4]}).json()["id"]
    completion(server, {"model": "b", "prompt": ids[4:], "max_tokens": 2, "kvlingua": {"context_id": cid}})
    after = server.get("/metrics").text
    route = {"route": "/v1/completions"}
    assert metric(after, "kvlingua_requests_total", status="200", **route) - \
        metric(before, "kvlingua_requests_total", status="200", **route) == 4
    assert metric(after, "kvlingua_requests_total", status="404", **route) - \
        metric(before, "kvlingua_requests_total", status="404", **route) == 1
    ttft = "kvlingua_time_to_first_token_seconds_count"
    assert metric(after, ttft, **route) - metric(before, ttft, **route) == 4
    assert metric(after, "kvlingua_translate_seconds_sum", **route) > metric(before, "kvlingua_translate_seconds_sum", **route)
    assert metric(after, "kvlingua_store_hits_total") - metric(before, "kvlingua_store_hits_total") >= 1
    assert metric(after, "kvlingua_store_bytes") == server.get("/v1/contexts").json()["bytes"] > 0
    server.delete(f"/v1/contexts/{cid}")


def ray_metric_sum(text: str, name: str, **labels) -> float | None:
    """Sum of ``name`` over the series of Ray's export carrying ``labels`` (None when there is none)."""
    total, seen = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total, seen = total + float(m.group(2)), True
    return total if seen else None


def test_the_same_metrics_reach_ray_s_prometheus_endpoint(server, local):
    """Ray exports the ingress's counters (``ray_kvlingua_*``) on its own metrics port: equal to /metrics."""
    import httpx

    from tests.serve_apps.conftest import METRICS_PORT

    ids = local.tokenizer.encode("the moon")
    completion(server, {"model": "b", "prompt": ids, "max_tokens": 2})
    want = metric(server.get("/metrics").text, "kvlingua_requests_total", route="/v1/completions", status="200")
    deadline, got = time.monotonic() + 60, None
    while time.monotonic() < deadline and got != want:  # exported every second (conftest), bounded wait
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT['port']}/metrics", timeout=10).text
        got = ray_metric_sum(text, "ray_kvlingua_requests_total", application="kvlingua", route="/v1/completions",
                             status="200")
        time.sleep(0.5)
    assert want >= 1 and got == want


OK_GEN = {"source": "a", "target": "b", "prompt": "the cat", "max_new_tokens": 2}
OK_CMPL = {"model": "b", "prompt": "the cat", "max_tokens": 2}
OK_CHAT = {"model": "b", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 2}
OK_MIXED = {"prompt": "the cat", "schedule": [{"model": "a", "max_new_tokens": 1}]}
OK_CTX = {"model": "a", "text": "the cat"}
BAD_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "-1", "0", "99999999999999999999999999", '"5"', "true",
              "null", "[]", "{}", '"x"', "1.5", "[1e999]", "[-3]", "[128]", "[99999999999999999999]"]


def fuzz_bodies():
    """(route, raw JSON body) pairs: every field of every route set to each bad value, plus broken bodies."""
    routes = {"/v1/generate": OK_GEN, "/v1/completions": OK_CMPL, "/v1/chat/completions": OK_CHAT,
              "/v1/generate/mixed": OK_MIXED, "/v1/contexts": OK_CTX}
    out = []
    for route, ok in routes.items():
        fields = list(ok) + ["temperature", "top_p", "seed", "kvlingua", "stream", "context_id", "tokens"]
        for f in fields:
            for v in BAD_VALUES:
                body = json.dumps({**ok, f: "__V__"}).replace('"__V__"', v)
                out.append((route, body))
        out += [(route, ""), (route, "{"), (route, "[" * 5000 + "]" * 5000), (route, '"text"'),
                (route, json.dumps({**ok, "prompt": "x " * 100_000})), (route, json.dumps([ok])),
                (route, json.dumps({**ok, "extra_field": 1}))]
    out += [("/v1/completions", json.dumps({**OK_CMPL, "kvlingua": {"source": "a", "handoff_tokens": 50}})),
            ("/v1/completions", json.dumps({**OK_CMPL, "kvlingua": {"context_id": "../../x"}})),
            ("/v1/chat/completions", json.dumps({**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]})),
            ("/v1/chat/completions", json.dumps({**OK_CHAT, "messages": [{"role": "user", "content": NaN_STR}]})),
            ("/v1/generate/mixed", json.dumps({**OK_MIXED, "schedule": [{"model": "a", "max_new_tokens": 70}]}))]
    return out


NaN_STR = float("nan")


def test_every_malformed_request_gets_a_4xx(server):
    bodies = fuzz_bodies()
    assert len(bodies) > 400
    served = []
    for route, body in bodies:
        r = server.post(route, content=body.encode(), headers={"content-type": "application/json"})
        if r.status_code == 200:  # a value that happens to be valid for that field (e.g. stream: true)
            served.append((route, body[:80]))
            continue
        assert 400 <= r.status_code < 500, (route, body[:200], r.status_code, r.text[:300])
        assert r.json()  # the error body itself encodes
    assert len(served) < len(bodies) // 4
    for path in ("/v1/contexts/nope", "/v1/contexts/../../etc"):
        assert 400 <= server.delete(path).status_code < 500
    assert server.get("/v1/nothing").status_code == 404
    assert completion(server, OK_CMPL)["choices"][0]["text"] is not None


def test_pending_cap_answers_503_with_retry_after_and_zero_5xx_below_it(limited, local):
    """12 loopback clients against a cap of 2 for at most ~8 s: some 503 + Retry-After, nothing else but 200."""
    body = {"model": "a", "prompt": local.tokenizer.encode("the cat"), "max_tokens": 48, "temperature": 0,
            "kvlingua": {"ignore_eos": True}}
    below = [limited.post("/v1/completions", json=body).status_code for _ in range(3)]  # one at a time: below the cap
    assert below == [200, 200, 200]
    codes, retry, lock = [], [], threading.Lock()
    deadline = time.monotonic() + 8

    def client() -> None:
        with httpx.Client(base_url=str(limited.base_url), timeout=30) as c:
            while time.monotonic() < deadline:
                r = c.post("/v1/completions", json=body)
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 503:
                        retry.append(r.headers.get("retry-after"))
                if len(codes) > 200:
                    return

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, codes
    assert set(retry) == {"1"}


def test_a_model_that_cannot_be_scheduled_is_reported_and_never_hangs(serve_url, pool_dir):
    """A replica asking for 50 CPUs on a 2-CPU Ray: /healthz says so (503), requests answer 503 at once."""
    from ray import serve
    from ray.serve.api import _run

    _run(build_app(pool_dir, ServeOptions(num_cpus=50, request_timeout_s=3, verify=False, **{"max_new_tokens": 8})),
         _blocking=False, name="unfit", route_prefix="/unfit")
    try:
        with httpx.Client(base_url=f"{serve_url}/unfit", timeout=30) as c:
            end = time.monotonic() + 90
            while (h := c.get("/healthz")).status_code == 404 and time.monotonic() < end:
                time.sleep(0.5)  # the ingress is starting
            assert h.status_code == 503 and h.json()["status"] == "degraded"
            assert all(state != "RUNNING" for state in h.json()["replicas"].values()), h.json()
            t0 = time.monotonic()
            r = c.post("/v1/completions", json={"model": "a", "prompt": "the cat", "max_tokens": 2})
            assert r.status_code == 503 and "no running replica" in r.json()["error"]["message"]
            assert time.monotonic() - t0 < 10
    finally:
        serve.delete("unfit", _blocking=False)
