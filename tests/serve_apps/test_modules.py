"""Serving modules: a soft prompt learned on model a, ported through Σ to each target over HTTP."""
from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
import torch  # noqa: E402

from kvlingua.generate import GenerationParams  # noqa: E402
from kvlingua.modules.port import ModuleLibrary, generate_after, meta_prompt_len  # noqa: E402
from kvlingua.modules.prompt import ModuleError  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from serve_apps.app import check_pool  # noqa: E402
from serve_apps.options import ServeOptions  # noqa: E402
from tests.serve_apps.conftest import MODULE  # noqa: E402

pytestmark = pytest.mark.ray
PROMPT = "a dog ran"


@pytest.fixture(scope="module")
def local(pool_dir):
    torch.set_num_threads(1)
    return load_pool(pool_dir)


@pytest.fixture(scope="module")
def library(local, modules_dir):
    """The same modules in this process: the independent reference ports them here."""
    return ModuleLibrary(local.space, local.models, {m.name: m.fingerprint for m in local.members}, modules_dir,
                         meta_prompt_len(local.meta))


def post(client, body, path="/v1/generate", status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_modules_listed_with_the_model_each_was_learned_on(server):
    listed = server.get("/v1/modules").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["model"], m["prompt_len"], m["object"]) for m in listed["data"]] == [(MODULE, "a", 4, "module")]


def test_module_ported_once_per_target_answers_as_in_process_generate_after(server, local, library):
    ids = local.tokenizer.encode(PROMPT)
    greedy = GenerationParams(max_new_tokens=8, stop_at_eos=False)
    changed = []
    for target in ("c", "a", "c", "b"):
        want = generate_after(local.models[target], library.block(MODULE, target), ids, greedy)
        got = post(server, {"target": target, "module": MODULE, "prompt": ids, "max_new_tokens": 8,
                            "ignore_eos": True})
        assert got["tokens"] == want and (got["module"], got["source"], got["handoff_used"]) == (MODULE, "a", "latent")
        plain = post(server, {"target": target, "prompt": ids, "max_new_tokens": 8, "ignore_eos": True})
        changed.append(plain["tokens"] != want)
    assert any(changed)  # the module's block makes a difference the comparison can see
    chat = post(server, {"model": "c", "prompt": ids, "max_tokens": 8, "temperature": 0,
                         "kvlingua": {"module": MODULE, "ignore_eos": True}}, "/v1/completions")
    assert chat["choices"][0]["text"] == local.tokenizer.decode(
        generate_after(local.models["c"], library.block(MODULE, "c"), ids, greedy), skip_special_tokens=True)
    assert chat["kvlingua"]["module"] == MODULE
    (entry,) = server.get("/v1/modules").json()["data"]
    assert entry["encoded"] == 1 and entry["decoded"] == {"a": 1, "b": 1, "c": 1}  # IN_a once; OUT_j once per target


def test_unknown_module_or_model_and_bad_combinations_are_4xx_in_the_routes_shape(server, local):
    ids = local.tokenizer.encode(PROMPT)
    r = server.post("/v1/generate", json={"target": "b", "module": "nope", "prompt": ids})
    assert r.status_code == 404 and "unknown module 'nope'" in r.json()["detail"] and MODULE in r.json()["detail"]
    r = server.post("/v1/generate", json={"target": "zz", "module": MODULE, "prompt": ids})
    assert r.status_code == 404 and "unknown model 'zz'" in r.json()["detail"]
    r = server.post("/v1/generate", json={"source": "b", "target": "c", "module": MODULE, "prompt": ids})
    assert r.status_code == 400 and "module" in r.json()["detail"]
    r = server.post("/v1/completions", json={"model": "b", "prompt": ids, "kvlingua": {"module": "nope"}})
    err = r.json()["error"]
    assert r.status_code == 404 and (err["param"], err["code"]) == ("kvlingua.module", "module_not_found")
    r = server.post("/v1/completions", json={"model": "zz", "prompt": ids, "kvlingua": {"module": MODULE}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_damaged_module_is_refused_before_serving(pool_dir, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a module")
    with pytest.raises(ModuleError, match="bad.safetensors"):
        check_pool(pool_dir, ServeOptions(modules_dir=str(tmp_path), verify=False))
