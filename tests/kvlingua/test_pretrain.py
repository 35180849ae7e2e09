"""Pool pre-training: sizes, the loop (learning, determinism, resume), pool kinds, context use, CLI."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvlingua.cache import fingerprint
from kvlingua.config import ConfigError, load_config, to_dict
from kvlingua.models import load_frozen
from kvlingua.pretrain.context import context_use
from kvlingua.pretrain.loop import PretrainConfig, batch_rows, build_model, is_finished, lr_at, pretrain
from kvlingua.pretrain.pools import MANIFEST, MemberConfig, PoolConfig, longest_first, pretrain_pool
from kvlingua.pretrain.sizes import SIZES, gemma2_config, param_counts, step_cost
from kvlingua.schedule import epoch_order

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
LADDER = ("1.9m-l2-d256", "3.8m-l4-d256", "7.6m-l8-d256")
TOPICS, PER_TOPIC, T = 4, 16, 32
VOCAB = TOPICS * PER_TOPIC + 1  # word tokens + <eos>


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A word-level tokenizer over ``w0 .. w63`` plus ``<eos>`` (ids 0..64)."""
    vocab = {f"w{i}": i for i in range(TOPICS * PER_TOPIC)} | {"<eos>": TOPICS * PER_TOPIC}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    return path


def topic_rows(n: int, seed: int) -> torch.Tensor:
    """``[n, T]`` rows whose tokens all come from one of 4 disjoint 16-token topics: the prefix names the topic."""
    g = torch.Generator().manual_seed(seed)
    topic = torch.randint(TOPICS, (n, 1), generator=g)  # [n, 1]
    return topic * PER_TOPIC + torch.randint(PER_TOPIC, (n, T), generator=g)  # [n, T]


def run_cfg(**kw) -> PretrainConfig:
    base = dict(size="test", seq_len=T, batch_size=16, steps=60, lr=1e-2, warmup_frac=0.1, eval_rows=64,
                checkpoint_every=0, context_prefix_len=8, context_first=8, threads=1)
    return PretrainConfig(**(base | kw))


CHUNKS = {"train": topic_rows(512, 0), "validation": topic_rows(64, 1)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_dir):
    out = tmp_path_factory.mktemp("run") / "m"
    return pretrain(run_cfg(), out, tok_dir, progress=False, chunks=CHUNKS)


