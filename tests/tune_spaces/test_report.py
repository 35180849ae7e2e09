"""The sweep's tables and ablation report from rows written by hand (no Ray): the NLL columns are read back
through :class:`kvlingua.metric_names.NllKey`, and the plot is a PNG."""
from __future__ import annotations

import math

import pytest

from tune_spaces.report import ablation_table, plot_ablation, table_markdown
from tune_spaces.results import column_paths, eval_columns, to_markdown

ROWS = [
    {"trial_id": "t1", "status": "finished", "train.lr": 1e-3, "eval_nll": 2.1, "eval_nll/a->b": 2.0,
     "nll/translator/a->b": 2.0, "nll/translator/b->a": 2.5, "nll/base/a->b": 1.5, "nll/base/b->a": 1.6,
     "content/translator/a->b": 0.5},
    {"trial_id": "t2", "status": "finished", "train.lr": 3e-3, "eval_nll": 2.2,
     "nll/translator/a->b": 1.8, "nll/translator/b->a": 2.7, "nll/base/a->b": 1.7, "nll/base/b->a": 1.6},
    {"trial_id": "t3", "status": "finished", "train.lr": 3e-3, "eval_nll": 2.3, "nll/translator/a->b": 1.9},
    {"trial_id": "t4", "status": "stopped", "train.lr": 3e-3, "nll/translator/a->b": 0.1, "nll/linear/c->d": 0.2},
]


def test_column_paths_name_the_paths_of_one_condition_only():
    assert column_paths(ROWS, "translator") == ["a->b", "b->a"]
    assert column_paths(ROWS, "base") == ["a->b", "b->a"]
    assert column_paths(ROWS, "linear") == ["c->d"]
    assert column_paths(ROWS, "control") == []  # eval_nll/a->b and content/... are no NLL column of a condition


def test_ablation_table_best_per_value_and_mean_references(tmp_path):
    table = ablation_table(ROWS, "train.lr", "translator")  # the stopped trial t4 is left out
    assert table["x"] == [1e-3, 3e-3]
    assert table["paths"] == {"a->b": [2.0, 1.8], "b->a": [2.5, 2.7]}
    assert table["refs"] == {"base": {"a->b": pytest.approx(1.6), "b->a": pytest.approx(1.6)}}
    text = table_markdown(table, "train.lr", "translator", "plot.png")
    assert "| 0.001 | 2.0000 | 2.5000 |" in text and "| *base* | 1.6000 | 1.6000 |" in text
    out = plot_ablation(table, "train.lr", "translator", tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_columns_from_an_eval_dict():
    eval_dict = {"conditions": ["base", "control", "translator"],
                 "paths": {"a->b": {"base": {"nll_mean": 1.0, "content": 1.0}, "control": {"nll_mean": 3.0},
                                    "translator": {"nll_mean": 2.0, "content": None}}}}
    cols = eval_columns(eval_dict)
    assert cols["nll/base/a->b"] == 1.0 and cols["nll/control/a->b"] == 3.0 and cols["nll/translator/a->b"] == 2.0
    assert math.isnan(cols["content/translator/a->b"]) and "content/control/a->b" not in cols
    text = to_markdown(ROWS[:2], ["train.lr"], "eval_nll", "translator")
    assert "| trial | status | train.lr | eval_nll | NLL a->b | NLL b->a | content a->b | content b->a |" in text
    assert "| t1 | finished | 0.001 | 2.1 | 2 | 2.5 | 0.5 | — |" in text
