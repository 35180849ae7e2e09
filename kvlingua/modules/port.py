"""Porting a module: its KV block on model i -> IN_i -> Σ -> OUT_j -> a cache model j continues from.

* :func:`port_module` — the pure function: module (learned on ``source``) -> ``[1, p, L_j, D_j]``
  block for ``target``, after checking the module against the source model's fingerprint and the
  prompt length against what the pool was meta-trained for. No training on model j. Its first
  half, :func:`module_latent` (``[1, p, Q]`` in Σ), is what a server computes where the source
  model lives; the target's replica decodes it.
* :func:`meta_prompt_len` / :func:`check_prompt_len` — a meta-trained pool records the prompt
  length ``p`` it was meta-trained for in ``pool.json`` (``"modules": {"prompt_len": p, ...}``);
  longer modules put keys at positions Σ never saw and are refused.
* :class:`ModuleLibrary` — what a server holds: the modules of a directory (each checked against
  the pool's members), listed with the model each was learned on, and a cache of ported blocks
  (each module ported once per target, then reused).
* :func:`generate_after` — the target generates after a (ported) module block and a prompt.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kvlingua.cache import KVBlock, check_block_fits, fingerprint
from kvlingua.generate import GenerationParams, eos_ids, make_generator, model_cache, sample_tokens
from kvlingua.modules.prompt import Module, ModuleError, check_module, load_module, prompt_block
from kvlingua.rotary import KeyRotation
from kvlingua.space import LatentBlock, SharedSpace
from kvlingua.view import model_rotation, module_view

MODULES_KEY = "modules"
"""Key of ``pool.json`` a meta-trained pool records its meta-training under."""


def meta_prompt_len(pool_meta: dict) -> int | None:
    """The prompt length a pool was meta-trained for (``pool.json`` ``modules.prompt_len``); None if never."""
    rec = pool_meta.get(MODULES_KEY)
    return int(rec["prompt_len"]) if isinstance(rec, dict) and "prompt_len" in rec else None


def check_prompt_len(module: Module, max_len: int | None) -> None:
    """Refuse a module longer than the pool was meta-trained for (``None``: no limit recorded)."""
    if max_len is not None and module.length > max_len:
        raise ModuleError(f"module {module.task!r} has {module.length} virtual tokens, but this pool was "
                          f"meta-trained for prompts of at most {max_len}: its positions past {max_len} were "
                          f"never translated in meta-training")


@torch.no_grad()
def module_latent(space: SharedSpace, module: Module, source_model: PreTrainedModel, *,
                  source_fingerprint: str | None = None, max_prompt_len: int | None = None) -> LatentBlock:
    """The module in Σ: ``IN_source(prompt_block)``, ``[1, p, Q]``; the half of :func:`port_module` that
    needs the source model (a server runs it where that model lives and decodes elsewhere).

    Arguments as :func:`port_module`. Returns LatentBlock ``[1, p, Q]``, fp32, on the space's device.
    """
    if module.model not in space.members:
        raise ModuleError(f"the module's model {module.model!r} is not in the pool ({space.names})")
    check_module(module, module.model, source_fingerprint or fingerprint(source_model))
    check_prompt_len(module, max_prompt_len)
    block = prompt_block(source_model, module.prompt[None])  # [1, p, L_i, D_i]
    view = module_view(space.cfg)
    block = view.to_space(block, model_rotation(source_model) if view.unrotate else None)  # keys position-free
    device = next(space.parameters()).device
    return space.encode(block.to(device, torch.float32), module.model)  # [1, p, Q]


@torch.no_grad()
def port_module(space: SharedSpace, module: Module, source_model: PreTrainedModel, target: str, *,
                source_fingerprint: str | None = None, max_prompt_len: int | None = None,
                target_rotation: KeyRotation | None = None) -> KVBlock:
    """The block model ``target`` reads for ``module``: ``OUT_target(IN_source(prompt_block))``.

    Args:
        space: the pool's Σ (``module.model`` and ``target`` must be members).
        module: learned on ``module.model``.
        source_model: that model (its fingerprint is checked unless ``source_fingerprint`` is given,
            e.g. the one recorded in ``pool.json`` for a model already verified at load).
        target: the model that continues from the ported block (``target == module.model`` is the
            cyclic path through Σ, not the module's own block).
        max_prompt_len: the pool's :func:`meta_prompt_len`.
        target_rotation: the target's rotary embedding (:func:`kvlingua.view.model_rotation`), needed when
            the space carries keys un-rotated.

    Returns:
        KVBlock ``[1, p, L_target, D_target]``, fp32, on the space's device.
    """
    if target not in space.members:
        raise ModuleError(f"target {target!r} is not in the pool ({space.names})")
    latent = module_latent(space, module, source_model, source_fingerprint=source_fingerprint,
                           max_prompt_len=max_prompt_len)  # [1, p, Q]
    out = module_view(space.cfg).to_cache(space.decode(latent, target), target_rotation)  # [1, p, L_j, D_j]
    check_block_fits(out, space.members[target], f"target {target!r}")
    return out


class ModuleLibrary:
    """The modules of a directory, usable by every model of a pool, with ported blocks cached.

    Args:
        space: the pool's Σ.
        models: pool name -> frozen model (the sources of the modules).
        fingerprints: pool name -> fingerprint recorded in ``pool.json`` (checked against each module).
        module_dir: a directory of module files (``*.safetensors``, searched recursively); a module's
            name is its path relative to the directory without the suffix.
        max_prompt_len: the pool's :func:`meta_prompt_len`.

    Raises:
        ModuleError: a module learned on a model not in the pool, or on other weights (one line).
    """

    def __init__(self, space: SharedSpace, models: dict[str, PreTrainedModel], fingerprints: dict[str, str],
                 module_dir: str | Path, max_prompt_len: int | None = None):
        self.space, self.models, self.fingerprints = space, models, fingerprints
        self.max_prompt_len = max_prompt_len
        root = Path(module_dir)
        if not root.is_dir():
            raise ModuleError(f"{root}: module directory not found")
        self.modules: dict[str, Module] = {}
        for path in sorted(root.rglob("*.safetensors")):
            module = load_module(path)
            if module.model not in fingerprints:
                raise ModuleError(f"{path}: module learned on model {module.model!r}, which is not in the pool "
                                  f"({sorted(fingerprints)})")
            try:
                check_module(module, module.model, fingerprints[module.model])
                check_prompt_len(module, max_prompt_len)
            except ModuleError as e:
                raise ModuleError(f"{path}: {e}") from None
            self.modules[path.relative_to(root).with_suffix("").as_posix()] = module
        self._ported: dict[tuple[str, str], KVBlock] = {}

    def list(self) -> list[dict]:
        """``[{"name", "model", "task", "prompt_len"}]``: what ``GET /v1/modules`` answers."""
        return [{"name": n, "model": m.model, "task": m.task, "prompt_len": m.length} for n, m in self.modules.items()]

    def block(self, name: str, target: str) -> KVBlock:
        """Module ``name`` ported to ``target``, ``[1, p, L, D]``; ported once per target, then reused.

        Raises ``KeyError`` (an HTTP 404) naming what is unknown: the module or the target model.
        """
        if name not in self.modules:
            raise KeyError(f"unknown module {name!r}; known modules: {sorted(self.modules)[:20]}")
        if target not in self.space.members:
            raise KeyError(f"unknown target model {target!r}; the pool has {self.space.names}")
        key = (name, target)
        if key not in self._ported:
            module = self.modules[name]
            rotation = model_rotation(self.models[target]) if target in self.models else None
            self._ported[key] = port_module(self.space, module, self.models[module.model], target,
                                            target_rotation=rotation,
                                            source_fingerprint=self.fingerprints[module.model],
                                            max_prompt_len=self.max_prompt_len)
        return self._ported[key]


@torch.no_grad()
def generate_after(model: PreTrainedModel, block: KVBlock, prompt_ids: Sequence[int] | Tensor,
                   params: GenerationParams = GenerationParams(), seed: int | None = None,
                   tokenizer=None) -> list[int]:
    """Tokens ``model`` samples after reading ``block`` (a ported module, ``[1, p, L, D]``) then ``prompt_ids``."""
    ids = torch.as_tensor(list(prompt_ids) if not isinstance(prompt_ids, Tensor) else prompt_ids).reshape(1, -1)
    if ids.shape[1] < 1:
        raise ValueError("generate_after needs at least one prompt token")
    device = next(model.parameters()).device
    cache = model_cache(model, block)
    if ids.shape[1] > 1:  # read the prompt's head after the module; the last token starts sampling
        from kvlingua.cache import cache_kwargs

        model(input_ids=ids[:, :-1].to(device), use_cache=True, **cache_kwargs(model, cache))
    generator, _ = make_generator(seed, device)
    return list(sample_tokens(model, cache, int(ids[0, -1]), params, generator, stop_ids=eos_ids(model, tokenizer)))
