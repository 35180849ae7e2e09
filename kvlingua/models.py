"""Loading frozen pool models from local checkpoint directories (safetensors only)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


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
    model = AutoModelForCausalLM.from_pretrained(
        str(p),
        local_files_only=True,
        use_safetensors=True,
        attn_implementation="eager",
        dtype=dtype or torch.float32,
    )
    return freeze(model.to(device))
