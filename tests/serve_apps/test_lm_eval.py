"""lm-evaluation-harness 0.4.13 end to end against the served tiny pool (``-m slow``; needs ``kvlingua[eval]``).

A ``generate_until`` and a ``multiple_choice`` task, built from the tiny pool's sentences, on a plain
model and on a path alias, through lm-eval's own ``local-completions`` client (and, for scoring on a
path, ``kvlingua-completions``: the same client telling the server where the context ends).
"""
from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")

from serve_apps.lmeval import CLOZE, MODEL, NEXTWORD, build_tasks, run_lm_eval  # noqa: E402
from tests.serve_apps.tiny_pool import SENTENCES  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def task_dir(pool_dir, tmp_path_factory):
    from kvlingua.pool import load_pool

    tok = load_pool(pool_dir, load_models=False, verify=False).tokenizer
    return build_tasks(SENTENCES * 3, tok, tmp_path_factory.mktemp("tasks"), n=6, context_tokens=8, max_gen_toks=6)


def test_plain_model_both_task_kinds(server, pool_dir, task_dir):
    scores = run_lm_eval(str(server.base_url), "a", pool_dir / "tokenizer", task_dir, client="local-completions")
    assert set(scores) == {CLOZE, NEXTWORD} and all(0.0 <= v <= 1.0 for v in scores.values())
    # no local tokenizer: lm-eval finds the server's /tokenize, /detokenize, /tokenizer_info; same scores
    assert run_lm_eval(str(server.base_url), "a", None, task_dir, client="local-completions") == scores


def test_path_alias_generation_with_the_stock_client(server, pool_dir, task_dir):
    scores = run_lm_eval(str(server.base_url), "b@a", pool_dir / "tokenizer", task_dir, tasks=(NEXTWORD,),
                         client="local-completions")
    assert 0.0 <= scores[NEXTWORD] <= 1.0


def test_path_alias_scoring_and_its_text_handoff(server, pool_dir, task_dir):
    through = run_lm_eval(str(server.base_url), "b@a", pool_dir / "tokenizer", task_dir, client=MODEL)
    text = run_lm_eval(str(server.base_url), "b@a:text", pool_dir / "tokenizer", task_dir, client=MODEL)
    own = run_lm_eval(str(server.base_url), "b", pool_dir / "tokenizer", task_dir, client="local-completions")
    assert text == own  # the text hand-off re-reads the prompt: exactly the target reading its own text
    assert all(0.0 <= v <= 1.0 for v in through.values())
