"""Loading frozen pool models from local checkpoint directories (safetensors only)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") inside the block.

    kvlingua loads and saves small local checkpoints many times per run (every host, every worker,
    every pool member); a bar per load buries the run's own output. The previous setting comes back
    afterwards, so a caller that wants the bars elsewhere keeps them.
    """
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a local ``save_pretrained`` directory, frozen, on ``device``.

    Only safetensors weights are accepted (pickled ``.bin`` files are never loaded), and
    nothing is fetched from a hub. Gemma-2 needs eager attention (soft-capping).
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json; expected a transformers save_pretrained directory")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{p}: no *.safetensors weights; kvlingua loads only safetensors checkpoints "
            "(convert pickled .bin weights with save_pretrained(safe_serialization=True))"
        )
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            dtype=dtype or torch.float32,
        )
    return freeze(model.to(device))
