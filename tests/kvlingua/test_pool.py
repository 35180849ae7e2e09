"""A trained pool on disk: round trip, and refusal of anything that no longer matches."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvlingua.cache import arch_summary, extract_prefix, fingerprint
from kvlingua.pool import PoolMember, PoolMismatchError, load_pool, save_pool, verify_member
from kvlingua.space import SharedSpace
from kvlingua.translator import SpaceConfig
from tests.helpers import tiny_model

torch.set_num_threads(1)
CFG = SpaceConfig(q_dim=32)


def _tokenizer_dir(path):
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return path


@pytest.fixture
def pool(tmp_path):
    """Two tiny models saved under tmp_path/models, a randomised space, and a saved pool at tmp_path/pool."""
    built = {"seed-1": tiny_model("gemma2", seed=1, layers=2), "seed-2": tiny_model("llama", seed=2, layers=4,
                                                                                      hidden=64, kv_heads=2)}
    members = []
    for name, model in built.items():
        model.save_pretrained(str(tmp_path / "models" / name))
        members.append(PoolMember(name, f"../models/{name}", arch_summary(model), fingerprint(model)))
    torch.manual_seed(0)
    space = SharedSpace({m.name: m.summary for m in members}, CFG)
    with torch.no_grad():
        for p in space.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # trained-looking adapters (the stack projections are no longer zero)
    root = save_pool(tmp_path / "pool", space, members, tokenizer_dir=_tokenizer_dir(tmp_path / "tok"),
                     extra={"trained_steps": 7})
    return {"root": root, "space": space, "members": members, "models": built, "tmp": tmp_path}


def test_pool_json_records_everything(pool):
    meta = json.loads((pool["root"] / "pool.json").read_text())
    assert meta["format"] == 1 and meta["trained_steps"] == 7 and meta["space"]["q_dim"] == 32
    counts = pool["space"].param_counts()
    for entry, m in zip(meta["members"], pool["members"]):
        assert entry == {"name": m.name, "path": m.path, "summary": m.summary.to_dict(),
                         "fingerprint": m.fingerprint, "params": counts[m.name]}
    assert sorted(p.name for p in pool["root"].glob("adapters-*.safetensors")) == [
        "adapters-seed-1.safetensors", "adapters-seed-2.safetensors"]
    assert (pool["root"] / "tokenizer" / "tokenizer.json").is_file()


def test_round_trip_translates_identically(pool):
    loaded = load_pool(pool["root"])
    assert [m.name for m in loaded.members] == ["seed-1", "seed-2"]
    assert loaded.members[0].path == str((pool["tmp"] / "models" / "seed-1").resolve())  # relative to the pool dir
    assert [m.fingerprint for m in loaded.members] == [m.fingerprint for m in pool["members"]]
    assert loaded.tokenizer("the cat sat")["input_ids"] == [1, 2, 3]
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    for src in ("seed-1", "seed-2"):
        block = extract_prefix(pool["models"][src], ids)
        assert torch.equal(extract_prefix(loaded.models[src], ids).keys, block.keys)  # same frozen model
        for tgt in ("seed-1", "seed-2"):
            a, b = pool["space"].translate(block, src, tgt), loaded.space.translate(block, src, tgt)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    light = load_pool(pool["root"], load_models=False)
    assert light.models == {} and light.space.names == ["seed-1", "seed-2"]
    half = load_pool(pool["root"], dtype=torch.bfloat16)  # verified in fp32, then cast
    assert next(half.models["seed-1"].parameters()).dtype == torch.bfloat16
    assert next(half.space.parameters()).dtype == torch.float32


def test_missing_checkpoint_is_named(pool):
    shutil.rmtree(pool["tmp"] / "models" / "seed-2")
    for kw in ({}, {"load_models": False}):
        with pytest.raises(FileNotFoundError, match="model 'seed-2': checkpoint directory not found"):
            load_pool(pool["root"], **kw)
    resolved = load_pool(pool["root"], load_models=False, verify=False).members  # paths made absolute
    verify_member(resolved[0])  # the other member's config still checks out
    with pytest.raises(FileNotFoundError, match="model 'seed-2'"):
        verify_member(resolved[1])


def test_changed_weights_are_refused(pool):
    model = pool["models"]["seed-2"]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(str(pool["tmp"] / "models" / "seed-2"))
    with pytest.raises(PoolMismatchError, match=r"model 'seed-2': fingerprint [0-9a-f]{8}\.\. != "
                                                r"[0-9a-f]{8}\.\. \(weights changed"):
        load_pool(pool["root"])
    load_pool(pool["root"], verify=False)  # an explicit opt-out still loads


def test_different_architecture_is_refused(pool):
    shutil.rmtree(pool["tmp"] / "models" / "seed-1")
    tiny_model("gemma2", seed=1, layers=4).save_pretrained(str(pool["tmp"] / "models" / "seed-1"))
    with pytest.raises(PoolMismatchError, match="model 'seed-1'.*num_layers: 4 != 2"):
        load_pool(pool["root"])
    with pytest.raises(PoolMismatchError, match="model 'seed-1'.*num_layers: 4 != 2"):
        load_pool(pool["root"], load_models=False)  # caught from config.json alone
    shutil.rmtree(pool["tmp"] / "models" / "seed-1")
    tiny_model("gemma2", seed=1, layers=2, head_dim=16).save_pretrained(str(pool["tmp"] / "models" / "seed-1"))
    with pytest.raises(PoolMismatchError, match="model 'seed-1'.*head_dim: 16 != 8"):
        load_pool(pool["root"])


def test_tampered_adapter_file_is_refused(pool):
    f = pool["root"] / "adapters-seed-1.safetensors"
    state = load_file(str(f))
    state["out.layers.1.ff_up.weight"] = torch.zeros(3, 16)
    save_file(state, str(f))
    with pytest.raises(PoolMismatchError, match=r"model 'seed-1': adapter tensor 'out.layers.1.ff_up.weight' .* "
                                                r"shape \(3, 16\), the space config needs \(16, 16\)"):
        load_pool(pool["root"], load_models=False)


def test_save_refuses_inconsistent_input(pool, tmp_path):
    space, members = pool["space"], pool["members"]
    with pytest.raises(ValueError, match="do not match the space's models"):
        save_pool(tmp_path / "p2", space, members[::-1])
    with pytest.raises(ValueError, match="reserved pool.json keys"):
        save_pool(tmp_path / "p2", space, members, extra={"members": []})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_pool(tmp_path / "p2", space, members, extra={"when": object()})
    with pytest.raises(FileNotFoundError, match="pool directory"):
        load_pool(tmp_path / "nowhere")