def test_sizes_follow_the_paper_architecture():
    for name in LADDER + ("test",):
        cfg = gemma2_config(name, 512)
        assert cfg.num_key_value_heads == 1 and cfg.tie_word_embeddings
        assert cfg.hidden_activation == "gelu_pytorch_tanh" and cfg.query_pre_attn_scalar == cfg.head_dim
        assert cfg._attn_implementation == "eager"
        assert cfg.layer_types[0] == "sliding_attention" and "full_attention" in cfg.layer_types
    ladder = [SIZES[n] for n in LADDER]
    assert [s.num_hidden_layers for s in ladder] == [ladder[0].num_hidden_layers * k for k in (1, 2, 4)]
    assert len({s.hidden_size for s in ladder}) == 1
    assert gemma2_config("test", 64, num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown model size"):
        gemma2_config("huge", 64)


def test_param_counts_split_tied_embedding_once():
    model = build_model(run_cfg(), VOCAB)
    counts = param_counts(model)
    assert counts["embedding"] == VOCAB * 32
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


def test_schedule_warms_up_then_decays_to_the_floor():
    # 100 steps, 10 warm-up steps (s/10), then 0.1 + 0.9 * (1 + cos(pi * (s - 10) / 90)) / 2, peak 2.0.
    cfg = run_cfg(steps=100, warmup_frac=0.1, lr=2.0, min_lr_ratio=0.1)
    hand = {0: 0.0, 4: 0.4, 10: 1.0, 40: 0.1 + 0.9 * 0.75, 55: 0.1 + 0.9 * 0.5, 70: 0.1 + 0.9 * 0.25}
    for step, factor in hand.items():
        assert lr_at(cfg, step) == pytest.approx(2.0 * factor, abs=1e-12), step
    assert 0.2 < lr_at(cfg, 99) < 0.2 + 1e-3


def test_batches_walk_the_epoch_orders_end_to_end():
    # 5 rows, batches of 4: step 1 takes positions 4..7 = epoch 0's last row, then epoch 1's first three.
    stream = torch.cat([epoch_order(5, 3, 0), epoch_order(5, 3, 1), epoch_order(5, 3, 2)])  # [15]
    for step in range(3):
        assert torch.equal(batch_rows(3, step, 4, 5), stream[4 * step: 4 * step + 4])
    assert not torch.equal(epoch_order(5, 3, 0), epoch_order(5, 3, 1))  # the boundary case is not vacuous


def test_size_names_say_what_they_are():
    """``<non-embedding params>-l<layers>-d<width>``, the count computed by hand from the architecture."""
    for name in LADDER:
        m = re.fullmatch(r"(\d+\.\d)m-l(\d+)-d(\d+)", name)
        assert m, name
        millions, layers, width = float(m[1]), int(m[2]), int(m[3])
        s = SIZES[name]
        assert (s.num_hidden_layers, s.hidden_size) == (layers, width)
        # Per layer: q and o (width x heads*head_dim), k and v (one KV head), GeGLU's 3 matrices, 4 RMSNorms;
        # plus the final norm. Embeddings (tied) are counted apart.
        attn = 2 * width * s.num_attention_heads * s.head_dim + 2 * width * s.head_dim
        per_layer = attn + 3 * width * s.intermediate_size + 4 * width
        by_hand = layers * per_layer + width
        counts = param_counts(build_model(run_cfg(size=name), 100))
        assert counts["non_embedding"] == by_hand and counts["embedding"] == 100 * width
        assert round(by_hand / 1e6, 1) == millions, (name, by_hand)


def test_pretraining_learns_the_structure(trained):
    m = trained.metrics
    assert trained.finished and not trained.skipped
    # Chance is ln(65); knowing the topic leaves ln(16) per token; the model must get well below chance.
    assert m["held_out_loss"] < math.log(VOCAB) - 0.5
    assert m["log"][-1]["loss"] < m["log"][0]["loss"] - 0.8
    assert m["tokens_per_s"] > 0 and m["tokens"] == 60 * 16 * T


def test_context_use_own_prefix_beats_another(trained):
    model = load_frozen(trained.out_dir)
    val = CHUNKS["validation"]
    ctx = context_use(model, val, prefix_len=8, first=8, batch_size=16)
    assert ctx["nll_own"] < ctx["nll_other"] - 0.3 and ctx["relative_gap"] > 0.1
    # Independent computation with full forwards: tokens P+1..P+8 after [prefix, token P].
    def by_hand(prefixes):
        ids = torch.cat([prefixes, val[:, 8:17]], 1)  # [N, 17]
        logits = model(input_ids=ids).logits[:, 8:16]  # predict positions 9..16
        return F.cross_entropy(logits.reshape(-1, VOCAB), val[:, 9:17].reshape(-1)).item()

    assert by_hand(val[:, :8]) == pytest.approx(ctx["nll_own"], abs=1e-4)
    assert by_hand(val.roll(32, 0)[:, :8]) == pytest.approx(ctx["nll_other"], abs=1e-4)
    assert json.loads((trained.out_dir / "metrics.json").read_text())["context_use"]["relative_gap"] > 0.1


def test_saved_member_is_safetensors_with_tokenizer(trained, tok_dir):
    files = {p.name for p in trained.out_dir.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "pretrain_config.json" in files
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in trained.out_dir.rglob("*"))
    assert "checkpoint" not in files  # removed once finished
    model = load_frozen(trained.out_dir)
    assert model.config.vocab_size == VOCAB and model.config.num_key_value_heads == 1


def test_same_seed_same_weights_and_rerun_is_skipped(tmp_path, tok_dir, trained):
    cfg = run_cfg(steps=8)
    a = pretrain(cfg, tmp_path / "a", tok_dir, progress=False, chunks=CHUNKS)
    b = pretrain(cfg, tmp_path / "b", tok_dir, progress=False, chunks=CHUNKS)
    c = pretrain(run_cfg(steps=8, seed=1), tmp_path / "c", tok_dir, progress=False, chunks=CHUNKS)
    fa, fb, fc = (fingerprint(load_frozen(r.out_dir)) for r in (a, b, c))
    assert fa == fb and fa != fc
    again = pretrain(cfg, tmp_path / "a", tok_dir, progress=False, chunks=CHUNKS)
    assert again.skipped and fingerprint(load_frozen(again.out_dir)) == fa
    with pytest.raises(ValueError, match="steps: 8 -> 9"):
        pretrain(run_cfg(steps=9), tmp_path / "a", tok_dir, progress=False, chunks=CHUNKS)


def test_killed_run_resumes_bit_identical(tmp_path, tok_dir):
    cfg = run_cfg(steps=12, checkpoint_every=4)
    straight = pretrain(cfg, tmp_path / "straight", tok_dir, progress=False, chunks=CHUNKS)
    part = pretrain(cfg, tmp_path / "resumed", tok_dir, progress=False, chunks=CHUNKS, stop_after=10)
    assert not part.finished and (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = pretrain(cfg, tmp_path / "resumed", tok_dir, progress=False, chunks=CHUNKS)  # restarts at step 8
    assert resumed.finished and not resumed.skipped
    assert fingerprint(load_frozen(resumed.out_dir)) == fingerprint(load_frozen(straight.out_dir))
    assert [e["loss"] for e in resumed.metrics["log"]] == [e["loss"] for e in straight.metrics["log"]]


def test_bad_pretrain_configs_are_refused():
    with pytest.raises(ValueError, match="save_at"):
        run_cfg(steps=10, save_at=(11,))
    with pytest.raises(ValueError, match="size"):
        run_cfg(size="nope")
    with pytest.raises(ValueError, match="must be < seq_len"):
        run_cfg(context_prefix_len=30)


@pytest.mark.parametrize("old,named", [({"warmup": 0.1}, "'warmup'"), ({"size": "cpu-100m"}, "'cpu-100m'")])
def test_member_written_under_old_names_is_a_clear_error(tmp_path, old, named):
    """A member directory from before the renames (``warmup``, ``cpu-100m``) is refused with a way out."""
    stored = to_dict(run_cfg())
    if "warmup" in old:
        del stored["warmup_frac"]
    (tmp_path / "pretrain_config.json").write_text(json.dumps(stored | old))
    with pytest.raises(ConfigError, match=rf"cannot read .*{named}.*--force"):
        is_finished(tmp_path, run_cfg())


@pytest.mark.parametrize("kind", ["seeds", "trajectory", "experts", "sizes", "quickstart"])
def test_pool_yamls_load_and_have_their_kind(kind):
    cfg = load_config(PoolConfig, REPO / "configs" / "pools" / f"{kind}.yaml")
    ms = cfg.members
    if kind in ("seeds", "quickstart"):
        assert len({m.pretrain.seed for m in ms}) == len(ms) >= 2
        assert len({(m.pretrain.size, repr(m.pretrain.data)) for m in ms}) == 1
    if kind == "quickstart":
        assert len(ms) == 2 and ms[0].pretrain.size == "1.9m-l2-d256"
    if kind == "trajectory":
        run, snap = ms[0], ms[1]
        assert snap.snapshot_of.member == run.name and snap.snapshot_of.step < run.pretrain.steps
        assert set(run.pretrain.save_at) >= {snap.snapshot_of.step}
    if kind == "experts":
        parent, experts = ms[0], ms[1:]
        assert parent.pretrain.data.view == "mixed"
        assert sorted(m.pretrain.data.view for m in experts) == ["es", "ru"]
        assert all(m.init_from == parent.name for m in experts)
    if kind == "sizes":
        layers = sorted(SIZES[m.pretrain.size].num_hidden_layers for m in ms)
        assert layers[-1] == 4 * layers[0]


def test_pool_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nmembers:\n  - name: a\n    pretrain: {size: test, stepz: 3}\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(PoolConfig, bad)
    bad.write_text("name: p\nmembers:\n  - name: a\n    pretrain: {size: test}\n  - name: b\n"
                   "    snapshot_of: {member: a, step: 5}\n")
    with pytest.raises(ConfigError, match="save_at"):
        load_config(PoolConfig, bad)
    bad.write_text("name: p\nmembers:\n  - name: b\n    init_from: a\n    pretrain: {size: test}\n")
    with pytest.raises(ConfigError, match="init_from"):
        load_config(PoolConfig, bad)


def _text_source(path: Path) -> Path:
    """Paragraphs of 'topic' words: each paragraph draws from one of 4 word groups."""
    rng = random.Random(0)
    paras = []
    for _ in range(300):
        t = rng.randrange(4)
        paras.append(" ".join(f"{'abcd'[t]}{rng.randrange(12)}x" for _ in range(40)))
    path.write_text("\n\n".join(paras) + "\n")
    return path


def test_pool_kinds_end_to_end_and_cli(tmp_path, home, capsys):
    src = _text_source(tmp_path / "topics.txt")
    run = {"size": "test", "seq_len": 32, "batch_size": 8, "lr": 1e-2, "context_prefix_len": 8,
           "context_first": 8, "threads": 1, "data": {"source": str(src), "view": "text"}}
    pool = {"name": "kinds", "vocab_size": 264, "tokenizer_data": {"source": str(src), "view": "mixed"},
            "members": [
                {"name": "parent", "pretrain": run | {"steps": 12, "save_at": [6, 12]}},
                {"name": "parent-mid", "snapshot_of": {"member": "parent", "step": 6}},
                {"name": "expert", "init_from": "parent", "pretrain": run | {"steps": 2, "lr": 1e-4, "seed": 5}},
                {"name": "wide", "pretrain": run | {"steps": 2, "seed": 5}},
            ]}
    yaml_path = tmp_path / "kinds.yaml"
    yaml_path.write_text(json.dumps(pool))  # JSON is YAML
    from orchestrator.cli import main

    assert main(["pretrain", str(yaml_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "parent-mid" in out and "expert" in out
    root = home / "pools" / "kinds"
    manifest = json.loads((root / MANIFEST).read_text())
    assert [m["name"] for m in manifest["members"]] == ["parent", "parent-mid", "expert", "wide"]
    w = {n: {k: v.clone() for k, v in load_frozen(root / n).state_dict().items()} for n in ("parent", "parent-mid", "expert", "wide")}
    fp = {m["name"]: m["fingerprint"] for m in manifest["members"]}
    # Trajectory: the middle snapshot is a different model than the end of the same run.
    assert fp["parent-mid"] != fp["parent"]
    assert fp["parent-mid"] == fingerprint(load_frozen(root / "parent" / "snapshots" / "step-6"))
    # Experts start from the parent: 2 tiny steps away from it, far from a fresh init of another seed.
    def dist(a, b):
        return sum((w[a][k] - w[b][k]).pow(2).sum().item() for k in w[a]) ** 0.5
    assert 0 < dist("expert", "parent") < 0.05 * dist("wide", "parent")
    # Rerun is a no-op that returns the same dirs; a mistyped key is a clear CLI error.
    assert main(["pretrain", str(yaml_path), "--quiet"]) == 0
    assert json.loads((root / MANIFEST).read_text())["members"][0]["fingerprint"] == fp["parent"]
    pool["members"][0]["pretrain"]["lrr"] = 1.0
    yaml_path.write_text(json.dumps(pool))
    assert main(["pretrain", str(yaml_path)]) == 2
    assert "lrr" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2


def test_concurrent_members_match_sequential_runs(tmp_path, home):
    """``concurrent: 2`` trains independent members in separate processes, bit-identical to one at a time."""
    src = _text_source(tmp_path / "topics.txt")
    run = {"size": "test", "seq_len": 32, "batch_size": 8, "steps": 4, "lr": 1e-2, "context_prefix_len": 8,
           "context_first": 8, "threads": 1, "data": {"source": str(src), "view": "text"}}
    members = [{"name": "a", "pretrain": run}, {"name": "b", "pretrain": run | {"seed": 1}},
               {"name": "c", "init_from": "a", "pretrain": run | {"steps": 2, "seed": 2}}]
    common = {"vocab_size": 264, "tokenizer_data": {"source": str(src), "view": "mixed"}, "members": members}
    seq = pretrain_pool(load_config(PoolConfig, _yaml(tmp_path, "seq", common)), progress=False)
    par = pretrain_pool(load_config(PoolConfig, _yaml(tmp_path, "par", common | {"concurrent": 2})), progress=False)
    fps = {k: (fingerprint(load_frozen(seq[k])), fingerprint(load_frozen(par[k]))) for k in "abc"}
    assert all(s == p for s, p in fps.values()), fps
    assert fps["a"][0] != fps["b"][0]  # the seeds differ, so the comparison is not vacuous
    with pytest.raises(ConfigError, match="concurrent"):
        load_config(PoolConfig, _yaml(tmp_path, "bad", common | {"concurrent": 0}))


def test_the_costliest_members_are_scheduled_first():
    """The paper pool's 8-layer member would otherwise start last and run alone; equal members keep their order."""
    run = lambda **kw: PretrainConfig(**({"size": "1.9m-l2-d256", "steps": 600} | kw))  # noqa: E731
    members = [MemberConfig(name="s0", pretrain=run()), MemberConfig(name="s1", pretrain=run(seed=1)),
               MemberConfig(name="long", pretrain=run(steps=1300)), MemberConfig(name="deep", pretrain=run(size="7.6m-l8-d256"))]
    assert [m.name for m in longest_first(members, 8192)] == ["deep", "long", "s0", "s1"]
    # The cost follows the weights a token meets: 8 layers + the output layer against 2 layers + the output layer,
    # counted here from a real model's parameters (the tied embedding is the output layer).
    counts = {s: param_counts(build_model(PretrainConfig(size=s), 8192)) for s in ("1.9m-l2-d256", "7.6m-l8-d256")}
    ratio = step_cost("7.6m-l8-d256", 8192, 16) / step_cost("1.9m-l2-d256", 8192, 16)
    expected = (counts["7.6m-l8-d256"]["total"]) / (counts["1.9m-l2-d256"]["total"])
    assert ratio == pytest.approx(expected, rel=0.02)


def _yaml(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name} | body))  # JSON is YAML
    return path
