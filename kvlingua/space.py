"""The shared space Σ: one IN and one OUT adapter per pool model.

``SharedSpace.encode`` maps model ``i``'s KV block ``[B, S, L_i, D_i]`` into Σ
(:class:`LatentBlock`, keys and values each ``[B, S, Q]``); ``decode`` maps a latent block
out into model ``j``'s layout ``[B, S, L_j, D_j]``; ``translate`` is ``decode(encode(.))``
for a path ``i -> j`` (``i == j``, the cyclic path, is legal). Parameters grow linearly
with the pool: 2 adapters per model, never one per pair.

On disk a space is part of a pool directory (:mod:`kvlingua.pool`, ``pool.json``): one
``adapters-<name>.safetensors`` per model (tensor names ``in.*`` and ``out.*``), loaded by
:meth:`SharedSpace.load_adapter_file`, which checks every tensor's name and shape against
the space rebuilt from the config and names the model and the tensor on a mismatch.
"""
from __future__ import annotations

import copy

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kvlingua.cache import ArchSummary, KVBlock, check_block_fits, check_same_layout, input_embeddings
from kvlingua.config import from_dict
from kvlingua.prior import TokenPrior
from kvlingua.readout import TokenReadout
from kvlingua.space_config import SpaceConfig, resolve_q_dim
from kvlingua.translator import build_adapter

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class LatentBlock:
    """A KV block in Σ: ``keys`` and ``values`` each ``[B, S, Q]``."""

    keys: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 3 or self.keys.shape != self.values.shape:
            raise ValueError(
                f"LatentBlock needs keys and values of equal shape [B, S, Q]; got "
                f"{tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )

    def map(self, fn) -> "LatentBlock":
        """Apply ``fn`` to keys and values."""
        return LatentBlock(fn(self.keys), fn(self.values))

    def to(self, *args, **kwargs) -> "LatentBlock":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "LatentBlock":
        return self.map(Tensor.detach)


def adapter_file(name: str) -> str:
    """File name of model ``name``'s adapters inside a space or pool directory."""
    return f"adapters-{name}.safetensors"


def summary_from_dict(d: dict, who: str) -> ArchSummary:
    """Rebuild an :class:`ArchSummary` from JSON, with an error naming ``who`` on bad keys."""
    names = {f.name for f in fields(ArchSummary)}
    if not isinstance(d, dict) or set(d) != names:
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{who}: architecture summary must have keys {sorted(names)}, got {got}")
    return ArchSummary(**d)


def legacy_space_dict(space: dict) -> dict:
    """A space config as an older ``pool.json`` recorded it, read with the settings it was trained under.

    Pools written before ``sink_tokens``/``keys``/``init`` existed translated every position with keys as
    cached and started at random (``out_init: random|match``); pools written before ``refresh`` existed read
    their translation as is. The new defaults must not change what they do.
    """
    if "refresh" not in space:
        space = {**space, "refresh": 0.0}
    if "out_init" not in space:
        return space
    old = dict(space)
    old["init"] = old.pop("out_init", "random")
    old.setdefault("sink_tokens", 0)
    old.setdefault("keys", "rotated")
    return old


def space_device(space: nn.Module) -> torch.device:
    """Device of the space's parameters (CPU for a space without any)."""
    p = next(space.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class SharedSpace(nn.Module):
    """The adapters of a pool into and out of Σ.

    Args:
        members: model name -> architecture summary, in pool order.
        cfg: the space config; ``cfg.q_dim`` must be divisible by every member's ``num_layers``.

    Attributes:
        names: member names in pool order.
        members: name -> :class:`ArchSummary`.
        cfg: the :class:`SpaceConfig`.
    """

    def __init__(self, members: dict[str, ArchSummary], cfg: SpaceConfig):
        super().__init__()
        if not members:
            raise ValueError("a shared space needs at least one member model")
        self.cfg = resolve_q_dim(cfg, [s.num_layers for s in members.values()])
        self.names: list[str] = []
        self.members: dict[str, ArchSummary] = {}
        self._adapters = nn.ModuleDict()
        for name, summary in members.items():
            self.add_member(name, summary)

    # -- building -------------------------------------------------------------------------
    def add_member(self, name: str, summary: ArchSummary) -> None:
        """Add model ``name`` with fresh IN/OUT adapters; every existing adapter is left untouched."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"model name {name!r} must start with a letter or digit and use only letters, digits, '_' and '-'"
            )
        if name in self.members:
            raise ValueError(f"model {name!r} is already a member of this space ({self.names})")
        if hasattr(self._adapters, name):
            raise ValueError(f"model name {name!r} clashes with an nn.ModuleDict attribute; choose another name")
        L, D, Q = summary.num_layers, summary.width, self.cfg.q_dim
        if Q % L:
            raise ValueError(
                f"q_dim={Q} is not divisible by the {L} layers of model {name!r}; choose a q_dim divisible by "
                f"every member's layer count"
            )
        adapters = nn.ModuleDict({
            "in": build_adapter(L, D, 1, Q, D, self.cfg),  # [B,S,L,D] -> [B,S,1,Q]
            "out": build_adapter(L, Q // L, L, D, D, self.cfg),  # [B,S,L,Q/L] -> [B,S,L,D]
        })
        if self.cfg.token_readout:  # OUT also reads this member's own tokens (kvlingua.readout)
            adapters["readout"] = TokenReadout(summary.hidden_size, L, D)
        if self.cfg.token_prior:  # buffers: what this member's own tokens say about its cache (kvlingua.prior)
            adapters["prior"] = TokenPrior(self.cfg.token_prior, L, D)
        self._adapters[name] = adapters
        self.names.append(name)
        self.members[name] = summary

    def bind_tokens(self, backend, replace: bool = True) -> "SharedSpace":
        """Let each member's token readout (:mod:`kvlingua.readout`) read that member's input embeddings through
        ``backend`` (a :class:`~kvlingua.backend.PoolBackend`: its ``token_embeddings``) or, for a dict of frozen
        models, their own embedding modules. Members the backend lacks stay as they are; ``replace=False`` keeps a
        binding already made. Returns the space."""
        for name in self.names:
            own = self._adapters[name]
            if "readout" not in own or (not replace and own["readout"].bound):
                continue
            if isinstance(backend, dict):
                if name in backend:
                    own["readout"].bind(lambda ids, model=backend[name]: input_embeddings(model, ids))
            elif name in backend.names():
                own["readout"].bind(lambda ids, m=name: backend.token_embeddings(m, ids))
        return self

    def _check(self, name: str) -> str:
        if name not in self.members:
            raise KeyError(f"unknown pool model {name!r}; this space has {self.names}")
        return name

    def adapters(self, name: str) -> nn.ModuleDict:
        """``{"in": IN_name, "out": OUT_name}``."""
        return self._adapters[self._check(name)]

    def parameters_of(self, names: Iterable[str]) -> list[nn.Parameter]:
        """IN + OUT parameters of the models ``names`` (e.g. the trainable ones when extending a pool)."""
        return [p for n in names for p in self.adapters(n).parameters()]

    def param_counts(self) -> dict[str, dict[str, int]]:
        """``{name: {"in": n_params, "out": n_params}}``; a token readout's maps count as OUT's (its centre and a token
        prior are buffers, not parameters)."""
        def count(n: str, part: str) -> int:
            return sum(p.numel() for p in self._adapters[n][part].parameters()) if part in self._adapters[n] else 0
        return {n: {"in": count(n, "in"), "out": count(n, "out") + count(n, "readout")} for n in self.names}

    # -- the maps -------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, block: KVBlock, source: str) -> LatentBlock:
        """IN_source: KV block ``[B, S, L_i, D_i]`` (cast to the adapters' dtype) -> latent ``[B, S, Q]``."""
        check_block_fits(block, self.members[self._check(source)], f"model {source!r}")
        dtype = self._dtype()
        k, v = self._adapters[source]["in"](block.keys.to(dtype), block.values.to(dtype))  # [B, S, 1, Q]
        return LatentBlock(k.squeeze(2), v.squeeze(2))  # [B, S, Q]

    def decode(self, latent: LatentBlock, target: str, ids: Tensor | None = None, prior: bool = True) -> KVBlock:
        """OUT_target: latent ``[B, S, Q]`` -> KV block ``[B, S, L_j, D_j]`` of model ``target``.

        ``ids`` ``[B, S]``: the target's own tokens at those positions, read by its token readout and then its token
        prior where the space has them (:mod:`kvlingua.readout`, :mod:`kvlingua.prior`; ``prior=False`` skips the
        prior, for its gate); None (positions without tokens, e.g. a ported soft prompt): Σ as decoded."""
        summary = self.members[self._check(target)]
        B, S, Q = latent.keys.shape
        if Q != self.cfg.q_dim:
            raise ValueError(f"latent block has width {Q}, this space has q_dim={self.cfg.q_dim}")
        L = summary.num_layers
        dtype = self._dtype()
        k = latent.keys.to(dtype).reshape(B, S, L, Q // L)  # [B, S, L_j, Q/L_j]
        v = latent.values.to(dtype).reshape(B, S, L, Q // L)
        k, v = self._adapters[target]["out"](k, v)  # [B, S, L_j, D_j]
        block = KVBlock(k, v, summary.n_kv_heads)
        if ids is None:
            return block
        own = self._adapters[target]
        if "readout" in own:
            block = own["readout"](block, ids)
        return own["prior"](block, ids) if prior and "prior" in own else block

    def translate(self, block: KVBlock, source: str, target: str) -> KVBlock:
        """Path ``source -> target``: ``OUT_target(IN_source(block))``; ``[B,S,L_i,D_i] -> [B,S,L_j,D_j]``."""
        return self.decode(self.encode(block, source), target)

    @property
    def stack_removable(self) -> bool:
        """Whether :meth:`without_stack` applies: a translator with both a stack and a short path."""
        return self.cfg.adapter == "translator" and self.cfg.stack and self.cfg.short_path

    def with_refresh(self, share: float) -> "SharedSpace":
        """This space read with ``refresh: share`` (:mod:`kvlingua.refresh`): a read-time setting, so the same
        parameters (shared, not copied) under a config that says so."""
        twin = copy.copy(self)  # a new attribute dict over the same submodules and parameters
        object.__setattr__(twin, "cfg", replace(self.cfg, refresh=share))
        return twin

    def without_stack(self) -> "SharedSpace":
        """A space whose translators keep only their trained short path (config ``stack: false``).

        The ablation of a *trained* translator: same short-path weights, no stack, so the
        difference in NLL is what the stack contributes. The copy is a space in its own
        right (its config, parameters and parameter counts say ``stack: false``). The
        global random state is left untouched.
        """
        if self.cfg.adapter != "translator" or not self.cfg.stack:
            raise ValueError("without_stack needs a translator space with a cross-attention stack")
        if not self.cfg.short_path:
            raise ValueError("this translator has no short path: without its stack nothing would remain")
        with torch.device("meta"):  # no initialisation, no random numbers drawn: every tensor is assigned below
            twin = SharedSpace(dict(self.members), replace(self.cfg, stack=False))
        state = self.state_dict()
        twin.load_state_dict({k: state[k].detach().clone() for k in twin.state_dict()}, strict=True, assign=True)
        return twin.train(self.training).requires_grad_(any(p.requires_grad for p in self.parameters()))

    # -- files ----------------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Model ``name``'s adapter tensors, named ``in.*`` / ``out.*``, contiguous."""
        return {k: t.detach().contiguous() for k, t in self.adapters(name).state_dict().items()}

    def load_adapter_file(self, name: str, path: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load ``name``'s adapters from a safetensors file, checking every tensor name and shape.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the model, the
        tensor and both shapes on any mismatch (missing, unexpected or differently shaped tensors).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: adapter file not found: {path}")
        state = load_file(str(path), device=str(map_location))
        expected = self.adapters(name).state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"model {name!r}: adapter file {path.name} does not match the space config: "
                f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for key, t in expected.items():
            if tuple(state[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"model {name!r}: adapter tensor {key!r} in {path.name} has shape {tuple(state[key].shape)}, "
                    f"the space config needs {tuple(t.shape)}"
                )
        self.adapters(name).load_state_dict(state, strict=True)

    @classmethod
    def from_config_dict(cls, space: dict, members: list[tuple[str, ArchSummary]]) -> "SharedSpace":
        """A freshly initialised space from a ``to_dict(cfg)`` mapping and ``(name, summary)`` pairs."""
        cfg = from_dict(SpaceConfig, legacy_space_dict(space), "space")
        return cls(dict(members), cfg)


def identity_translate(block: KVBlock, source: ArchSummary, target: ArchSummary) -> KVBlock:
    """The identity baseline: hand ``block`` to the target unchanged; only legal when the layouts match.

    Raises ``ValueError`` naming both layouts when source and target caches differ in shape.
    """
    check_block_fits(block, source, "the source model")
    check_same_layout(source, target)
    return KVBlock(block.keys, block.values, target.n_kv_heads)
