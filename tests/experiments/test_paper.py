"""The paper report: a claim's verdict follows from the numbers (synthetic results where it must flip)."""
from __future__ import annotations

import json

import pytest

from experiments.paper.claims import Check, run_check, verdict
from experiments.paper.report import RESULT_FILE, write_paper_report
from experiments.paper.suite import PaperExperiment, load_experiments, window_hidden
from experiments.toolkit.stats import outcome
from kvlingua.eval_result import EvalResult

CONDS = ["base", "control", "no-prefix", "translator"]


def result(translator: dict[str, list[float]], base: list[float], trained=None, no_prefix_gap: float = 2.0) -> EvalResult:
    """One target ``b`` read from sources a and b; per-batch NLLs given (no prefix ``no_prefix_gap`` above base)."""
    rows = {p: {"base": base, "control": [x + 1 for x in base], "no-prefix": [x + no_prefix_gap for x in base],
                "translator": t} for p, t in translator.items()}
    paths = [tuple(p.split("->")) for p in translator]
    return EvalResult(paths, CONDS, 4, {"all": rows, "first": rows}, trained)


def test_outcomes_and_verdicts_follow_the_numbers():
    assert outcome(-0.1, 0.01, "le", 0.0) == "holds" and outcome(0.1, 0.01, "le", 0.0) == "fails"
    assert outcome(0.01, 0.05, "le", 0.0) == "inconclusive"
    assert outcome(0.5, 0.1, "ge", 0.1) == "holds" and outcome(0.0, 0.01, "ge", 0.1) == "fails"
    assert outcome(0.01, 0.001, "within", 0.02) == "holds" and outcome(-0.1, 0.01, "within", 0.02) == "fails"
    base = [3.0, 3.1, 2.9, 3.0]
    check = Check(kind="paths", a="translator", b="base", relation="le", tol=0.0)
    good = result({"a->b": [2.9, 3.0, 2.8, 2.9], "b->b": [2.95, 3.05, 2.85, 2.95]}, base)
    bad = result({"a->b": [3.2, 3.3, 3.1, 3.2], "b->b": [3.3, 3.4, 3.2, 3.3]}, base)
    mixed = result({"a->b": [2.9, 3.0, 2.8, 2.9], "b->b": [3.3, 3.4, 3.2, 3.3]}, base)
    assert verdict(run_check(check, {"run": good})) == "reproduced"
    assert verdict(run_check(check, {"run": bad})) == "not reproduced"
    assert verdict(run_check(check, {"run": mixed})) == "partly"
    c = run_check(check, {"run": good})[0]
    assert c.diff == pytest.approx(-0.1) and c.se == pytest.approx(0.0, abs=1e-9)
    # zero-shot against trained paths into the same target
    ext = result({"a->b": [3.0, 3.1, 2.9, 3.0], "b->b": [3.0, 3.1, 2.9, 3.0]}, base, trained=[("b", "b")])
    zs = Check(kind="zero_shot", relation="le", tol=0.05)
    assert verdict(run_check(zs, {"run": ext})) == "reproduced"
    far = result({"a->b": [3.5, 3.6, 3.4, 3.5], "b->b": [3.0, 3.1, 2.9, 3.0]}, base, trained=[("b", "b")])
    assert verdict(run_check(zs, {"run": far})) == "not reproduced"
    # groups: the chosen group against the reference group, paired over the same batches
    g = Check(kind="groups", group_a="best", group_b="k=4", relation="le", tol=0.0)
    evals = {"k=1": good, "k=4": bad}
    assert verdict(run_check(g, evals, best_of={"best": "k=1"})) == "reproduced"
    assert verdict(run_check(g, {"k=1": bad, "k=4": good}, best_of={"best": "k=1"})) == "not reproduced"
    steps = Check(kind="steps", paths=("a->b", "b->a"))
    hist = [{"step": s, "eval/nll/a->b": 3 - s / 10, "eval/nll/a->b/base": 2.5,
             "eval/nll/b->a": 3 - s / 20, "eval/nll/b->a/base": 2.5} for s in range(0, 20, 5)]
    assert run_check(steps, {}, {"run": hist})[0].outcome == "holds"


