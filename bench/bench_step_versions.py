"""Σ-training seconds per step of one checkout of kvlingua on the quickstart pool (translator and linear).

Run it for two checkouts, alternating, to compare code versions side by side on one machine (e.g. the
commit before a refactor in a ``git worktree`` and this one): same models, batches, settings, threads.

    python bench/bench_step_versions.py REPO_DIR [steps]   # seconds per step after 3 warm-up steps

The pool is the quickstart's, pre-trained under ``$KVLINGUA_HOME/pools/quickstart``.
"""
import inspect
import sys
import time

repo, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
sys.path.insert(0, repo)
import torch

torch.set_num_threads(2)
from kvlingua.backend import LocalBackend
from kvlingua.models import load_frozen
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig
from kvlingua.train import fit
from kvlingua.train_config import TrainConfig

import os
home = os.path.join(os.environ.get("KVLINGUA_HOME", os.path.expanduser("~/.cache/kvlingua")), "pools", "quickstart")
models = {m: load_frozen(f"{home}/{m}") for m in ("seed0", "seed1")}
backend = LocalBackend(models)
g = torch.Generator().manual_seed(0)
batches = [Batch.same_text(torch.randint(0, 4000, (16, 128), generator=g), list(models), 64) for _ in range(steps + 3)]


class Clock:
    def __init__(self):
        self.t = {}

    def log_params(self, p): pass
    def log_metrics(self, m, step): self.t[step] = time.perf_counter()
    def log_artifact(self, p): pass
    def handle(self): return None
    def close(self, status="FINISHED"): pass


for name in ("translator", "linear"):
    torch.manual_seed(0)
    space = SharedSpace({m: backend.summary(m) for m in models}, SpaceConfig(adapter=name, q_dim=256))
    cfg = TrainConfig(steps=steps + 3, log_every=1)
    clock = Clock()
    if "runtime" in inspect.signature(fit).parameters:
        from kvlingua.runtime import Runtime
        fit(space, backend, iter(batches), cfg, runtime=Runtime(tracker=clock, progress=False))
    else:
        fit(space, backend, iter(batches), cfg, tracker=clock, progress=False)
    print(f"{repo} {name}: {(clock.t[steps + 3] - clock.t[3]) / steps:.3f} s/step")
