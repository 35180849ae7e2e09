"""`kvlingua real-model` end to end at toy size: a deep GQA Llama beside a 2-layer Gemma-2, every stage, the
generated report read back against the numbers it was written from, and a rerun that skips what is done."""
from __future__ import annotations

import json
import math

import pytest

from kvlingua.eval_result import EvalResult
from kvlingua.paths import path_name
from orchestrator.cli import main
from tests.helpers import fake_corpus_home, tiny_model

VOCAB = 320
ARM_S = 1.5
"""Wall seconds of training per arm in the arms stage."""
TOY_LEVERS = ("start (closed form)", "sink_tokens: 0", "sink_tokens: 4", "keys: rotated", "q_dim: 240", "init: match",
              "init_batches: 16", "out_weights: attention")
"""Every lever but the 512-token calibrations (the toy corpus's passages are shorter)."""
ARMS = ("suffix", "kl", "recon", "stack: 6 layers (merge)", "short path only")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    mp = pytest.MonkeyPatch()
    fake_corpus_home(root, mp, VOCAB)
    tiny_model("llama", seed=0, layers=6, heads=4, kv_heads=2, head_dim=8, vocab=VOCAB).save_pretrained(root / "deep")
    tiny_model("gemma2", seed=1, sliding_window=64, vocab=VOCAB).save_pretrained(root / "small")
    space = {"adapter": "translator", "q_dim": 12}
    cfg = {"name": "real-toy", "run_dir": str(root / "run"), "models": {"deep": str(root / "deep"),
                                                                          "small": str(root / "small")},
           "tokenizer": str(root / "tok"), "data": {"source": "bible", "view": "en"},
           "prefix_len": 6, "min_prefix_len": 3, "suffix_len": 6, "batch_size": 4,
           "spaces": {"translator": space | {"output": "per_layer", "init": "match", "refresh": 0}, "dense": space | {"output": "dense"},
                      "linear": {"adapter": "linear", "q_dim": 12}},
           "space_steps": {"dense": 1},
           "train": {"steps": 2, "checkpoint_every": 0, "log_every": 1, "eval_every": 1},
           "eval": {"batches": 3, "batch_size": 2, "first_tokens": 3, "curve_batches": 1},
           "tracking": {"enabled": False}}
    (root / "real.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    argv = ["real-model", str(root / "real.yaml"), "--in-process", "--no-progress", "--positions", "3", "6", "8",
            "--bench-prefix", "8", "--bench-repeats", "1", "--arm-seconds", str(ARM_S), "--arms", *ARMS,
            "--lever-positions", "8", "--sinks", "8", "--refresh", "0", "0.25", "1", "--report", str(root / "report.md"), "--levers"]
    try:
        first = main(argv + list(TOY_LEVERS[:-1]))
        stamps = {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "run").rglob("*.json")}
        again = main(argv + list(TOY_LEVERS[:-1]))
        restamps = {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "run").rglob("*.json")}
        stages = json.loads((root / "run" / "real_model_stages.json").read_text())
        more = main(argv + list(TOY_LEVERS))  # one lever more: only it is scored, at both lengths
        after = {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "run").rglob("*.json")}
        bad = main(argv[:2] + ["--positions", "0"])
    finally:
        mp.undo()
    return root, (first, again, more, bad), stamps, restamps, (stages, after)


def test_every_stage_ran_and_a_rerun_skips_them(real):
    root, codes, stamps, restamps, _ = real
    assert codes == (0, 0, 0, 2)
    run = root / "run"
    for f in ("eval.json", "timing.json", "bench_handoff.json", "positions/eval-test-P3.json",
              "positions/eval-test-P6.json", "positions/eval-test-P8.json"):
        assert (run / f).is_file(), f
    assert stamps == restamps  # nothing was trained, scored or timed again
    stages = json.loads((run / "real_model_stages.json").read_text())
    assert set(stages) == {"train", "positions P=3", "positions P=6", "positions P=8", "levers", "levers P=8", "arms",
                           "sinks P=8", "continuations", "bench", "bench refresh small -> deep",
                           *(f"refresh {split} P={p}" for split in ("validation", "test") for p in (3, 6, 8))}
    pool = json.loads((run / "pool" / "pool.json").read_text())
    assert pool["trained_prefix_len"] == [3, 6] and pool["space"]["output"] == "per_layer"
    timing = json.loads((run / "timing.json").read_text())
    assert timing["dense"]["steps"] == 1 and timing["translator"]["steps"] == 2


