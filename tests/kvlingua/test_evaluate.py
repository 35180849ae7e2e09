"""Evaluation: NLL per condition against hand computation through the models, content transferred, tables, plots."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from kvlingua.backend import LocalBackend
from kvlingua.cache import as_past_key_values, cache_kwargs, extract_prefix
from kvlingua.eval_result import EvalResult, content_transferred, paired_difference
from kvlingua.evaluate import EvalConfig, evaluate, make_eval_fn
from kvlingua.report import plot_history, write_report
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig
from tests.helpers import VOCAB, tiny_model

P, S, B = 5, 7, 3
FIRST = 3


@pytest.fixture(scope="module")
def setup():
    models = {"a": tiny_model("gemma2", seed=0), "b": tiny_model("gemma2", seed=1),
              "c": tiny_model("llama", seed=2, layers=3, kv_heads=2)}
    backend = LocalBackend(models)
    torch.manual_seed(0)
    summaries = {n: backend.summary(n) for n in models}
    legacy = dict(init="random", sink_tokens=0, keys="rotated", refresh=0)  # hand computation below reads raw blocks
    spaces = {"translator": SharedSpace(summaries, SpaceConfig(q_dim=24, **legacy)),
              "linear": SharedSpace(summaries, SpaceConfig(q_dim=24, adapter="linear", **legacy))}
    gen = torch.Generator().manual_seed(1)
    # parallel text: each model has its own ids, so the hand computation must pick the right ones
    batches = [Batch({n: torch.randint(0, VOCAB, (B, P + S), generator=gen) for n in models}, P, key=f"v/{k}")
               for k in range(2)]
    paths = [("a", "b"), ("c", "a"), ("b", "b")]
    result = evaluate(backend, batches, paths, spaces, first_tokens=FIRST)
    return models, backend, spaces, batches, paths, result


def nll_after(model, cache, suffix):
    """Per-token NLL [B, S-1] of suffix[:, 1:] read after ``cache`` (None: from position 0)."""
    with torch.no_grad():
        logits = model(input_ids=suffix, use_cache=cache is not None, **cache_kwargs(model, cache)).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), suffix[:, 1:].reshape(-1),
                           reduction="none").view(suffix.shape[0], -1)


def full_forward_nll(model, ids):
    """Per-token NLL of positions P+1.. in one full-sequence forward (an independent route to `base`)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, P:-1].reshape(-1, VOCAB), ids[:, P + 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)


def hand(models, spaces, batch, src, tgt):
    ids_i, ids_j = batch.ids[src], batch.ids[tgt]
    wrong = torch.cat([ids_j.roll(1, dims=0)[:, :P], ids_j[:, P:]], dim=1)
    src_block = extract_prefix(models[src], ids_i[:, :P])
    out = {"base": full_forward_nll(models[tgt], ids_j), "control": full_forward_nll(models[tgt], wrong),
           "no-prefix": nll_after(models[tgt], None, ids_j[:, P:])}
    for name, sp in spaces.items():
        with torch.no_grad():
            out[name] = nll_after(models[tgt], as_past_key_values(sp.translate(src_block, src, tgt)), ids_j[:, P:])
    if models[src].config.num_hidden_layers == models[tgt].config.num_hidden_layers:
        out["identity"] = nll_after(models[tgt], as_past_key_values(src_block), ids_j[:, P:])
    return out


