"""Caches cross Ray between the ingress and the model replicas as WireTensors: no torch tensor on
the wire, so neither Ray's ZeroCopyTensorsWarning nor torch's read-only-array warning, in this
process or in any replica, and nothing writes into the object store's read-only buffers."""
from __future__ import annotations

from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
import torch  # noqa: E402

from kvlingua.config import to_dict  # noqa: E402
from kvlingua.generate import GenerationParams, handoff_generate  # noqa: E402
from kvlingua.mixed import mixed_generate  # noqa: E402
from kvlingua.pool import load_pool  # noqa: E402
from serve_apps.model_server import PoolModelServer  # noqa: E402
from serve_apps.options import ServeOptions  # noqa: E402
from tests.serve_apps.tiny_pool import SENTENCES  # noqa: E402
from tests.workers.test_host import transport_warnings_are_errors  # noqa: E402
from workers.wire import WireTensor, tensor_from_wire  # noqa: E402

pytestmark = pytest.mark.ray
PROMPT = "the cat sat on the mat and"
TRANSPORT_WARNINGS = ("ZeroCopyTensorsWarning", "is not writable")


@pytest.fixture(scope="module")
def local(pool_dir):
    torch.set_num_threads(1)
    return load_pool(pool_dir)


def _through_store(ray, obj):
    """``obj`` as another process on this node receives it (numpy buffers read-only, out of the store)."""
    return ray.get(ray.put(obj))


def _wires(payload: dict) -> list[WireTensor]:
    return [v for v in payload.values() if isinstance(v, WireTensor)]


def test_replica_payloads_are_wire_tensors_read_in_place_and_never_written(serve_url, pool_dir, local):
    """The replicas' own code, in this process (where warnings are visible), over read-only store buffers:
    a latent hand-off a -> c, a raw (identity) hand-off a -> b, and a mixed schedule a -> c -> a."""
    import ray

    opts = to_dict(ServeOptions(verify=False))
    a, b, c = (PoolModelServer(str(pool_dir), n, opts) for n in "abc")
    ids = local.tokenizer.encode(PROMPT)
    greedy = GenerationParams(max_new_tokens=8)
    params = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0, stop_at_eos=True)
    with transport_warnings_are_errors():
        latent = _through_store(ray, a.export_latent(ids))
        raw = _through_store(ray, a.export_block(ids))
        kept = [{k: tensor_from_wire(w, copy=True) for k, w in p.items() if isinstance(w, WireTensor)}
                for p in (latent, raw)]
        got_latent = c.generate(ids, params, latent)
        got_raw = b.generate(ids, params, raw)
    assert all(not w.data.flags.writeable for w in _wires(latent) + _wires(raw))  # the case the test is about
    for got, target, handoff in ((got_latent, "c", "latent"), (got_raw, "b", "identity")):
        ref = handoff_generate(local.models, local.space, "a", target, ids, greedy, handoff=handoff,
                               tokenizer=local.tokenizer)
        assert got["tokens"] == ref.tokens
    for payload, before in zip((latent, raw), kept):  # read in place by the targets, and never written
        assert all(torch.equal(tensor_from_wire(payload[k], copy=False), before[k]) for k in ("keys", "values"))

    sched = [("a", 3), ("c", 3), ("a", 2)]
    want = mixed_generate(local.models, local.space, ids, sched, GenerationParams(temperature=1.0, seed=4,
                                                                                  stop_at_eos=False))
    mp = dict(params, temperature=1.0, seed=4, stop_at_eos=False, max_new_tokens=8)
    servers = {"a": a, "c": c}
    tokens, history, pending, state = [], [], ids[-1], None
    with transport_warnings_are_errors():
        for k, (name, n) in enumerate(sched):
            context = None if k == 0 else [out["own"] if owner == name else out["latent"] for owner, out in history]
            out = _through_store(ray, servers[name].segment(ids, pending, n, mp, state, context, k < len(sched) - 1))
            assert isinstance(out["generator_state"], WireTensor)
            tokens += out["tokens"]
            pending, state = out["tokens"][-1], out["generator_state"]
            history.append((name, out))
    assert tokens == want.tokens


def _session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def _transport_warnings_logged() -> list[str]:
    """Lines of this Ray session's worker logs (every replica's stderr) naming a transport warning."""
    hits = []
    for path in _session_logs().rglob("*"):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            for line in path.read_text(errors="replace").splitlines():
                if any(w in line for w in TRANSPORT_WARNINGS):
                    hits.append(f"{path.name}: {line.strip()[:200]}")
    return hits


def test_served_handoff_stored_context_and_mixed_log_no_transport_warning(server, local):
    ids = local.tokenizer.encode(PROMPT)
    r = server.post("/v1/generate", json={"source": "a", "target": "c", "prompt": ids, "max_new_tokens": 6,
                                          "use_store": False})  # not a context an earlier test stored
    assert r.status_code == 200, r.text
    want = handoff_generate(local.models, local.space, "a", "c", ids, GenerationParams(max_new_tokens=6),
                            handoff="latent", tokenizer=local.tokenizer)
    assert r.json()["tokens"] == want.tokens
    context = local.tokenizer.encode(SENTENCES[1])
    cid = server.post("/v1/contexts", json={"model": "b", "tokens": context}).json()["id"]
    for target in ("a", "c"):
        r = server.post("/v1/completions", json={"model": target, "prompt": ids, "max_tokens": 4,
                                                 "kvlingua": {"context_id": cid}})
        assert r.status_code == 200, r.text
    body = {"prompt": PROMPT, "seed": 2, "temperature": 1.0, "schedule": [
        {"model": "b", "max_new_tokens": 2}, {"model": "c", "max_new_tokens": 2}, {"model": "b", "max_new_tokens": 2}]}
    assert server.post("/v1/generate/mixed", json=body).status_code == 200
    server.delete(f"/v1/contexts/{cid}")
    assert _transport_warnings_logged() == []
