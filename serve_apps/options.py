"""How a pool is served: replicas, resources and request limits."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServeOptions:
    """Options of :func:`serve_apps.app.build_app` (YAML / ``to_dict`` mirror it field for field)."""

    num_replicas: int = 1
    """Replicas of every model deployment."""
    num_cpus: float = 1.0
    """CPUs reserved per model replica (Ray resource accounting)."""
    num_gpus: float = 0.0
    """GPUs per model replica; > 0 runs the model and its adapters on ``cuda``."""
    ingress_num_cpus: float = 0.0
    """CPUs reserved by the HTTP ingress replica (it only tokenizes and routes)."""
    max_ongoing_requests: int = 16
    """Concurrent requests one replica accepts before Serve queues them."""
    max_prompt_tokens: int = 512
    """Longest prompt accepted, in tokens; longer prompts get HTTP 400."""
    max_new_tokens: int = 256
    """Largest ``max_new_tokens`` a request may ask for."""
    torch_threads: int = 1
    """torch intra-op threads per model replica."""
    dtype: str = "float32"
    """Weights dtype of the frozen models: float32, bfloat16 or float16."""
    verify: bool = True
    """Check every model's architecture and weight fingerprint against ``pool.json`` at start-up."""
    models_root: str | None = None
    """Where the pool's models are if they moved since training (see :func:`kvlingua.pool.load_pool`)."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_ongoing_requests", "max_prompt_tokens", "max_new_tokens", "torch_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"