@pytest.mark.parametrize("path", [("a", "b"), ("c", "a")])
def test_numbers_equal_hand_computation(setup, path):
    models, _, spaces, batches, _, result = setup
    per_batch = [hand(models, spaces, b, *path) for b in batches]
    assert set(result.conditions_of(path)) == set(per_batch[0])
    for cond in per_batch[0]:
        all_means = torch.tensor([float(h[cond].mean()) for h in per_batch], dtype=torch.float64)
        first_means = torch.tensor([float(h[cond][:, :FIRST].mean()) for h in per_batch], dtype=torch.float64)
        s = result.summary_for(path, cond)
        assert s.nll_mean == pytest.approx(float(all_means.mean()), abs=1e-5), cond
        assert s.nll_std == pytest.approx(float(all_means.std()), abs=1e-5), cond
        assert s.first_mean == pytest.approx(float(first_means.mean()), abs=1e-5), cond
        assert s.first_std == pytest.approx(float(first_means.std()), abs=1e-5), cond
    ctrl, base, nll = [sum(float(h[c].mean()) for h in per_batch) / len(per_batch)
                       for c in ("control", "base", "translator")]
    gaps = [float(h["control"].mean() - h["base"].mean()) for h in per_batch]
    gap_se = statistics.stdev(gaps) / math.sqrt(len(gaps))
    s = result.summary_for(path, "translator")
    assert s.gap == pytest.approx(ctrl - base, abs=1e-5) and s.gap_se == pytest.approx(gap_se, abs=1e-5)
    ungated = dataclasses.replace(result, content_min_se=0.0).summary_for(path, "translator").content
    if ctrl - base > 0:
        assert ungated == pytest.approx((ctrl - nll) / (ctrl - base), abs=1e-4)
    else:
        assert math.isnan(ungated)  # no gap at all: nothing to transfer
    if ctrl - base > 3 * gap_se:
        assert s.content == pytest.approx((ctrl - nll) / (ctrl - base), abs=1e-4)
    else:
        assert math.isnan(s.content)


def synthetic(control: list[float], base: list[float], nll: list[float], min_se: float = 3.0) -> EvalResult:
    """An EvalResult of one path with given per-batch NLLs (first span = all span)."""
    row = {"base": base, "control": control, "no-prefix": control, "translator": nll}
    return EvalResult([("a", "b")], ["base", "control", "no-prefix", "translator"], 4,
                      {"all": {"a->b": row}, "first": {"a->b": row}}, trained=[], content_min_se=min_se)


def test_content_is_reported_only_where_base_clearly_beats_control():
    # gap per batch = 0.5 ± tiny noise: a clear margin, the ratio is reported
    clear = synthetic([3.5, 3.51, 3.49, 3.5], [3.0, 3.0, 3.0, 3.0], [3.25, 3.25, 3.25, 3.25])
    s = clear.summary_for(("a", "b"), "translator")
    assert s.content == pytest.approx(0.5) and s.gap == pytest.approx(0.5)
    assert s.gap_se == pytest.approx(statistics.stdev([0.5, 0.51, 0.49, 0.5]) / 2)
    # the same mean gap drowned in batch-to-batch noise: n/a, the gap shown instead of an exploding ratio
    noisy = synthetic([4.5, 2.51, 4.49, 2.5], [3.0, 3.0, 3.0, 3.0], [3.25, 3.25, 3.25, 3.25])
    s = noisy.summary_for(("a", "b"), "translator")
    assert s.gap == pytest.approx(0.5) and math.isnan(s.content)
    row = next(line for line in noisy.to_markdown().splitlines() if line.startswith("| a->b"))
    assert f"n/a (gap 0.500 ± {s.gap_se:.3f})" in row and "(zero-shot)" in row
    assert math.isnan(synthetic([3.0] * 4, [3.5] * 4, [3.2] * 4, 0.0).summary_for(("a", "b"), "translator").content)
    again = EvalResult.from_dict(json.loads(json.dumps(noisy.to_dict())))
    assert again.to_markdown() == noisy.to_markdown() and not again.is_trained(("a", "b"))


