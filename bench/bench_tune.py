"""Sweep efficiency: a 4-trial sweep's wall time against 4 × one trial's, given the parallelism.

Both sweeps run in one process on one local Ray over the same tiny pool (tests' tiny run:
two 2-layer models, 300-token BPE, a synthetic corpus), one after the other:

* ``T1``: ``tuner.fit()`` wall time of a sweep with a single trial;
* ``T4``: ``tuner.fit()`` wall time of a sweep with 4 trials, ``P`` of them at once.

Ideal ``T4 = 4 * T1 / P``; the target is ``T4 / ideal <= 1.1``. Model hosts, block
extraction (once per sweep) and MLflow setup are outside both timings (they are paid once
per sweep, not per trial) and are printed separately. Also printed: source-block extractions
of each sweep (the same for 1 and 4 trials).

    python bench/bench_tune.py [--steps 30] [--parallel 2] [--cpus 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workers  # noqa: E402,F401  (Ray environment before ``import ray``)
import ray  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per trial")
    ap.add_argument("--parallel", type=int, default=2, help="trials at once (max_concurrent_trials)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    os.environ["KVLINGUA_HOME"] = str(root / "home")
    from tests.tune_spaces.tiny_run import make_tiny_run, write_sweep
    from tune_spaces.sweep import run_sweep
    from tune_spaces.sweep_config import load_sweep_config

    base = make_tiny_run(root, steps=args.steps, eval_every=args.steps // 2)
    hosts_cpu = 2 * 0.25
    trial_cpus = round((args.cpus - hosts_cpu) / args.parallel, 3)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for name, lrs in (("one", [1e-3]), ("four", [1e-3, 2e-3, 3e-3, 4e-3])):
            sweep = write_sweep(root, base, name=name, max_concurrent_trials=args.parallel, trial_cpus=trial_cpus,
                                space_overrides={"lr": lrs})
            out[name] = run_sweep(load_sweep_config(sweep), progress=False)
    finally:
        ray.shutdown()
    t1 = out["one"]["seconds"]["tune_fit"]
    t4 = out["four"]["seconds"]["tune_fit"]
    ideal = 4 * t1 / args.parallel
    result = {
        "steps_per_trial": args.steps, "parallel_trials": args.parallel, "ray_cpus": args.cpus,
        "trial_cpus": trial_cpus, "T1_one_trial_s": round(t1, 2), "T4_four_trials_s": round(t4, 2),
        "ideal_T4_s": round(ideal, 2), "T4_over_ideal": round(t4 / ideal, 3), "target": "<= 1.1",
        "serial_4xT1_s": round(4 * t1, 2), "T4_over_4xT1": round(t4 / (4 * t1), 3),
        "extractions_one_trial": out["one"]["extractions"], "extractions_four_trials": out["four"]["extractions"],
        "setup_s_per_sweep (plan+hosts+mlflow+blocks)": round(
            out["four"]["seconds"]["total"] - t4, 2),
        "all_finished": out["one"]["complete"] and out["four"]["complete"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