def test_a_row_no_prefix_would_pass_is_no_evidence_and_tolerances_follow_the_gap():
    """§4.3's flaw by hand: no prefix lands 0.04 above base, so 'within 0.05 of base' is passed by no prefix too."""
    base = [3.0, 3.1, 2.9, 3.0]
    near = result({"a->b": [x + 0.01 for x in base]}, base, no_prefix_gap=0.04)
    nats = run_check(Check(kind="paths", tol=0.05), {"run": near})[0]
    assert nats.floors == {"no-prefix": True, "control": False} and nats.outcome == "inconclusive"
    assert nats.diff == pytest.approx(0.01) and nats.tol == 0.05
    share = run_check(Check(kind="paths", tol_share=0.5), {"run": near})[0]  # 0.5 × 0.04 = 0.02 nats
    assert share.tol == pytest.approx(0.02) and share.floors == {"no-prefix": False, "control": False}
    assert share.outcome == "holds" and verdict([share]) == "reproduced"
    far = result({"a->b": [x + 0.03 for x in base]}, base, no_prefix_gap=0.04)  # 0.03 > 0.02: fails
    assert run_check(Check(kind="paths", tol_share=0.5), {"run": far})[0].outcome == "fails"
    # a claim that a is worse than b (ge) is not weakened by a floor that is worse too
    worse = run_check(Check(kind="paths", relation="ge", tol=0.005), {"run": near})[0]
    assert worse.floors == {} and worse.outcome == "holds"
    with pytest.raises(ValueError, match="tol_share"):
        Check(kind="groups", group_a="x", group_b="y", tol_share=0.5)


def test_window_hidden_against_counting():
    def count(P, S, W):
        return sum(1 for t in range(P, P + S) for k in range(P) if not k > t - W) / (P * S)

    for P, S, W in ((32, 32, 64), (64, 64, 64), (8, 8, 8), (5, 7, 3)):
        assert window_hidden(P, S, W) == pytest.approx(count(P, S, W))
    assert window_hidden(32, 32, 64) == 0.0 and window_hidden(64, 64, 64) > 0.1


def test_paper_configs_load_and_fit_the_budget():
    exps = load_experiments(__import__("pathlib").Path(__file__).parents[2] / "configs" / "paper")
    assert list(exps) == ["4.1", "4.2", "4.3", "4.4", "5", "7.1", "7.2", "7.3"]
    assert all(e.estimate_min <= 45 for e in exps.values())
    assert sum(e.estimate_min for e in exps.values()) + 35 <= 180  # + pool pre-training (measured 33 min)
    for e in exps.values():  # every suffix token sees the whole prefix under the pool's window of 64
        assert window_hidden(e.run["prefix_len"], e.run["suffix_len"], 64) == 0.0


def test_report_verdict_flips_with_the_numbers(tmp_path):
    exp = PaperExperiment(section="4.3", title="t", figure="Fig. 3c", claim="c", paper="p", run={},
                          checks=(Check(kind="paths", label="reach base"),), estimate_min=1)
    base = [3.0, 3.1, 2.9, 3.0]
    for nll, expected, tally in (([2.9, 3.0, 2.8, 2.9], "reproduced", "1 / 0 / 0"),
                                 ([3.4, 3.5, 3.3, 3.4], "not reproduced", "0 / 0 / 1")):
        res = tmp_path / expected.replace(" ", "-")
        (res / "4.3" / "run").mkdir(parents=True)
        result({"a->b": nll}, base).to_json(res / "4.3" / "run" / "eval.json")
        (res / "4.3" / RESULT_FILE).write_text(json.dumps({"evals": {"run": "run/eval.json"}, "wall_s": 60.0}))
        md = write_paper_report({"4.3": exp}, res, res / "paper.md").read_text()
        assert f"**Verdict: {expected}.**" in md and f"| {tally} | {expected} | 1.0 |" in md
        assert "| le 0 | no-prefix: no, control: no |" in md  # no floor passes: the verdict stands
        assert "kvlingua paper --only 4.3" in md
        assert f"| a->b | {sum(base) / 4:.3f} ± " in md and f"{sum(nll) / 4:.3f} ± " in md  # the full per-path table
