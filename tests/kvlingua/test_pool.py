"""A trained pool on disk: round trip, relocation, and refusal of anything that no longer matches."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvlingua.cache import arch_summary, extract_prefix, fingerprint
from kvlingua.pool import load_pool, save_pool
from kvlingua.pool_members import PoolMember, PoolMismatchError, PoolNotFoundError, verify_member
from kvlingua.rundir import main_space, read_run_pools, space_pool_dir
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
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
    assert meta["format"] == 2 and meta["trained_steps"] == 7 and meta["space"]["q_dim"] == 32
    assert meta["tokenizer"] == "tokenizer"
    counts = pool["space"].param_counts()
    for entry, m in zip(meta["members"], pool["members"]):
        adapter_bytes = (pool["root"] / f"adapters-{m.name}.safetensors").read_bytes()
        assert entry == {"name": m.name, "path": m.path,  # beside the pool: recorded relative to it
                         "path_when_saved": str((pool["tmp"] / "models" / m.name).resolve()),
                         "summary": m.summary.to_dict(), "fingerprint": m.fingerprint,
                         "adapter_sha256": hashlib.sha256(adapter_bytes).hexdigest(), "params": counts[m.name]}
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


def _as_format_1(root):
    """Rewrite pool.json as the first format wrote it: absolute paths, no adapter digests, no tokenizer key."""
    meta = json.loads((root / "pool.json").read_text())
    meta["format"] = 1
    del meta["tokenizer"]
    for entry in meta["members"]:
        entry["path"] = entry.pop("path_when_saved")
        del entry["adapter_sha256"]
    (root / "pool.json").write_text(json.dumps(meta))


def test_tampered_adapter_file_is_refused(pool):
    f = pool["root"] / "adapters-seed-1.safetensors"
    state = load_file(str(f))
    state["out.layers.1.ff_up.weight"] = torch.zeros(3, 16)
    save_file(state, str(f))
    with pytest.raises(PoolMismatchError, match=r"adapters-seed-1.safetensors: SHA-256 [0-9a-f]{12}\.\. != "
                                                r"[0-9a-f]{12}\.\. recorded in pool.json"):
        load_pool(pool["root"], load_models=False)
    _as_format_1(pool["root"])  # no digest recorded: the shape check still refuses it
    with pytest.raises(PoolMismatchError, match=r"model 'seed-1': adapter tensor 'out.layers.1.ff_up.weight' .* "
                                                r"shape \(3, 16\), the space config needs \(16, 16\)"):
        load_pool(pool["root"], load_models=False)


def test_changed_adapter_byte_is_refused(pool):
    f = pool["root"] / "adapters-seed-2.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: names and shapes still check out
    f.write_bytes(bytes(data))
    with pytest.raises(PoolMismatchError, match=r"adapters-seed-2.safetensors: SHA-256 .* model 'seed-2'"):
        load_pool(pool["root"], verify=False, load_models=False)


def test_truncated_adapter_file_is_refused(pool):
    f = pool["root"] / "adapters-seed-1.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PoolMismatchError, match="adapters-seed-1.safetensors: SHA-256"):
        load_pool(pool["root"], load_models=False)
    _as_format_1(pool["root"])
    with pytest.raises(PoolMismatchError, match="adapters-seed-1.safetensors: not a readable safetensors file"):
        load_pool(pool["root"], load_models=False)


def test_format_1_pool_still_loads(pool):
    _as_format_1(pool["root"])
    loaded = load_pool(pool["root"])  # absolute paths, fingerprints verified
    assert loaded.members[1].path == str((pool["tmp"] / "models" / "seed-2").resolve())
    assert loaded.tokenizer("the cat")["input_ids"] == [1, 2]


def _same_translation(a, b, models):
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    block = extract_prefix(models["seed-1"], ids)
    x, y = a.translate(block, "seed-1", "seed-2"), b.translate(block, "seed-1", "seed-2")
    return torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_pool_moves_with_its_models(pool):
    moved = pool["tmp"] / "elsewhere" / "deploy"
    shutil.copytree(pool["root"], moved / "pool")
    shutil.copytree(pool["tmp"] / "models", moved / "models")
    shutil.rmtree(pool["root"])
    shutil.rmtree(pool["tmp"] / "models")
    loaded = load_pool(moved / "pool")  # "../models/<name>" from the moved pool; fingerprints verified
    assert [m.path for m in loaded.members] == [str((moved / "models" / n).resolve()) for n in ("seed-1", "seed-2")]
    assert _same_translation(pool["space"], loaded.space, pool["models"])


def test_models_under_kvlingua_home_are_recorded_relative_to_it(pool, tmp_path, monkeypatch):
    home = tmp_path / "home-1"
    monkeypatch.setenv("KVLINGUA_HOME", str(home))
    shutil.copytree(pool["tmp"] / "models", home / "pools" / "tiny")
    members = [PoolMember(m.name, str(home / "pools" / "tiny" / m.name), m.summary, m.fingerprint)
               for m in pool["members"]]
    root = save_pool(tmp_path / "run" / "pool", pool["space"], members)
    meta = json.loads((root / "pool.json").read_text())
    assert [e["path"] for e in meta["members"]] == [f"$KVLINGUA_HOME/pools/tiny/{n}" for n in ("seed-1", "seed-2")]
    shutil.move(str(home), str(tmp_path / "home-2"))  # the whole home moves (another machine, another user)
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home-2"))
    loaded = load_pool(root)
    assert loaded.members[0].path == str((tmp_path / "home-2" / "pools" / "tiny" / "seed-1").resolve())
    assert loaded.tokenizer is None and meta["tokenizer"] is None
    # a model neither under the home nor beside the pool keeps its absolute path
    far = save_pool(tmp_path / "a" / "b" / "pool", pool["space"], [
        PoolMember(m.name, str(pool["tmp"] / "models" / m.name), m.summary, m.fingerprint) for m in pool["members"]])
    assert json.loads((far / "pool.json").read_text())["members"][0]["path"] == str(
        (pool["tmp"] / "models" / "seed-1").resolve())


def test_moved_models_are_found_with_models_root(pool):
    shutil.move(str(pool["tmp"] / "models"), str(pool["tmp"] / "moved"))
    with pytest.raises(PoolNotFoundError, match=r"models/seed-1: model 'seed-1': checkpoint directory not found "
                                                r"\(pool.json records '../models/seed-1'.*--models-root"):
        load_pool(pool["root"])
    loaded = load_pool(pool["root"], models_root=pool["tmp"] / "moved")  # fingerprints verified there
    assert loaded.members[0].path == str((pool["tmp"] / "moved" / "seed-1").resolve())
    assert _same_translation(pool["space"], loaded.space, pool["models"])
    with pytest.raises(PoolNotFoundError, match=r"nowhere/seed-1: model 'seed-1'.*\(looked in .*nowhere"):
        load_pool(pool["root"], models_root=pool["tmp"] / "nowhere")


def test_missing_tokenizer_is_named(pool):
    shutil.rmtree(pool["root"] / "tokenizer")
    with pytest.raises(PoolNotFoundError, match=r"pool/tokenizer: the pool's tokenizer is missing"):
        load_pool(pool["root"], load_models=False)


@pytest.mark.parametrize("text, message", [
    ("{\"format\": 2, ", r"pool.json: not valid JSON \(Expecting"),
    ("[1, 2]", "pool.json: top level must be a JSON object"),
    ("{\"format\": 9}", r"pool.json: unsupported format 9"),
    ("{\"format\": 2, \"space\": {}}", "pool.json: missing key 'members'"),
])
def test_unreadable_pool_json_is_refused(pool, text, message):
    (pool["root"] / "pool.json").write_text(text)
    with pytest.raises(PoolMismatchError, match=message):
        load_pool(pool["root"])


def test_member_entry_without_fingerprint_is_refused(pool):
    meta = json.loads((pool["root"] / "pool.json").read_text())
    del meta["members"][1]["fingerprint"]
    (pool["root"] / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolMismatchError, match=r"pool.json: members\[1\] \('seed-2'\) lacks \['fingerprint'\]"):
        load_pool(pool["root"])


def _run(tmp_path, pool, spaces=("translator", "linear"), run="r1", main=None):
    """A run directory as a training run lays it out: one pool per space, placed by space_pool_dir. ``main``: a
    run written before pool.json recorded its main space, which it then put at ``pool/``."""
    job = {"spaces": {name: {} for name in spaces}}
    recorded = {} if main else {"main_space": main_space(spaces)}
    for name in spaces:
        save_pool(space_pool_dir(tmp_path / run, name, main or main_space(spaces)), pool["space"], pool["members"],
                  extra={"run": run, "space_name": name, "job": job, **recorded})
    return tmp_path / run


def test_main_space_and_its_pool_directory(tmp_path):
    assert main_space(["linear", "translator"]) == "linear" and main_space(["big"]) == "big"
    with pytest.raises(ValueError, match="at least one space"):
        main_space([])
    assert space_pool_dir(tmp_path, "translator", "translator") == tmp_path / "pool"
    assert space_pool_dir(tmp_path, "linear", "translator") == tmp_path / "pool-linear"


def test_run_pools_are_found_from_the_run_or_any_of_its_pools(pool, tmp_path):
    run = _run(tmp_path, pool, ("linear", "translator", "small"))  # the first space is the main one
    expected = {"linear": run / "pool", "translator": run / "pool-translator", "small": run / "pool-small"}
    for given in (run, run / "pool", run / "pool-translator", run / "pool-small"):
        found = read_run_pools(given)
        assert found == expected and main_space(found) == "linear"
    shutil.rmtree(run / "pool-small")
    assert read_run_pools(run) == {"linear": run / "pool", "translator": run / "pool-translator"}
    shutil.copytree(run / "pool-translator", tmp_path / "alone")  # a pool copied away from its run
    assert read_run_pools(tmp_path / "alone") == {"translator": tmp_path / "alone"}
    assert read_run_pools(pool["root"]) == {"translator": pool["root"]}  # not written by a run
    with pytest.raises(PoolNotFoundError, match="not a pool or run directory"):
        read_run_pools(tmp_path / "nowhere")


def test_a_run_that_did_not_record_its_main_space_is_read_as_it_was_written(pool, tmp_path):
    """Before pool.json named the main space, a run made ``translator`` its main space wherever it stood."""
    run = _run(tmp_path, pool, ("linear", "translator", "small"), main="translator")
    for given in (run, run / "pool", run / "pool-linear"):
        found = read_run_pools(given)
        assert list(found) == ["translator", "linear", "small"] and main_space(found) == "translator"
        assert found == {"translator": run / "pool", "linear": run / "pool-linear", "small": run / "pool-small"}
    old = _run(tmp_path, pool, ("linear", "small"), run="r2", main="linear")  # no translator: its first space
    assert read_run_pools(old / "pool-small") == {"linear": old / "pool", "small": old / "pool-small"}


def test_a_sibling_of_another_run_or_other_models_is_refused(pool, tmp_path):
    run = _run(tmp_path, pool)
    other = _run(tmp_path, pool, run="r2")
    shutil.rmtree(run / "pool-linear")
    shutil.copytree(other / "pool-linear", run / "pool-linear")
    with pytest.raises(PoolMismatchError, match=r"pool-linear/pool.json: holds space 'linear' of run 'r2', but run "
                                                r"'r1' .* keeps its space 'linear' here"):
        read_run_pools(run / "pool")
    meta = json.loads((run / "pool-linear" / "pool.json").read_text())
    meta["run"] = "r1"
    meta["members"][0]["fingerprint"] = "0" * 32
    (run / "pool-linear" / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolMismatchError, match=r"pool-linear/pool.json: its models .* differ from those of"):
        read_run_pools(run)


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
