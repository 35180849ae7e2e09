"""Sizes before compute: what a pool's adapters cost, read from model configs alone.

``kvlingua plan`` prints, per model, the adapters' parameters and bytes, FLOPs per token
against the model's own prefill, and the memory a training step needs, before any
weight is read or any tensor allocated. Everything is built on the meta device
(``torch.device("meta")``): tensors with shapes and no storage.

* **Model parameters**: the transformers model built from its config on meta (tied
  weights counted once).
* **Adapter parameters**: :class:`kvlingua.space.SharedSpace` built on meta from the
  models' :class:`~kvlingua.cache.ArchSummary` -- the very modules training builds.
* **FLOPs per token**: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
  attention, 2 FLOPs per multiply-add) over a meta forward: the model's prefill of ``P``
  tokens divided by ``P``, and ``OUT_i(IN_i(block))`` on a ``P``-position block divided
  by ``P``. The model runs with eager attention here (the meta device cannot take the
  data-dependent checks of the SDPA mask path); its FLOPs are the same.
* **Training-step memory** of a path ``i -> i`` on a batch ``[B, P + S]``: the frozen
  weights, the adapters' training state (fp32 weight, gradient and two AdamW moments:
  16 bytes a parameter), the prefix KV block, and the activations autograd saves for
  the backward pass of ``OUT_i(IN_i(block))`` and of the model's suffix forward over the
  translated cache (counted with ``saved_tensors_hooks``; parameters excluded). The sum
  is what a step holds at the start of its backward pass, a floor of its peak.

:func:`resolve_output` turns ``SpaceConfig(output="auto")`` into the concrete layout for a
pool, by the rule the config documents (``max_share``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kvlingua.cache import ArchSummary, KVBlock, arch_summary, as_past_key_values, cache_kwargs
from kvlingua.config import KvlinguaError
from kvlingua.space import SharedSpace
from kvlingua.space_config import resolve_q_dim, SpaceConfig

META = torch.device("meta")
ADAPTER_STATE_BYTES = 16
"""Bytes a trainable fp32 parameter holds during training: weight, gradient, AdamW's two moments."""
Q_PER_LAYER = 32
"""Σ width per layer when a model config is planned without a q_dim: Q = 32 * L (how issue #13 measured)."""


class PlanError(KvlinguaError, ValueError):
    """A model config cannot be planned (missing or unreadable config, not a causal LM)."""


@dataclass(frozen=True)
class Workload:
    """The training step a plan sizes: one path ``i -> i`` on a batch of prefix + suffix."""

    batch_size: int = 16
    """B: sequences per step."""
    prefix_len: int = 64
    """P: positions of the prefix cache that gets translated (also the prefill length FLOPs are counted at)."""
    suffix_len: int = 64
    """S: suffix tokens the target reads after the translated prefix."""
    model_bytes: int = 4
    """Bytes per frozen-model parameter (4 fp32, 2 bf16)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "prefix_len", "suffix_len", "model_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelPlan:
    """What one pool model's adapters cost (see the module docstring for how each is counted)."""

    name: str
    summary: ArchSummary
    model_params: int
    in_params: int
    out_params: int
    model_flops: float
    """The model's prefill FLOPs per token at length P."""
    adapter_flops: float
    """``OUT_i(IN_i(.))`` FLOPs per token (keys and values) at length P."""
    memory: dict[str, int]
    """Bytes of a training step: ``weights``, ``adapter_state``, ``kv_block``, ``activations``."""

    @property
    def adapter_params(self) -> int:
        return self.in_params + self.out_params

    @property
    def share(self) -> float:
        """IN + OUT as a share of the model's parameters."""
        return self.adapter_params / self.model_params


