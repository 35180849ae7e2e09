"""End-to-end sweeps on a local Ray (2 CPUs) over a tiny pool: results, nested MLflow runs, blocks, resume."""
import csv
import json
import os
import signal

import pytest
import torch

import workers  # noqa: F401  (Ray environment before ``import ray``)
from ray import tune

from kvlingua.blockstore import ids_digest
from kvlingua.job import curve_batches, eval_batches, train_batches
from workers.run_config import load_run_config, resolve_models, to_job
from tests.tune_spaces.tiny_run import make_tiny_run, write_sweep
from tune_spaces.report import write_ablation_report
from tune_spaces.sweep import run_sweep
from tune_spaces.sweep_config import load_sweep_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    old = os.environ.get("KVLINGUA_HOME")
    os.environ["KVLINGUA_HOME"] = str(root / "home")  # token caches of the tiny corpus stay in tmp
    import ray

    base = make_tiny_run(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root, base
    ray.shutdown()
    if old is None:
        os.environ.pop("KVLINGUA_HOME")
    else:
        os.environ["KVLINGUA_HOME"] = old


def expected_blocks(base_yaml, lrs) -> int:
    """Distinct source prefixes the trials read, counted independently: one job per lr (same data).

    Per space: the closed-form start's calibration batches (the first ``init_batches`` of training), the
    training batches, and the held-out
    batches: own prefix, and the control (the row's own sink, then the rolled batch's positions)."""
    cfg = load_run_config(base_yaml)
    keys = set()
    for _ in lrs:  # every trial reads the same batches: the set does not grow with the trials
        job = to_job(cfg, resolve_models(cfg))
        for space in job.spaces.values():
            k = space.sink_tokens
            n = job.train.steps
            if space.init == "closed_form":
                n = max(n, space.init_batches)
            it = train_batches(job)
            for _step in range(n):
                b = next(it)
                keys |= {(m, ids_digest(b.prefix(m))) for m in job.models}  # every path each step: a target's
                # sink is a slice of its own block, read as a source in the same step
            for b in [*eval_batches(job), *curve_batches(job)]:
                keys |= {(m, ids_digest(b.prefix(m))) for m in job.models}
                keys |= {(m, ids_digest(torch.cat([b.prefix(m)[:, :k], b.ids[m].roll(1, 0)[:, k:job.prefix_len]], 1)))
                         for m in job.models}  # own sink, then the rolled batch: computed here, not by control_prefix
    return len(keys)


def child_runs(uri, parent_id):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return client, runs


def test_debug_sweep_table_nested_runs_and_blocks_extracted_once(tiny):
    root, base = tiny
    cfg = load_sweep_config(write_sweep(root, base, name="debug"))
    summary = run_sweep(cfg, progress=False)

    assert summary["complete"] and summary["trials"] == 2
    rows = list(csv.DictReader(open(summary["files"]["csv"])))
    assert sorted(float(r["train.lr"]) for r in rows) == [1e-3, 3e-3]
    assert all(r["status"] == "finished" for r in rows)
    for r in rows:
        for path in ("a->a", "a->b", "b->a", "b->b"):
            for cond in ("translator", "linear", "base", "control"):
                assert float(r[f"nll/{cond}/{path}"]) > 0
            assert r[f"content/translator/{path}"] != ""
        # Tune selects on the curve split (validation): the trial's last curve point, not the test table
        history = json.loads((root / "debug" / "trials" / r["trial_id"] / "histories.json").read_text())["translator"]
        last = [h for h in history if h["kind"] == "eval"][-1]
        curve = sum(last[f"eval/nll/{p}"] for p in ("a->a", "a->b", "b->a", "b->b")) / 4
        assert float(r["eval_nll"]) == pytest.approx(curve, rel=1e-6)
        table = sum(float(r[f"nll/translator/{p}"]) for p in ("a->a", "a->b", "b->a", "b->b")) / 4
        assert float(r["eval_nll"]) != pytest.approx(table, rel=1e-6)  # another split: other text
    assert "| trial | status | train.lr | eval_nll |" in open(summary["files"]["markdown"]).read()

    # each source block extracted once, for all trials together: pool size x distinct batches
    n = expected_blocks(base, [1e-3, 3e-3])
    assert summary["extractions"] == n == summary["blocks"]
    assert f"Source KV blocks extracted: {n}" in open(summary["files"]["markdown"]).read()

    # every trial is an MLflow run nested under the sweep's run
    client, runs = child_runs(summary["parent"]["uri"], summary["parent"]["run_id"])
    assert len(runs) == 2
    assert {r.data.tags["kvlingua.trial_id"] for r in runs} == {r["trial_id"] for r in rows}
    assert all(r.info.status == "FINISHED" and "final/nll/a->b/translator".replace("->", "_to_") in r.data.metrics
               for r in runs)
    assert client.get_run(summary["parent"]["run_id"]).info.status == "FINISHED"

    # the best config is a valid run YAML with the best trial's lr
    best = load_run_config(summary["files"]["best_yaml"])
    best_row = min(rows, key=lambda r: float(r["eval_nll"]))
    assert best.train.lr == pytest.approx(float(best_row["train.lr"]))
    assert best.name == "debug-best"

    files = write_ablation_report(cfg.resolved_dir())
    assert os.path.getsize(files["plot_train.lr"]) > 1000
    text = open(files["ablations"]).read()
    assert "vs `train.lr`" in text and "*base*" in text and "*linear*" in text


class InterruptAfterFirst(tune.Callback):
    """Stop the experiment like Ctrl-C once one trial has finished (only on the first run)."""

    def __init__(self, flag: str):
        self.flag = flag

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_sweep_resumes_only_unfinished_trials(tiny):
    root, base = tiny
    sweep = write_sweep(root, base, name="resume", max_concurrent_trials=1)
    cfg = load_sweep_config(sweep)
    first = run_sweep(cfg, progress=False, callbacks=[InterruptAfterFirst(str(root / "interrupted"))])
    assert not first["complete"]
    done_first = [r for r in csv.DictReader(open(first["files"]["csv"])) if r["status"] == "finished"]
    assert len(done_first) == 1

    second = run_sweep(cfg, resume=True, progress=False)
    assert second["complete"] and second["trials"] == 2
    rows = list(csv.DictReader(open(second["files"]["csv"])))
    assert all(r["status"] == "finished" for r in rows)
    assert second["parent"] == first["parent"]
    # the trial finished before the interruption ran exactly once; every trial finished exactly once
    _, runs = child_runs(second["parent"]["uri"], second["parent"]["run_id"])
    finished = [r.data.tags["kvlingua.trial_id"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(r["trial_id"] for r in rows)
    assert [r.data.tags["kvlingua.trial_id"] for r in runs].count(done_first[0]["trial_id"]) == 1
    # no block was extracted again on resume: the store already held them
    assert second["extractions"] == first["extractions"] == second["blocks"]
