"""Shared fixtures for the Ray tests: a small local Ray and a tiny pool saved to disk."""
import os

import pytest

import workers  # noqa: F401  (Ray environment before ``import ray``)
from tests.helpers import tiny_model

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def save_tiny_pool(root) -> dict[str, str]:
    """Two tiny frozen models of different architectures saved as safetensors: name -> dir."""
    models = {"a": tiny_model("gemma2", seed=0), "b": tiny_model("llama", seed=1, layers=3)}
    out = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    os.environ.setdefault("KVLINGUA_HOME", str(tmp_path_factory.mktemp("kvlingua_home")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory):
    return save_tiny_pool(tmp_path_factory.mktemp("pool"))


_WORDS = "the light earth water and of said god people land king house son day came went over into".split()


def make_tiny_job(root, *, steps: int = 6, name: str = "tiny", spaces: tuple[str, ...] = ("translator",),
                  batch_size: int = 4, lr: float = 3e-3, checkpoint_every: int = 0):
    """A complete tiny Σ-training job: a text corpus, a 300-token BPE, two tiny models, small spaces.

    Built once per ``root`` (corpus, tokenizer and models are reused when present).
    """
    import random
    from pathlib import Path

    from kvlingua.data.tokenizer import train_tokenizer
    from kvlingua.data.views import DataConfig
    from kvlingua.evaluate import EvalConfig
    from kvlingua.job import TrainJob
    from kvlingua.train_config import TrainConfig
    from kvlingua.space_config import SpaceConfig

    root = Path(root)
    data = DataConfig(source=str(root / "corpus.txt"), view="text")
    vocab = 300
    if not (root / "tok").is_dir():
        rng = random.Random(0)
        paras = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(15, 30))) + "." for _ in range(600)]
        (root / "corpus.txt").write_text("\n\n".join(paras))
        train_tokenizer(data, vocab_size=vocab, out_dir=root / "tok")
        for m, (kind, seed, layers) in {"a": ("gemma2", 0, 2), "b": ("llama", 1, 3)}.items():
            tiny_model(kind, seed=seed, layers=layers, vocab=vocab).save_pretrained(root / m, safe_serialization=True)
    space_cfgs = {"translator": SpaceConfig(q_dim=24, n_heads=2, embed_dim_factor=1.0),
                  "linear": SpaceConfig(q_dim=24, adapter="linear")}
    return TrainJob(
        name=name, models={"a": str(root / "a"), "b": str(root / "b")}, tokenizer=str(root / "tok"),
        out_dir=str(root / f"out-{name}"), data=data, prefix_len=8, suffix_len=8, batch_size=batch_size,
        spaces={s: space_cfgs[s] for s in spaces}, eval=EvalConfig(batches=2, first_tokens=4),
        train=TrainConfig(steps=steps, lr=lr, warmup_frac=0.0, log_every=1, eval_every=steps,
                          checkpoint_every=checkpoint_every),
    )
