"""kvlingua: a shared latent space Σ for the KV caches of a pool of frozen LMs.

Pure PyTorch + transformers; never imports Ray. Import submodules directly, e.g.
``from kvlingua.cache import KVBlock, extract_prefix``.
"""

__version__ = "0.1.0"
