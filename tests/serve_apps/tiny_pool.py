"""A tiny trained-pool directory for serving tests and benchmarks (no downloads).

Three tiny Gemma-2 models (``a``, ``b``: 2 layers; ``c``: 4 layers, so identity hand-off
between ``a`` and ``c`` is refused), a word-level BPE tokenizer trained with ``tokenizers``
on a few sentences, and a shared space (random init, or a few training steps with
``train_steps``), written with :func:`kvlingua.pool.save_pool`; :func:`learn_tiny_module` learns a
module (soft prompt) on one of its models.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvlingua.cache import arch_summary, fingerprint
from kvlingua.pool import save_pool
from kvlingua.pool_members import PoolMember
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from tests.helpers import tiny_model

SENTENCES = [
    "the cat sat on the mat and looked at the moon",
    "a dog ran in the park with a red ball",
    "models read each other's caches through a shared space",
    "the quick brown fox jumps over the lazy dog",
    "in the beginning was the word and the word was with the pool",
    "she sells sea shells by the sea shore",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 = Gemma-2 config defaults (pad, eos, bos)


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of at most ``vocab_size`` tokens over :data:`SENTENCES`, saved to ``out_dir``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    assert len(fast) <= vocab_size
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_pool(root: Path, q_dim: int = 32, layers: dict[str, int] | None = None, hidden: int = 32,
                    space_cfg: SpaceConfig | None = None, shapes: dict[str, dict] | None = None) -> Path:
    """Write models, tokenizer and pool under ``root``; returns the pool directory ``root/pool``.

    ``shapes[name]`` overrides that member's :func:`tests.helpers.tiny_model` arguments (e.g. a 30-layer
    GQA Llama beside the 2-layer Gemma-2 models).
    """
    layers = layers or {"a": 2, "b": 2, "c": 4}
    shapes = shapes or {}
    root = Path(root)
    tok_dir = root / "tokenizer"
    train_tiny_tokenizer(tok_dir)
    members = []
    for seed, (name, n_layers) in enumerate(layers.items()):
        model = tiny_model(**{"kind": "gemma2", "seed": seed, "layers": n_layers, "hidden": hidden, **shapes.get(name, {})})
        path = root / "models" / name
        model.save_pretrained(str(path))
        members.append(PoolMember(name, str(path), arch_summary(model), fingerprint(model)))
    torch.manual_seed(0)
    space = SharedSpace({m.name: m.summary for m in members}, space_cfg or SpaceConfig(q_dim=q_dim))
    return save_pool(root / "pool", space, members, tokenizer_dir=tok_dir)


def learn_tiny_module(pool_dir: Path, out_dir: Path, model: str = "a", name: str = "cat/moon",
                      text: str = SENTENCES[0], steps: int = 5, length: int = 4) -> Path:
    """A soft prompt learned on pool model ``model`` (a few Adam steps on ``text``), saved as module
    ``name`` under ``out_dir``; returns ``out_dir``."""
    from kvlingua.models import load_frozen
    from kvlingua.modules.prompt import Module, PromptConfig, learn_prompts, save_module
    from kvlingua.pool import load_pool

    pool = load_pool(pool_dir, load_models=False, verify=False)
    member = next(m for m in pool.members if m.name == model)
    frozen = load_frozen(member.path)
    ids = torch.tensor([pool.tokenizer.encode(text)])  # [1, S]: the one task's example
    cfg = PromptConfig(length=length, steps=steps, lr=0.1, warmup_frac=0.0)
    prompts, loss = learn_prompts(frozen, [name], lambda step: ids, cfg)  # [1, p, H]
    save_module(Path(out_dir) / f"{name}.safetensors",
                Module(prompts[0], model, fingerprint(frozen), name, {"train_loss": float(loss[0])}))
    return Path(out_dir)
