"""Modules a served pool offers: soft prompts learned on one pool model, read by any model through Σ.

``kvlingua serve POOL --modules DIR`` (``ServeOptions.modules_dir``) serves the modules of ``DIR``
(:class:`kvlingua.modules.port.ModuleLibrary`: each checked against the model it was learned on
and the prompt length the pool was meta-trained for, named by its path without the suffix). A
request names one (``module``) and a target ``j``; the replica of the module's model ``i``
computes its Σ latent ``IN_i(prompt_block)`` ``[1, p, Q]`` once (the ingress keeps it), and the
target's replica decodes it with ``OUT_j`` once (kept in its decoded-cache LRU, as a stored
context's), reads the whole prompt after it and generates — the latent hand-off path.
"""
from __future__ import annotations

from transformers import PreTrainedModel

from kvlingua.modules.port import ModuleLibrary, meta_prompt_len
from kvlingua.pool import LoadedPool


def module_library(pool: LoadedPool, modules_dir: str | None,
                   models: dict[str, PreTrainedModel] | None = None) -> ModuleLibrary | None:
    """The modules of ``modules_dir`` checked against ``pool`` (``None`` when no directory is given).

    Args:
        pool: the served pool (its recorded fingerprints and meta-trained prompt length are the checks).
        modules_dir: directory of module files (``*.safetensors``, searched recursively).
        models: the pool models loaded in this process: a replica passes its own; the ingress none
            (it lists and routes; the replicas compute).

    Raises:
        kvlingua.modules.prompt.ModuleError: a missing directory, an unreadable module, one learned
            on a model not in the pool or on other weights, or one longer than the pool was meta-trained for.
    """
    if modules_dir is None:
        return None
    return ModuleLibrary(pool.space, dict(models or {}), {m.name: m.fingerprint for m in pool.members},
                         modules_dir, meta_prompt_len(pool.meta))


def module_key(name: str) -> str:
    """Key of a module's decoded block in a replica's decoded-cache LRU (beside stored contexts' hex ids)."""
    return f"module:{name}"
