"""`kvlingua plan`: counts on the meta device equal instantiated modules', the auto rule, FLOPs, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvlingua.cache import arch_summary
from kvlingua.plan import (
    ADAPTER_STATE_BYTES,
    PlanError,
    Workload,
    load_model_config,
    meta_model,
    n_params,
    plan_pool,
    pool_member_configs,
    resolve_output,
)
from kvlingua.pretrain.sizes import gemma2_config
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from orchestrator.cli import main
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "configs" / "shapes"
PUBLISHED = {  # parameter counts the model cards and papers state (embeddings included, tied ones once)
    "smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768,
    "gemma-2-2b": 2_614_341_888, "mistral-7b": 7_241_732_096,
    "gemma-3-270m": 268_098_176,  # as converted by `kvlingua fetch gemma3-270m` from its GGUF
}


def _tiny_configs():
    return {"g": tiny_model("gemma2", layers=2).config, "l": tiny_model("llama", layers=4, kv_heads=2).config}


@pytest.mark.parametrize("space", [SpaceConfig(q_dim=16, output="dense"), SpaceConfig(q_dim=16, output="per_layer"),
                                   SpaceConfig(q_dim=16, adapter="linear"),
                                   SpaceConfig(q_dim=16, output="per_layer", num_layers=2, short_path=False)])
def test_meta_counts_equal_instantiated_modules(space):
    configs = _tiny_configs()
    work = Workload(batch_size=2, prefix_len=5, suffix_len=3)
    cfg, plans = plan_pool(configs, space, work)
    assert cfg == space  # explicit outputs and the linear baseline are left as they are
    real = SharedSpace({n: arch_summary(c) for n, c in configs.items()}, space)  # allocated, on CPU
    counts = real.param_counts()
    for p in plans:
        model = tiny_model("gemma2", layers=2) if p.name == "g" else tiny_model("llama", layers=4, kv_heads=2)
        assert (p.in_params, p.out_params) == (counts[p.name]["in"], counts[p.name]["out"])
        assert p.model_params == sum(t.numel() for t in model.parameters())
        assert p.memory["weights"] == 4 * p.model_params
        assert p.memory["adapter_state"] == ADAPTER_STATE_BYTES * p.adapter_params
        L, D = p.summary.num_layers, p.summary.width
        assert p.memory["kv_block"] == 2 * 2 * 5 * L * D * 4  # keys + values, [B=2, P=5, L, D] fp32


def test_model_flops_on_meta_equal_a_real_forward():
    model = tiny_model("llama", layers=3, kv_heads=2)
    ids = torch.randint(0, 100, (1, 6))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    _, [plan] = plan_pool({"m": model.config}, SpaceConfig(q_dim=12), Workload(prefix_len=6))
    assert plan.model_flops == counter.get_total_flops() / 6


def test_adapter_flops_of_the_short_path_by_hand():
    """Short path only, dense: IN is one [L*D -> Q] matmul per K/V, OUT one [Q -> L*D]: 2 FLOPs a multiply-add."""
    config = tiny_model("llama", layers=4, kv_heads=2).config  # L = 4, D = 16
    _, [plan] = plan_pool({"m": config}, SpaceConfig(q_dim=24, output="dense", stack=False), Workload(prefix_len=7))
    L, D, Q = 4, 16, 24
    assert plan.adapter_flops == 2 * (2 * L * D * Q) + 2 * (2 * Q * L * D)


def test_activations_scale_with_the_batch():
    config = tiny_model("gemma2", layers=2).config
    plans = [plan_pool({"m": config}, SpaceConfig(q_dim=16), Workload(batch_size=b))[1][0] for b in (2, 6)]
    assert plans[1].memory["activations"] == 3 * plans[0].memory["activations"] > 0
    assert plans[0].adapter_flops == plans[1].adapter_flops  # per token


def test_auto_output_follows_max_share():
    configs = _tiny_configs()
    summaries = {n: arch_summary(c) for n, c in configs.items()}
    dense = SharedSpace(summaries, SpaceConfig(q_dim=16, output="dense")).param_counts()
    sizes = {n: (summaries[n], 10 * (dense[n]["in"] + dense[n]["out"])) for n in configs}  # dense = 0.1 of each
    assert resolve_output(SpaceConfig(q_dim=16, max_share=0.1), sizes).output == "dense"  # not above the share
    assert resolve_output(SpaceConfig(q_dim=16, max_share=0.099), sizes).output == "per_layer"
    one_big = {**sizes, "l": (summaries["l"], 1)}  # a single member past the share decides for the pool
    assert resolve_output(SpaceConfig(q_dim=16, max_share=0.5), one_big).output == "per_layer"
    assert resolve_output(SpaceConfig(q_dim=16, output="dense", max_share=1e-9), sizes).output == "dense"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_shapes_have_their_published_sizes_and_fit_the_target(name):
    config = load_model_config(SHAPES / f"{name}.json")
    assert n_params(meta_model(config)) == PUBLISHED[name]
    summary = arch_summary(config)
    L = summary.num_layers
    with torch.device("meta"):
        counts = SharedSpace({"m": summary}, SpaceConfig(q_dim=32 * L, output="per_layer", init="random")
                             ).param_counts()["m"]
    assert counts["in"] + counts["out"] <= 0.1 * PUBLISHED[name]
    # the closed-form start needs a dense short path (Σ's principal directions mix every layer): L*D*Q per map
    with torch.device("meta"):
        closed = SharedSpace({"m": summary}, SpaceConfig(q_dim=32 * L, output="per_layer")).param_counts()["m"]
    D, Q = summary.width, 32 * L  # dense (L*D x Q, K and V, IN and OUT) against per-slice (D x Q/L per layer)
    assert closed["in"] + closed["out"] - (counts["in"] + counts["out"]) == 4 * D * Q * (L - 1)


def test_cli_prints_a_plan_for_a_shape_file(tmp_path, capsys):
    model = tiny_model("llama", layers=3, kv_heads=2)
    shape = tmp_path / "tiny-llama.json"
    shape.write_text(json.dumps(model.config.to_dict()))
    assert main(["plan", str(shape), "--q-dim", "24", "--output", "dense"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tiny-llama"))
    real = SharedSpace({"m": arch_summary(model)}, SpaceConfig(q_dim=24, output="dense")).param_counts()["m"]
    fields = row.split()
    assert fields[1:4] == ["3", "x", "16"] and fields[5:8] == ["dense", "24", "2D"]
    assert fields[8:10] == [f"{real['in'] / 1e3:.1f}k", f"{real['out'] / 1e3:.1f}k"]


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model config" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plan", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    shape = tmp_path / "m.json"
    shape.write_text(json.dumps(tiny_model("llama", layers=3).config.to_dict()))
    assert main(["plan", str(shape), "--q-dim", "16"]) == 2
    assert "q_dim=16 is not divisible by the layer count of m (3 layers)" in capsys.readouterr().err
    with pytest.raises(PlanError, match="needs a model_type"):
        (tmp_path / "x.json").write_text("{}")
        load_model_config(tmp_path / "x.json")


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """An empty $KVLINGUA_HOME: nothing fetched, nothing pre-trained; it must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KVLINGUA_HOME", str(home))
    return home