def test_paired_difference_against_hand_computation():
    a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 1.0]
    d = [0.5, 1.0, 3.0]
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(sum(d) / 3) and se == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    assert math.isnan(paired_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def test_identity_only_where_layouts_match(setup):
    *_, result = setup
    assert "identity" in result.conditions_of(("a", "b")) and "identity" in result.conditions_of(("b", "b"))
    assert "identity" not in result.conditions_of(("c", "a"))
    assert result.conditions == ["base", "control", "no-prefix", "identity", "translator", "linear"]


def test_content_transferred_formula(setup):
    assert content_transferred(3.0, control=4.0, base=2.0) == 0.5
    assert content_transferred(1.5, control=4.0, base=2.0) == 1.25  # better than the target's own cache
    assert content_transferred(5.0, control=4.0, base=2.0) == -0.5
    assert math.isnan(content_transferred(3.0, control=2.0, base=2.0))
    *_, result = setup
    ungated = dataclasses.replace(result, content_min_se=0.0)
    for path in result.paths:
        if ungated.summary_for(path, "base").gap > 0:
            assert ungated.summary_for(path, "base").content == pytest.approx(1.0)
            assert ungated.summary_for(path, "control").content == pytest.approx(0.0)


def test_markdown_and_json_hold_every_path_and_condition(setup, tmp_path):
    *_, paths, result = setup
    md = result.to_markdown()
    assert md.count("### Suffix NLL") == 2 and "first 3 suffix tokens" in md
    for path in paths:
        assert md.count(f"| {path[0]}->{path[1]} |") == 2
    header = next(line for line in md.splitlines() if line.startswith("| path"))
    for cond in result.conditions:
        assert f" {cond} |" in header
    for cond in ("no-prefix", "identity", "translator", "linear"):
        assert f"content: {cond}" in header
    row_ca = next(line for line in md.splitlines() if line.startswith("| c->a"))
    assert "—" in row_ca  # no identity for different layouts
    data = json.loads(result.to_json(tmp_path / "r" / "eval.json").read_text())
    assert set(data["paths"]) == {"a->b", "c->a", "b->b"}
    assert data["batches"] == 2 and data["first_tokens"] == FIRST
    assert set(data["paths"]["a->b"]) == {"source", "target", "trained", *result.conditions}
    assert "identity" not in data["paths"]["c->a"]
    s = result.summary_for(("c", "a"), "linear")
    assert data["paths"]["c->a"]["linear"]["nll_mean"] == pytest.approx(s.nll_mean)
    assert data["per_batch"]["first"]["b->b"]["translator"] == result.per_batch["first"]["b->b"]["translator"]


def test_bad_inputs(setup):
    _, backend, spaces, batches, _, result = setup
    with pytest.raises(ValueError, match="not in the pool"):
        evaluate(backend, batches, [("a", "zz")], {})
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(backend, [Batch({n: t[:1] for n, t in batches[0].ids.items()}, P)], [("a", "b")], {})
    with pytest.raises(ValueError, match="clash"):
        evaluate(backend, batches, [("a", "b")], {"base": spaces["linear"]})
    with pytest.raises(KeyError, match="was not evaluated"):
        result.summary_for(("b", "a"), "base")
    with pytest.raises(KeyError, match="identity"):
        result.summary_for(("c", "a"), "identity")
    with pytest.raises(ValueError, match="first_tokens"):
        EvalConfig(first_tokens=0)


def test_eval_fn_and_figure(setup, tmp_path):
    _, backend, spaces, batches, paths, result = setup
    space = spaces["linear"]
    space.train()
    eval_fn = make_eval_fn(backend, batches, paths, space, first_tokens=FIRST)
    m = eval_fn(0)
    assert space.training, "mode is restored"
    for path in paths:
        s = result.summary_for(path, "linear")
        name = f"{path[0]}->{path[1]}"
        assert m[f"eval/nll/{name}"] == pytest.approx(s.nll_mean, abs=1e-6)
        assert m[f"eval/content/{name}"] == pytest.approx(s.content, abs=1e-5, nan_ok=True)
        assert m[f"eval/nll/{name}/base"] == pytest.approx(result.summary_for(path, "base").nll_mean, abs=1e-6)
    assert eval_fn(5) == pytest.approx(m, nan_ok=True)  # references cached, space unchanged

    history = [{"step": s, "kind": "eval", **{k: v + 1.0 / (s + 1) for k, v in m.items()}} for s in (0, 10, 20)]
    history.insert(1, {"step": 5, "kind": "train", "loss": 3.0})
    png = plot_history(history, tmp_path / "fig" / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    png2 = plot_history({"translator": history, "linear": history}, tmp_path / "two.png", references=result)
    assert png2.stat().st_size > 5000
    with pytest.raises(ValueError, match="no eval records"):
        plot_history([{"step": 1, "kind": "train", "loss": 2.0}], tmp_path / "none.png")

    files = write_report(tmp_path / "report", result, {"linear": history}, title="tiny pool",
                         config={"train": {"lr": 0.001}})
    md = files["markdown"].read_text()
    assert md.startswith("# tiny pool") and "lr: 0.001" in md and "![" in md and "| c->a |" in md
    assert files["plot"].is_file() and json.loads(files["json"].read_text())["paths"]
    assert set(write_report(tmp_path / "r2", result)) == {"json", "markdown"}