def _by_hand(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """The paired difference, its standard error and the ±2 SE outcome against 0, by a plain loop: the report's
    rule computed again without its code."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    return m, se, "holds" if m + 2 * se <= 0 else "fails" if m - 2 * se > 0 else "inconclusive"


def test_the_report_says_what_the_numbers_say(real):
    root = real[0]
    md = (root / "report.md").read_text()
    result = EvalResult.from_dict(json.loads((root / "run" / "eval.json").read_text()))
    rows = result.per_batch["all"]
    diff, se, oc = _by_hand(rows["deep->small"]["translator"], rows["deep->small"]["base"])
    assert f"paired difference {diff:+.3f} ± {se:.3f} (SE over 3 batches): **{oc}**" in md
    d2, se2, oc2 = _by_hand(rows["small->deep"]["translator"], rows["small->deep"]["dense"])
    assert "| small->deep | " in md and f"{d2:+.3f} ± {se2:.3f} | {oc2} |" in md
    for p, inside in ((3, "yes"), (6, "yes"), (8, "no")):  # trained on 3..6: P = 8 lies outside
        assert f"| {p} | {inside} | deep->small |" in md
    bench = json.loads((root / "run" / "bench_handoff.json").read_text())
    assert bench["config"]["source"] == "small" and bench["config"]["target"] == "deep"
    assert f"{bench['rows'][1]['ratio']:.2f}" in md
    for shape in ("smollm2-135m", "gemma-2-2b", "llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b"):
        assert f"| {shape} |" in md
    assert "## Final table (test split)" in md and "kvlingua real-model" in md
    space = json.loads((root / "run" / "pool" / "pool.json").read_text())["space"]
    assert space["num_layers"] is None and space["stack"] is True  # the toy's main space: the paper's stack
    assert "a cross-attention stack of one layer per model layer (the paper's)" in md
    histories = json.loads((root / "run" / "histories.json").read_text())
    evals = [r for r in histories["dense"] if r["kind"] == "eval"]  # dense: 1 step, evaluations at 0 and 1
    row = f"| dense | small->deep | 0: {evals[0]['eval/nll/small->deep']:.2f}, 1: "
    assert row + f"{evals[-1]['eval/nll/small->deep']:.2f} |" in md
    assert histories["translator"][0]["kind"] == "init"  # init: match ran once, before the first evaluation
    assert histories["dense"][0]["kind"] == "init" and "init/energy/keys" in histories["dense"][0]  # closed form
    # the lever table and the closed-form start stand beside the trained space, and the continuations are shown
    assert "## Levers at the start (test split)" in md and "| sink_tokens: 0 |" in md
    assert "## Latent continuations" in md and "## Against the targets" in md
    assert (root / "report" / "curves.png").is_file() and "![curves](report/curves.png)" in md


def test_levers_past_training_score_the_trained_space_on_longer_prefixes(real):
    """``--lever-positions 8``: the trained space at P = 8 on the levers' rows is, batch for batch, what the positions
    stage measured at P = 8 (its rows are the first of the same fixed permutation), and the report shows the table."""
    root = real[0]
    run = root / "run"
    at8 = EvalResult.from_dict(json.loads((run / "levers-P8" / "trained.json").read_text()))
    positions = EvalResult.from_dict(json.loads((run / "positions" / "eval-test-P8.json").read_text()))
    at6 = EvalResult.from_dict(json.loads((run / "levers" / "trained.json").read_text()))
    assert at8.num_batches == 4 and positions.num_batches == 3
    for path in positions.paths:
        name = path_name(path)
        got = at8.per_batch["all"][name]["space"][:3]
        assert got == pytest.approx(positions.per_batch["all"][name]["translator"], abs=1e-6)
        assert got != pytest.approx(at6.per_batch["all"][name]["space"][:3], abs=1e-6)  # other prefixes than P = 6
    names = json.loads((run / "levers-P8" / "names.json").read_text())
    assert names == json.loads((run / "levers" / "names.json").read_text())  # the same levers
    md = (root / "report.md").read_text()
    path = tuple(at8.paths[0])
    row = f"| trained (the run's final space) | {at8.summary_for(path, 'space').nll_mean:.3f} ("
    assert "## Levers at held-out prefixes of 8 tokens (test split)" in md and row in md


def test_arms_train_for_equal_wall_time_on_the_levers_rows(real):
    """Each arm trained for the same wall-time budget (not the same steps), kept its best validation step, was
    scored on the levers' held-out rows (so the report's rows are paired with the default) and timed its hand-off;
    a space arm trained the space it names."""
    from kvlingua.eval_result import paired_difference
    from kvlingua.paths import path_name

    root = real[0]
    d = root / "run" / "arms"
    meta = json.loads((d / "runs.json").read_text())
    assert meta["seconds"] == ARM_S and tuple(meta["runs"]) == ARMS
    assert meta["runs"]["stack: 6 layers (merge)"]["file"] == "stack-6-layers-merge.json"
    levers = EvalResult.from_dict(json.loads((root / "run" / "levers" / "trained.json").read_text()))
    res = {}
    for name, run in meta["runs"].items():
        assert 1 <= run["steps"] <= run["schedule_steps"] and 0 <= run["best_step"] <= run["steps"]
        # the budget ends a run, or its schedule ran out first (planned from the measured cost of a step)
        assert run["train_s"] >= ARM_S or run["steps"] == run["schedule_steps"]
        assert list(run["handoff"]) == ["small->deep"] and run["handoff"]["small->deep"] > 0
        res[name] = r = EvalResult.from_dict(json.loads((d / run["file"]).read_text()))
        assert r.num_batches == levers.num_batches == 4 and r.paths == levers.paths
        for path in levers.paths:  # the same rows: the references are the levers' own, batch for batch
            for ref in ("base", "control"):
                assert r.per_batch["all"][path_name(path)][ref] == levers.per_batch["all"][path_name(path)][ref]
    md = (root / "report.md").read_text()
    assert "## Training arms at equal wall time (test split)" in md and "**Best arm: `" in md
    path = tuple(levers.paths[0])
    diff, se = paired_difference(res["kl"].per_batch["all"][path_name(path)]["space"],
                                 res["suffix"].per_batch["all"][path_name(path)]["space"])
    run = meta["runs"]["kl"]
    assert f"| kl | {run['steps']} ({run['schedule_steps']}) | {run['train_s']:.1f} | {run['best_step']} | " in md
    assert f"{diff:+.3f} ± {se:.3f}" in md
    assert f"| {meta['runs']['short path only']['handoff']['small->deep']:.2f} |" in md
    # the space arms differ from the default where they should: no stack at all, or a different stack
    suffix, short = res["suffix"], res["short path only"]
    assert any(suffix.per_batch["all"][path_name(p)]["space"] != short.per_batch["all"][path_name(p)]["space"]
               for p in levers.paths)


def test_unknown_arms_are_refused_before_anything_runs(tmp_path, capsys):
    code = main(["real-model", str(tmp_path / "none.yaml"), "--arm-seconds", "1", "--arms", "suffix", "bogus"])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and len(err.strip().splitlines()) == 1


def test_a_stage_that_resumes_in_parts_adds_their_seconds(tmp_path):
    from experiments.realmodel.runner import STAGES_FILE, _Stages

    stages = _Stages(tmp_path)
    (tmp_path / STAGES_FILE).write_text(json.dumps({"arms": 100.0, "levers": 50.0}))
    with stages("arms", "arms, second part", adds=True):
        pass
    with stages("levers", "levers, again"):
        pass
    recorded = stages.read()
    assert 100.0 <= recorded["arms"] < 101.0 and recorded["levers"] < 1.0


def test_the_report_names_the_commit_each_stage_ran_at(tmp_path, monkeypatch):
    """A run resumed at a later commit: its stages record their own commits, and the report's first line says which
    stages ran where (and which ran before the record was kept)."""
    import experiments.realmodel.runner as runner
    from experiments.realmodel.report import ReportRun

    stages = runner._Stages(tmp_path)
    (tmp_path / runner.STAGES_FILE).write_text(json.dumps({"train": 60.0}))  # a stage run before commits were kept
    for name, at in (("positions P=16", "aaa1111"), ("bench", "bbb2222")):
        monkeypatch.setattr(runner, "commit", lambda at=at: at)
        with stages(name, name):
            pass
    assert stages.read_commits() == {"positions P=16": "aaa1111", "bench": "bbb2222"}
    run = ReportRun(command="kvlingua real-model", positions=(16,), shapes_dir=tmp_path, machine="m",
                    stages=stages.read(), commit="bbb2222", stage_commits=stages.read_commits())
    assert run.provenance() == ("code at commit `bbb2222`; by stage: positions P=16 at `aaa1111`; bench at "
                                "`bbb2222`; train at a commit not recorded")
    same = ReportRun(command="c", positions=(16,), shapes_dir=tmp_path, machine="m", stages={"bench": 1.0},
                     commit="bbb2222", stage_commits={"bench": "bbb2222"})
    assert same.provenance() == "code at commit `bbb2222`"


def test_the_sink_study_scores_what_evaluation_scores_and_shows_each_targets_attention(real):
    """``--sinks 8``: its ``translated`` condition is, batch for batch, the trained space that evaluation scored on the
    same rows (levers-P8: the same 4 batches of the same permutation); restoring the target's own keys and values at
    every position would give base, so restoring a share of them lands between; the report shows both tables."""
    root = real[0]
    run = root / "run"
    study = EvalResult.from_dict(json.loads((run / "sinks-P8" / "sinks.json").read_text()))
    levers = EvalResult.from_dict(json.loads((run / "levers-P8" / "trained.json").read_text()))
    attention = json.loads((run / "sinks-P8" / "attention.json").read_text())
    assert study.num_batches == 4
    for path in study.paths:
        rows = study.per_batch["all"][path_name(path)]
        assert rows["translated"] == pytest.approx(levers.per_batch["all"][path_name(path)]["space"], abs=1e-6)
        assert rows["base"] == pytest.approx(levers.per_batch["all"][path_name(path)]["base"], abs=1e-6)
    small = attention["targets"]["small"]
    assert attention["prefix_len"] == 8 and small["sliding_window"] == 64 and len(small["sink"]) == 2
    assert all(0 <= s <= 1 and 0 <= t <= 1 and s + t <= 1 + 1e-4 for s, t in zip(small["sink"], small["top"]))
    md = (root / "report.md").read_text()
    path = tuple(study.paths[0])
    cell = f"{study.summary_for(path, 'own keys').nll_mean:.3f} ("
    assert "## Where a 8-token prefix's content goes (test split)" in md and cell in md
    assert f"| small | 0 | {'sliding (64)' if small['layer_types'] else 'full'} | {small['sink'][0]:.2f} |" in md


def test_attention_mass_is_the_suffix_softmax_computed_by_hand():
    """Layer 0 of a tiny GQA Llama: the mass each prefix position receives is the softmax of q·k/√d over the prefix and
    the causal suffix, built by hand from the layer's own projections and rotary embedding, averaged over heads and
    suffix queries."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvlingua.backend import attention_mass
    from kvlingua.cache import extract_prefix

    model = tiny_model("llama", seed=3, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=VOCAB)
    g = torch.Generator().manual_seed(0)
    prefix, suffix = torch.randint(0, VOCAB, (2, 7), generator=g), torch.randint(0, VOCAB, (2, 5), generator=g)
    block = extract_prefix(model, prefix)  # [2, 7, 2, 16]
    got = attention_mass(model, block, suffix)  # [2, 2, 7]
    B, S, P, H, hd = 2, 5, 7, 4, 8
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(suffix))  # [B, S, 32]
        pos = torch.arange(P, P + S).expand(B, S)
        cos, sin = model.model.rotary_emb(x, pos)
        q = layer.q_proj(x).view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
        k_new = layer.k_proj(x).view(B, S, 2, hd).transpose(1, 2)  # [B, 2, S, hd]
        q, k_new = apply_rotary_pos_emb(q, k_new, cos, sin)
        k_old = block.keys[:, :, 0].view(B, P, 2, hd).transpose(1, 2)  # [B, 2, P, hd] (rotated at 0..P-1)
        keys = torch.cat([k_old, k_new], dim=2).repeat_interleave(H // 2, dim=1)  # [B, H, P+S, hd]
        scores = q @ keys.transpose(-1, -2) / hd ** 0.5  # [B, H, S, P+S]
        future = torch.ones(S, S, dtype=torch.bool).triu(1)
        scores[..., P:] = scores[..., P:].masked_fill(future, float("-inf"))
        want = scores.softmax(-1)[..., :P].mean(dim=(1, 2))  # [B, P]
    assert got.shape == (2, 2, 7)
    assert got[:, 0] == pytest.approx(want, abs=1e-5)
    assert (got.sum(-1) <= 1 + 1e-5).all() and (got.sum(-1) > 0).all()


def test_a_rerun_with_one_lever_more_scores_only_that_lever(real):
    """The third run asks for ``out_weights: attention`` besides the levers already scored: its file appears at both
    lengths, every earlier file is untouched, the stage's seconds grow, and the report's lever table has its row."""
    root, _, stamps, _, (stages, after) = real
    changed = sorted(f for f in after if after[f] != stamps.get(f))
    assert all(f.startswith(("run/levers/", "run/levers-P8/", "run/real_model_stages", "run/real_model_commits"))
               for f in changed), changed
    for out in ("levers", "levers-P8"):
        names = json.loads((root / "run" / out / "names.json").read_text())
        new = [k for k, n in names.items() if n == "out_weights: attention"]
        assert len(new) == 1 and f"run/{out}/{new[0]}.json" in changed
        assert sorted(names.values()) == sorted(("trained", *TOY_LEVERS))
        assert [f for f in changed if f.startswith(f"run/{out}/lever")] == [f"run/{out}/{new[0]}.json"]
    grown = json.loads((root / "run" / "real_model_stages.json").read_text())
    assert grown["levers"] > stages["levers"] and grown["levers P=8"] > stages["levers P=8"]
    assert "| out_weights: attention | " in (root / "report.md").read_text()


def test_refresh_rescores_every_length_paired_and_a_full_refresh_is_the_targets_own_cache(real):
    """``--refresh 0 0.25 1``: at every prefix length the trained space is scored as translated (batch for batch what
    the positions stage scored), refreshed at 25 % and at 100 % (every translated position recomputed by the target:
    exactly its own cache, so exactly base), and at 0 % (the translation as is: this pool records no refresh, so
    exactly the space as trained); the hand-off is timed with each; the report shows the table and the targets read
    with each share."""
    root = real[0]
    run = root / "run"
    for p in (3, 6, 8):
        result = EvalResult.from_dict(json.loads((run / "refresh" / f"eval-test-P{p}.json").read_text()))
        plain = EvalResult.from_dict(json.loads((run / "positions" / f"eval-test-P{p}.json").read_text()))
        for path in result.paths:
            rows = result.per_batch["all"][path_name(path)]
            assert rows["translator"] == pytest.approx(plain.per_batch["all"][path_name(path)]["translator"], abs=1e-6)
            assert rows["translator, refresh 100%"] == pytest.approx(rows["base"], abs=1e-5)
            assert rows["translator, refresh 0%"] == rows["translator"]
            assert "translator, refresh 25%" in rows
    methods = [r["method"] for r in json.loads((run / "bench_refresh.json").read_text())["rows"]]
    assert all(any(f"refresh {r}%" in m for m in methods) for r in (0, 25, 100))
    md = (root / "report.md").read_text()
    assert "## Refresh: the target re-reads the positions it leans on" in md
    assert md.index("### Validation split") < md.index("### Test split")
    chosen = EvalResult.from_dict(json.loads((run / "refresh" / "eval-validation-P8.json").read_text()))
    assert chosen.num_batches == 3 and "translator, refresh 25%" in chosen.conditions
    assert "| with refresh 100%: every path within 0.05 of its P = 64 content at every P |" not in md  # no P = 64 here
    assert "--no-variants --refresh 0.0 0.25 1.0`" in md


def test_a_pool_of_two_families_is_held_to_its_hand_off_and_stored_context_targets(tmp_path):
    """``handoff_targets`` reads the hand-off benchmarks both ways (the main space, each refresh share) and the pool's
    shapes: each row's measured ratios are the benchmark rows' own, met only when every target's is within the
    target, and the stored context's share is Σ's bytes over the members' caches, counted here from the shapes."""
    from experiments.realmodel.sections import handoff_targets

    def bench(ratios: dict[str, float]) -> dict:
        return {"config": {"prefix": "512"}, "rows": [{"method": "re-prefill (target reads the text)", "ratio": 1.0}]
                + [{"method": f"translate ({k}: 3/30 layers, D'=0.5D, per_layer)", "ratio": v} for k, v in ratios.items()]}

    (tmp_path / "bench_handoff.json").write_text(json.dumps(bench({"default": 0.64})))
    (tmp_path / "bench_handoff_reverse.json").write_text(json.dumps(bench({"default": 0.25})))
    (tmp_path / "bench_refresh.json").write_text(json.dumps(bench({"default, refresh 0%": 0.28,
                                                                   "default, refresh 20%": 0.72})))
    (tmp_path / "bench_refresh_reverse.json").write_text(json.dumps(bench({"default, refresh 0%": 0.31,
                                                                           "default, refresh 20%": 0.29})))
    shapes = {"a": (30, 3, 64), "b": (18, 1, 256)}
    pool_json = {"space": {"q_dim": 990, "sink_tokens": 1},
                 "members": [{"name": n, "summary": {"num_layers": L, "n_kv_heads": h, "head_dim": d}}
                             for n, (L, h, d) in shapes.items()]}
    rows = {t: (m, ok) for t, m, ok in handoff_targets(tmp_path, pool_json)}
    assert rows["hand-off through Σ ≤ 0.3× re-prefill at 512 tokens on every target"] == ("0.64× / 0.25×", False)
    assert rows["with refresh 0%: hand-off ≤ 0.3× re-prefill on every target"] == ("0.28× / 0.31×", False)
    assert rows["with refresh 20%: hand-off ≤ 0.3× re-prefill on every target"] == ("0.72× / 0.29×", False)
    share = (511 * 990) / sum(512 * L * h * d for L, h, d in shapes.values())  # keys and values, fp32, both sides
    assert rows["a stored 512-token context ≤ 0.25× the members' native caches together"] == (f"{share:.3f}×", True)
    (tmp_path / "bench_handoff.json").write_text(json.dumps(bench({"default": 0.3})))
    assert handoff_targets(tmp_path, pool_json)[0][2] is True
    assert handoff_targets(tmp_path / "nothing", pool_json) == []
