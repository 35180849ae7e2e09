"""A served replica decodes Σ with its token prior (kvlingua.prior) at its own tokens, as the core hand-off does:
a live hand-off reads them from its prompt, a stored context from the payload."""
from __future__ import annotations

import torch

from kvlingua.cache import sink_block
from kvlingua.config import to_dict
from kvlingua.generate import as_prompt, prefill, translate_block
from kvlingua.pool import load_pool, save_pool
from kvlingua.space_config import SpaceConfig
from kvlingua.view import model_rotation, translate_cache
from serve_apps.model_server import PoolModelServer
from serve_apps.options import ServeOptions
from tests.serve_apps.tiny_pool import build_tiny_pool

PROMPT = "the cat sat on the mat and the dog sat on the log"


def test_a_replica_decodes_with_its_prior_from_the_prompt_or_the_payload(tmp_path):
    torch.set_num_threads(1)
    built = build_tiny_pool(tmp_path / "built", space_cfg=SpaceConfig(q_dim=32, token_prior=4, refresh=0))
    pool = load_pool(built)
    ids = pool.tokenizer.encode(PROMPT)
    prior = pool.space.adapters("c")["prior"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prior.ids.copy_(torch.tensor(sorted(set(ids[1:-1]))[:4]))  # tokens the prompt holds after its sink
        prior.shift_keys.copy_(torch.randn(prior.shift_keys.shape, generator=g))
        prior.shift_values.copy_(torch.randn(prior.shift_values.shape, generator=g))
    root = save_pool(tmp_path / "prior", pool.space, pool.members, tokenizer_dir=tmp_path / "built" / "tokenizer")
    pool = load_pool(root)

    _replica_decodes_as_the_hand_off(pool, root, ids)  # the prior changes this prompt's decode


def test_a_replica_reads_its_token_readout_through_its_own_embeddings(tmp_path):
    """A pool with token readouts: load_pool binds each to its member's embedding, and a replica (which loads only
    its own model) decodes a live hand-off and a stored payload as the core hand-off does; the readout changes it."""
    torch.set_num_threads(1)
    built = build_tiny_pool(tmp_path / "built", space_cfg=SpaceConfig(q_dim=32, token_readout=True, refresh=0))
    pool = load_pool(built)
    readout = pool.space.adapters("c")["readout"]
    assert all(pool.space.adapters(m)["readout"].bound for m in pool.space.names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        readout.keys.weight.copy_(torch.randn(readout.keys.weight.shape, generator=g) * 0.1)
        readout.values.weight.copy_(torch.randn(readout.values.weight.shape, generator=g) * 0.1)
    root = save_pool(tmp_path / "readout", pool.space, pool.members, tokenizer_dir=tmp_path / "built" / "tokenizer")
    pool = load_pool(root)

    _replica_decodes_as_the_hand_off(pool, root, pool.tokenizer.encode(PROMPT))  # the readout changes it


def _replica_decodes_as_the_hand_off(pool, root, ids):
    """Replica ``c`` decodes ``a``'s latent of ``ids`` as ``translate_block`` does, from the prompt (live) and from a
    stored payload's ids alike, and that decode differs from Σ's without the target's tokens."""
    prompt = as_prompt(ids)  # [1, P]
    own = prefill(pool.models["a"], prompt)  # [1, P-1, L, D]: what the sender holds
    want = translate_block(pool.space, own, "a", "c", pool.models["a"], pool.models["c"], prompt)
    rotations = model_rotation(pool.models["a"]), model_rotation(pool.models["c"])
    plain = translate_cache(pool.space, own, "a", "c", *rotations, sink_block(pool.models["c"], prompt[:, :1]))
    assert not torch.allclose(want.values, plain.values, atol=1e-3)

    opts = to_dict(ServeOptions(verify=False))
    a, c = PoolModelServer(str(root), "a", opts), PoolModelServer(str(root), "c", opts)
    payload = a.export_latent(ids)
    live, _ = c._payload_block(payload, prompt)
    stored, _ = c._payload_block(payload | {"context_id": "ctx-1", "ids": ids[1:-1]})  # no prompt: the payload's ids
    for got in (live, stored):
        torch.testing.assert_close(got.keys.float(), want.keys.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values.float(), want.values.float(), rtol=0, atol=1e-5)
