"""A training checkpoint of a space: adapters (safetensors), optimiser, scheduler and RNG state (torch.save,
weights only) and progress (JSON, written last so a directory without it is incomplete)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from kvlingua.train_config import TrainState

ADAPTERS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


def save_checkpoint(directory: str | Path, space: nn.Module, state: TrainState) -> Path:
    """Write the checkpoint of ``space`` at ``state`` into ``directory`` (created); returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{STATE_FILE}.tmp"
    save_model(space, str(d / ADAPTERS_FILE))
    torch.save({"optimizer": state.optimizer_state, "scheduler": state.scheduler_state, "rng": state.rng_state},
               d / OPTIMIZER_FILE)
    tmp.write_text(json.dumps({"step": state.step, "history": state.history, "train_s": state.train_s}))
    os.replace(tmp, d / STATE_FILE)
    return d


def load_checkpoint(directory: str | Path, space: nn.Module) -> TrainState:
    """Load adapter weights into ``space`` (strict) and return the state to resume ``fit`` from."""
    d = Path(directory)
    needed = [d / STATE_FILE, d / ADAPTERS_FILE, d / OPTIMIZER_FILE]
    absent = [p.name for p in needed if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{d}: not a complete training checkpoint (missing {absent})")
    missing, unexpected = load_model(space, str(d / ADAPTERS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{d / ADAPTERS_FILE} does not match this space: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    extra = torch.load(d / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((d / STATE_FILE).read_text())
    return TrainState(step=int(meta["step"]), history=list(meta["history"]), optimizer_state=extra["optimizer"],
                      scheduler_state=extra["scheduler"], rng_state=extra["rng"], train_s=float(meta.get("train_s", 0.0)))