# ---------------------------------------------------------------------------------------------- models
def load_model_config(path: str | Path) -> PretrainedConfig:
    """A transformers config from a ``config.json`` file or a checkpoint directory holding one (no weights)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise PlanError(f"{path}: no model config (expected a config.json file or a directory with one)")
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise PlanError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise PlanError(f"{file}: a transformers config.json needs a model_type")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as e:
        raise PlanError(f"{file}: {e}") from e


def model_name(path: str | Path) -> str:
    """``qwen2_5-0_5b`` for ``configs/shapes/qwen2.5-0.5b.json``, a checkpoint's directory name (a pool model name)."""
    path = Path(path)
    if path.is_dir():
        name = path.resolve().name
    else:
        name = path.resolve().parent.name if path.name == "config.json" else path.stem
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def pool_member_configs(pool_path: str | Path, names: tuple[str, ...] | None = None) -> dict[str, PretrainedConfig]:
    """name -> transformers config of the members of a pool YAML (``names`` of them), nothing fetched or trained.

    A fetchable ``model:`` member reads its checkpoint's ``config.json`` once fetched, else the
    shape it is known to have (``configs/shapes/``, :func:`kvlingua.realmodels.model_config_path`);
    any other ``model:`` member, its checkpoint's ``config.json``. A pre-trained member (or a
    snapshot of one) is its size rung's config at the pool tokenizer's size; a tokenizer model
    not fetched yet counts the vocabulary of its shape.
    """
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import PoolConfig, known_vocab_size
    from kvlingua.pretrain.sizes import gemma2_config
    from kvlingua.realmodels import MODELS, model_config_path

    def model_config(spec: str) -> PretrainedConfig:
        return load_model_config(model_config_path(spec) if spec in MODELS else Path(spec).expanduser())

    pool = load_config(PoolConfig, pool_path)
    vocab = known_vocab_size(pool) or model_config(pool.tokenizer_model).get_text_config().vocab_size
    runs = {m.name: m.pretrain for m in pool.members if m.pretrain is not None}
    configs = {}
    for m in pool.members:
        if m.model is not None:
            configs[m.name] = model_config(m.model)
        else:
            run = m.pretrain if m.pretrain is not None else runs[m.snapshot_of.member]
            configs[m.name] = gemma2_config(run.size, vocab)
    unknown = sorted(set(names or ()) - set(configs))
    if unknown:
        raise PlanError(f"pool_members: {unknown} not in pool {pool_path} (members: {sorted(configs)})")
    return {n: configs[n] for n in names or configs}


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` on the meta device (eager attention), frozen."""
    config = AutoConfig.for_model(**config.to_dict())  # a copy: the attention setting below stays ours
    config._attn_implementation = "eager"
    try:
        with META:
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise PlanError(f"model_type {config.model_type!r}: not a causal LM transformers can build ({e})") from e
    return model.requires_grad_(False)


def n_params(module: nn.Module) -> int:
    """Parameters of ``module``, shared (tied) tensors once."""
    return sum(p.numel() for p in module.parameters())


def meta_space(members: dict[str, ArchSummary], cfg: SpaceConfig) -> SharedSpace:
    """The shared space of ``members`` under ``cfg`` on the meta device (nothing allocated)."""
    with META:
        return SharedSpace(members, cfg)


def resolve_output(cfg: SpaceConfig, models: dict[str, tuple[ArchSummary, int]]) -> SpaceConfig:
    """``cfg`` with ``output: auto`` made concrete for a pool (``name -> (summary, model parameters)``).

    ``per_layer`` when some member's dense IN + OUT would exceed ``cfg.max_share`` of that
    member's parameters, else ``dense``. An explicit output, and the linear baseline, are
    returned unchanged.
    """
    if cfg.output != "auto" or cfg.adapter != "translator":
        return cfg
    dense = meta_space({n: s for n, (s, _) in models.items()}, replace(cfg, output="dense")).param_counts()
    too_big = any(dense[n]["in"] + dense[n]["out"] > cfg.max_share * p for n, (_, p) in models.items())
    return replace(cfg, output="per_layer" if too_big else "dense")


# ---------------------------------------------------------------------------------------------- measuring
def _measure(fn, params: list[nn.Parameter]) -> tuple[float, int]:
    """FLOPs of running ``fn`` and the bytes of the tensors autograd saves meanwhile.

    Saved tensors that are ``params`` or views of them are left out (weights are counted
    as weights); a tensor saved more than once, or through several views, counts once.
    """
    param_ids = {id(p) for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in param_ids and id(base) not in param_ids:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(counter.get_total_flops()), sum(saved.values())


def _plan_model(name: str, model: nn.Module, space: SharedSpace, work: Workload) -> ModelPlan:
    """Measure one member on meta at batch 1 (FLOPs, activations, block) and scale the batch terms by B."""
    summary = space.members[name]
    B, P, S, L, D = work.batch_size, work.prefix_len, work.suffix_len, summary.num_layers, summary.width
    ids = torch.zeros(1, P, dtype=torch.long, device=META)  # [1, P]
    model_flops, _ = _measure(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False), [])
    adapters = list(space.adapters(name).parameters())
    source = KVBlock(torch.zeros(1, P, L, D, device=META), torch.zeros(1, P, L, D, device=META),
                     summary.n_kv_heads)  # keys, values [1, P, L, D]
    translated = []
    adapter_flops, adapter_acts = _measure(lambda: translated.append(space.translate(source, name, name)), adapters)
    suffix = torch.zeros(1, S, dtype=torch.long, device=META)  # [1, S]
    cache = as_past_key_values(translated[0])
    _, model_acts = _measure(lambda: model(input_ids=suffix, **cache_kwargs(model, cache)), list(model.parameters()))
    model_params = n_params(model)
    memory = {
        "weights": model_params * work.model_bytes,
        "adapter_state": sum(p.numel() for p in adapters) * ADAPTER_STATE_BYTES,
        "kv_block": B * 2 * source.keys.numel() * source.keys.element_size(),  # keys + values, [B, P, L, D] fp32
        "activations": B * (adapter_acts + model_acts),  # every saved activation is per sequence
    }
    counts = space.param_counts()[name]
    return ModelPlan(name, summary, model_params, counts["in"], counts["out"], model_flops / P, adapter_flops / P,
                     memory)


def plan_pool(configs: dict[str, PretrainedConfig], cfg: SpaceConfig,
              work: Workload = Workload()) -> tuple[SpaceConfig, list[ModelPlan]]:
    """The resolved space config and one :class:`ModelPlan` per model of a pool (``name -> config``)."""
    models = {n: meta_model(c) for n, c in configs.items()}
    summaries = {n: arch_summary(c) for n, c in configs.items()}
    cfg = resolve_q_dim(cfg, [s.num_layers for s in summaries.values()])
    bad = [f"{n} ({s.num_layers} layers)" for n, s in summaries.items() if cfg.q_dim % s.num_layers]
    if bad:
        raise PlanError(f"q_dim={cfg.q_dim} is not divisible by the layer count of {', '.join(bad)}")
    cfg = resolve_output(cfg, {n: (summaries[n], n_params(m)) for n, m in models.items()})
    space = meta_space(summaries, cfg)
    return cfg, [_plan_model(n, models[n], space, work) for n in configs]


# ---------------------------------------------------------------------------------------------- printing
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def format_plan(rows: list[tuple[SpaceConfig, ModelPlan]], work: Workload, title: str = "") -> str:
    """One table line per ``(resolved space config, model plan)``: parameters, fp32 bytes, FLOPs, step memory (GiB)."""
    head = (f"{title}step: batch {work.batch_size}, prefix {work.prefix_len}, suffix {work.suffix_len}; frozen "
            f"weights {work.model_bytes} B/param, adapters fp32 + grad + AdamW; FLOPs per token at length "
            f"{work.prefix_len}")
    cols = ("model", "L x D", "params", "adapter", "Q", "D'", "IN", "OUT", "IN+OUT", "share", "MB", "FLOP/tok",
            "adapter", "ratio", "GiB: weights", "adapters", "block", "acts", "total")
    lines = []
    for cfg, p in rows:
        m = p.memory
        kind = cfg.adapter if cfg.adapter == "linear" else cfg.output_layout
        width = "-" if cfg.adapter == "linear" else f"{cfg.embed_factor:g}D"
        lines.append((p.name, f"{p.summary.num_layers} x {p.summary.width}", _si(p.model_params), kind, cfg.q_dim,
                      width, _si(p.in_params), _si(p.out_params), _si(p.adapter_params), f"{p.share:.3f}",
                      f"{p.adapter_params * 4 / 1e6:.1f}", _si(p.model_flops),
                      _si(p.adapter_flops), f"{p.adapter_flops / p.model_flops:.3f}", _gib(m["weights"]),
                      _gib(m["adapter_state"]), _gib(m["kv_block"]), _gib(m["activations"]), _gib(sum(m.values()))))
    widths = [max(len(str(r[i])) for r in (cols, *lines)) for i in range(len(cols))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([head, fmt(cols), *map(fmt, lines)])
