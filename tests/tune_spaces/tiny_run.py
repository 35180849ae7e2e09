"""A tiny pool, tokenizer, text corpus and base run YAML on disk for sweep tests and the benchmark.

Two tiny frozen models from ``tests/helpers.py`` (Gemma-2 and Llama, 2 layers each) saved
with ``save_pretrained``; a byte-level BPE of 300 tokens trained on a synthetic corpus
(:func:`kvlingua.data.tokenizer.train_tokenizer`); the corpus is a local ``.txt`` file
(one paragraph per document). No downloads.
"""
from __future__ import annotations

import random
from pathlib import Path

import yaml

from kvlingua.data.tokenizer import train_tokenizer
from kvlingua.data.views import DataConfig
from tests.helpers import tiny_model

VOCAB = 300
WORDS = ("cat dog moon river stone light tree bird song ship cloud field wind fire road city house "
         "king child bread water garden night morning").split()
VERBS = "sees finds carries follows remembers paints builds answers".split()


def write_corpus(path: Path, paragraphs: int = 400, seed: int = 0) -> Path:
    """Synthetic paragraphs of simple sentences, separated by blank lines."""
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sents = [f"the {rng.choice(WORDS)} {rng.choice(VERBS)} the {rng.choice(WORDS)} near the {rng.choice(WORDS)}."
                 for _ in range(rng.randint(2, 4))]
        paras.append(" ".join(sents))
    path.write_text("\n\n".join(paras) + "\n")
    return path


def make_tiny_run(root: Path, steps: int = 4, eval_every: int = 2, batch_size: int = 4) -> Path:
    """Write models, tokenizer, corpus and ``base.yaml`` under ``root``; returns the base YAML path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt")
    train_tokenizer(DataConfig(source=str(corpus)), vocab_size=VOCAB, out_dir=root / "tok")
    for name, kind, seed in (("a", "gemma2", 0), ("b", "llama", 1)):
        tiny_model(kind, seed=seed, vocab=VOCAB).save_pretrained(root / "models" / name)
    base = {
        "name": "tiny",
        "models": {"a": "models/a", "b": "models/b"},
        "tokenizer": "tok",
        "data": {"source": "corpus.txt", "view": "mixed"},
        "prefix_len": 8,
        "suffix_len": 8,
        "batch_size": batch_size,
        "train": {"steps": steps, "lr": 1e-3, "eval_every": eval_every, "log_every": eval_every},
        "spaces": {"translator": {"q_dim": 16, "n_heads": 2}, "linear": {"q_dim": 16, "adapter": "linear"}},
        "eval": {"batches": 2, "first_tokens": 4},
        "ray": {"host": {"num_cpus": 0.25}},
        "tracking": {"uri": f"sqlite:///{root.resolve()}/mlflow.db", "experiment": "tune-test"},
    }
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def write_sweep(root: Path, base: Path, name: str = "sw", **fields) -> Path:
    """A sweep YAML next to ``base`` (space ``debug`` unless given); extra fields as keyword arguments."""
    sweep = {"name": name, "base": str(base), "space": "debug", "max_concurrent_trials": 2, "trial_cpus": 0.5,
             "sweep_dir": str(Path(root) / name), **fields}
    path = Path(root) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path