def test_plan_of_the_real_run_needs_no_fetch(fresh_home, capsys):
    """A new user's first `kvlingua plan configs/real.yaml`: SmolLM2 at its known shape, the tiny member at its rung."""
    assert main(["plan", str(ROOT / "configs" / "real.yaml")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("smollm2 ", "tiny "))]
    assert [r[:4] for r in rows[:2]] == [["smollm2", "30", "x", "192"], ["tiny", "2", "x", "64"]]
    tiny = n_params(meta_model(gemma2_config("1.9m-l2-d256", 49_152)))  # its rung at SmolLM2's vocabulary
    assert rows[0][4] == "134.5M" and rows[1][4] == f"{tiny / 1e6:.1f}M"
    assert len(rows) == 6 and not any(fresh_home.iterdir())  # three spaces; nothing downloaded or written


def test_pool_members_read_known_shapes_and_the_tokenizer_model_s_vocabulary(fresh_home, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(json.dumps({"name": "pair", "tokenizer_model": "gemma3-270m", "members": [
        {"name": "gemma", "model": "gemma3-270m"}, {"name": "smol", "model": "smollm2"},
        {"name": "tiny", "pretrain": {"size": "test", "data": {"source": "bible", "view": "en"}}}]}))
    configs = pool_member_configs(pool)
    gemma = arch_summary(configs["gemma"])
    assert (gemma.model_type, gemma.num_layers, gemma.n_kv_heads, gemma.head_dim) == ("gemma3_text", 18, 1, 256)
    assert configs["gemma"].layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert configs["gemma"].sliding_window == 512 and arch_summary(configs["smol"]).num_layers == 30
    assert configs["tiny"].vocab_size == 262_144  # the pool tokenizer (Gemma-3's) is not fetched: its shape's
    assert list(pool_member_configs(pool, ("tiny", "smol"))) == ["tiny", "smol"]
    with pytest.raises(PlanError, match=r"pool_members: \['nope'\] not in pool"):
        pool_member_configs(pool, ("nope",))
    assert not any(fresh_home.iterdir())
