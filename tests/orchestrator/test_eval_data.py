"""``kvlingua eval POOL --data SOURCE``: a trained pool scored on a user's own text (train + validation files
only: the test split is carved from train, and the report says so)."""
from __future__ import annotations

import json

from kvlingua.data.views import DataConfig, _carve, documents
from orchestrator.cli import main
from tests.orchestrator.test_pool_errors import run  # noqa: F401  (the tiny trained run fixture)


def test_eval_on_a_users_train_and_validation_files(run, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "my-notes"
    mine.mkdir()
    train = [f"note {i}: the moon and the sea shore {i % 5} with a red ball" for i in range(400)]
    (mine / "train.txt").write_text("\n\n".join(train) + "\n")
    (mine / "validation.txt").write_text("\n\n".join(train[:30]) + "\n")
    out = tmp_path / "out"
    assert main(["eval", str(run["pool"]), "--data", str(mine), "--out", str(out)]) == 0
    report = (out / "eval-test-my-notes.md").read_text()
    first = report.splitlines()[0]
    assert first.startswith(f"Evaluated on `{mine}` (view text, split test") and "has no test split" in first
    result = json.loads((out / "eval-test-my-notes.json").read_text())
    assert set(result["paths"]) == {"a->a", "a->b", "b->a", "b->b"}
    # the held-out text is the user's, carved from train by hash: not the run's own data
    held_out = documents(DataConfig(source=str(mine), view="text"), "test")
    assert held_out == [t for t in train if _carve(t) == "test"] and len(held_out) >= 5
    assert "no test split" in capsys.readouterr().out


def test_eval_data_that_is_not_a_source_is_one_line(run, tmp_path, capsys):  # noqa: F811
    assert main(["eval", str(run["pool"]), "--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlingua eval: error:") and err.count("\n") == 1
