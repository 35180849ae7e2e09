"""A pool whose members have real depths: a 30-layer grouped-query Llama (SmolLM2's depth and KV layout
at toy width, random weights) beside a 2-layer Gemma-2, served through Ray Serve with the depth-linear
(``per_layer``) adapter, and checked against the same computation in this process."""
from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
import torch  # noqa: E402

from kvlingua.generate import GenerationParams, handoff_generate  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from kvlingua.space_config import SpaceConfig  # noqa: E402
from tests.serve_apps.tiny_pool import build_tiny_pool  # noqa: E402

pytestmark = pytest.mark.ray
DEEP = {"kind": "llama", "layers": 30, "kv_heads": 3, "heads": 9, "head_dim": 8, "hidden": 72}
PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def deep_pool(tmp_path_factory):
    return build_tiny_pool(tmp_path_factory.mktemp("deep"), layers={"small": 2, "deep": 30}, shapes={"deep": DEEP},
                           space_cfg=SpaceConfig(q_dim=60, output="per_layer"))


@pytest.fixture(scope="module")
def deep(serve_url, deep_pool):
    """The deep pool's app at ``/deep`` beside the package's app; deleted afterwards."""
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.options import ServeOptions

    serve.run(build_app(deep_pool, ServeOptions(num_cpus=0.25, request_timeout_s=120)), name="deep",
              route_prefix="/deep")
    try:
        with httpx.Client(base_url=f"{serve_url}/deep", timeout=120) as client:
            yield client
    finally:
        serve.delete("deep")


def test_the_deep_pool_is_served_with_its_real_layout(deep, deep_pool):
    assert deep.get("/healthz").json()["models"] == ["small", "deep"]
    listed = {m["name"]: m for m in deep.get("/v1/pool").json()["models"]}
    assert listed["deep"]["num_layers"] == 30 and listed["small"]["num_layers"] == 2
    space = load_pool(deep_pool, load_models=False, verify=False).space
    assert space.cfg.output == "per_layer"


@pytest.mark.parametrize("source,target", [("small", "deep"), ("deep", "small"), ("deep", "deep")])
def test_latent_handoff_across_depths_equals_the_in_process_computation(deep, deep_pool, source, target):
    torch.set_num_threads(1)
    local = load_pool(deep_pool)
    ids = local.tokenizer.encode(PROMPT)
    want = handoff_generate(local.models, local.space, source, target, ids, GenerationParams(max_new_tokens=8),
                            handoff="latent", tokenizer=local.tokenizer)
    r = deep.post("/v1/generate", json={"source": source, "target": target, "prompt": ids, "max_new_tokens": 8,
                                        "handoff": "latent"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["handoff"] == "latent" and got["tokens"] == want.tokens and len(got["tokens"]) > 0


def test_openai_completion_hands_the_small_model_s_prompt_to_the_deep_one(deep, deep_pool):
    torch.set_num_threads(1)
    local = load_pool(deep_pool)
    ids = local.tokenizer.encode(PROMPT)
    want = handoff_generate(local.models, local.space, "small", "deep", ids, GenerationParams(max_new_tokens=6),
                            handoff="latent", tokenizer=local.tokenizer)
    r = deep.post("/v1/completions", json={"model": "deep", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                           "kvlingua": {"source": "small", "handoff": "latent"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "deep" and body["usage"]["completion_tokens"] == len(want.tokens)
    assert body["choices"][0]["text"] == local.tokenizer.decode(want.tokens, skip_special_tokens=True)
