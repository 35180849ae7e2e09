"""``kvlingua serve POOL_DIR``: serve a trained pool over HTTP until Ctrl-C."""
from __future__ import annotations

import argparse
import signal
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a trained pool for cross-model generation over HTTP (Ray Serve)",
        description="Deploy one Ray Serve deployment per pool model and a FastAPI ingress "
        "(OpenAI-compatible POST /v1/completions and /v1/chat/completions, GET /v1/models, the Σ context store "
        "/v1/contexts, POST /v1/generate, POST /v1/generate/mixed, GET /v1/modules, GET /healthz, GET /metrics, "
        "OpenAPI at /docs). With --modules, a request may name a module (a soft prompt learned on one pool model): "
        "it is ported through Σ to the answering model once, then reused. "
        "On a Ray started here, model replicas share the machine's CPUs; on a cluster (--address), the "
        "resources are checked before deploying. Blocks until Ctrl-C, then shuts Serve down.",
    )
    p.add_argument("pool_dir", metavar="POOL_DIR", help="trained pool directory (pool.json, adapters, tokenizer/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model deployment (default: 1)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs reserved per model replica (default: 1, lowered on a Ray started here so every "
                   "replica fits the machine)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (default: 0)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt accepted (default: 512)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_new_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S",
                   help="deadline of a request in seconds; past it the answer is 504 (default: 60)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="requests held at once; more are answered 503 with Retry-After (default: 64)")
    p.add_argument("--store-mb", type=float, default=256.0,
                   help="byte budget of the Σ context store in MiB, LRU beyond it (default: 256; 0 disables it)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--models-root", default=None, metavar="DIR",
                   help="where the pool's models are now, if they moved since training: each model is looked for "
                   "as DIR/<its checkpoint directory name> or DIR/<its pool name> (fingerprints still checked)")
    p.add_argument("--modules", default=None, metavar="DIR",
                   help="serve the modules (soft prompts, *.safetensors, e.g. from `kvlingua modules learn`) under "
                   "DIR: each was learned on a pool model; a request names one (module on /v1/generate, "
                   "kvlingua.module on the OpenAI routes) and any target reads it through Σ")
    p.set_defaults(func=run)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import os

    from kvlingua.config import ConfigError
    from serve_apps.options import ServeOptions, fit_to_machine

    try:
        options = ServeOptions(num_replicas=args.replicas, num_cpus=1.0 if args.num_cpus is None else args.num_cpus,
                               num_gpus=args.num_gpus, max_prompt_tokens=args.max_prompt_tokens,
                               max_new_tokens=args.max_new_tokens, models_root=args.models_root,
                               request_timeout_s=args.request_timeout, max_pending_requests=args.max_pending,
                               store_bytes=int(args.store_mb * 2**20), modules_dir=args.modules)
    except ValueError as e:
        raise ConfigError(f"serve options: {e}") from e
    from serve_apps.app import build_app, check_pool

    pool = check_pool(args.pool_dir, options)  # a bad pool, changed model or bad module is refused before Ray starts
    n_models = len(pool.members)

    import ray
    from ray import serve
    from workers.driver import check_resources

    embedded = args.address is None and not os.environ.get("RAY_ADDRESS")
    # Ctrl-C and SIGTERM both end the loop below (SIGINT is ignored in background jobs unless reset).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init(address=args.address, include_dashboard=False)
    try:
        if embedded and args.num_cpus is None:
            options = fit_to_machine(options, n_models, ray.cluster_resources().get("CPU", 1.0))
        check_resources(options.requested(n_models),
                        f"this pool ({n_models} models x {options.num_replicas} replicas, "
                        f"{options.num_cpus:g} CPU / {options.num_gpus:g} GPU each)",
                        hint="Lower --num-cpus / --num-gpus / --replicas, or add nodes.")
        app = build_app(args.pool_dir, options, pool=pool)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="kvlingua", route_prefix="/")
        print(f"kvlingua serve: {args.pool_dir} at http://{args.host}:{args.port} (docs: /docs; "
              f"{n_models} models, {options.num_cpus:g} CPU per replica); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("kvlingua serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
