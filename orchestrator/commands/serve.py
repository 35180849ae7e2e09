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
        "(GET /v1/models, POST /v1/generate, POST /v1/generate/mixed, GET /healthz, OpenAPI at /docs). "
        "Blocks until Ctrl-C, then shuts Serve down.",
    )
    p.add_argument("pool_dir", metavar="POOL_DIR", help="trained pool directory (pool.json, adapters, tokenizer/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model deployment (default: 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per model replica (default: 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (default: 0)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt accepted (default: 512)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_new_tokens a request may ask for")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--models-root", default=None, metavar="DIR",
                   help="where the pool's models are now, if they moved since training: each model is looked for "
                   "as DIR/<its checkpoint directory name> or DIR/<its pool name> (fingerprints still checked)")
    p.set_defaults(func=run)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import ConfigError
    from kvlingua.pool import read_pool_meta
    from serve_apps.options import ServeOptions

    try:
        options = ServeOptions(num_replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                               max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                               models_root=args.models_root)
    except ValueError as e:
        raise ConfigError(f"serve options: {e}") from e
    read_pool_meta(args.pool_dir)  # not a pool: refused before Ray is imported

    import serve_apps  # noqa: F401  (Ray's environment before ``import ray``)
    import ray
    from ray import serve

    from serve_apps.app import build_app

    app = build_app(args.pool_dir, options)  # the pool and its models checked before Ray starts
    # Ctrl-C and SIGTERM both end the loop below (SIGINT is ignored in background jobs unless reset).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init(address=args.address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="kvlingua", route_prefix="/")
        print(f"kvlingua serve: {args.pool_dir} at http://{args.host}:{args.port} (docs: /docs); Ctrl-C to stop",
              flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("kvlingua serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
