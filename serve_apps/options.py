"""How a pool is served: replicas, resources and request limits."""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    request_timeout_s: float = 60.0
    """Deadline of a request: past it the server answers 504 (a model replica busy or never scheduled: 503)."""
    stream_timeout_s: float = 300.0
    """Longest a streamed answer may run; past it the stream ends with ``finish_reason: "timeout"``."""
    max_pending_requests: int = 64
    """Requests the ingress holds at once (running or waiting for a model); more get 503 with Retry-After."""
    store_bytes: int = 256 * 2**20
    """Byte budget of the Σ context store (LRU eviction beyond it); 0 disables storing contexts."""
    decoded_cache_bytes: int = 256 * 2**20
    """Per model replica: bytes of caches decoded from stored contexts and modules kept for reuse (LRU); 0 decodes
    every time."""
    modules_dir: str | None = None
    """Directory of modules (soft prompts learned on pool models, ``*.safetensors``) that requests may name
    (:mod:`serve_apps.modules`); ``None``: no modules."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_ongoing_requests", "max_prompt_tokens", "max_new_tokens", "torch_threads",
                     "max_pending_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("store_bytes", "decoded_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("request_timeout_s", "stream_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt text read at all (64 characters a token): longer text is refused before tokenizing."""
        return 64 * self.max_prompt_tokens

    def requested(self, n_models: int) -> list[tuple[str, int, dict[str, float]]]:
        """Resources the app reserves, as :func:`workers.driver.check_resources` takes them."""
        each = {"CPU": self.num_cpus, "GPU": self.num_gpus}
        return [("model replica", n_models * self.num_replicas, {k: v for k, v in each.items() if v}),
                ("ingress replica", 1, {"CPU": self.ingress_num_cpus} if self.ingress_num_cpus else {})]


def fit_to_machine(options: ServeOptions, n_models: int, cpus: float) -> ServeOptions:
    """``options`` with ``num_cpus`` per model replica lowered so every replica fits in ``cpus`` CPUs.

    An embedded Ray has the machine's CPUs and nothing else: reserving 1 CPU per replica on a
    2-core machine leaves a third model's replica unscheduled forever. Replicas then share cores
    (each runs ``torch_threads`` threads). GPUs are not shared this way (a short GPU count is an error).
    """
    replicas = n_models * options.num_replicas
    free = max(cpus - options.ingress_num_cpus, 0.0)
    share = min(options.num_cpus, free / replicas) if replicas else options.num_cpus
    share = max(int(share * 100) / 100, 0.01)  # Ray rounds resources to 1e-4; stay below the machine's total
    return replace(options, num_cpus=share)
