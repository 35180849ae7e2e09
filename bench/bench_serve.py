"""Serve benchmark: cross-model generation vs plain single-model generation over HTTP.

Starts the pool's Serve app on a free loopback port and measures, at 1 and 8 concurrent
clients, requests/s, generated tokens/s and p50/p99 latency for

* ``single``: plain generation on the target (no source);
* ``text``:   source -> target, the target re-reads the prompt (baseline hand-off);
* ``latent``: source prefills, its cache goes through Σ, the target decodes from it.

Target (docs/results/benchmarks.md): latent throughput at 8 clients >= 0.7x single. Without ``--pool`` a
tiny random pool is built in a temporary directory (timings only; its text is noise).

    python bench/bench_serve.py [--pool DIR] [--clients 1 8] [--requests 6] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import serve_apps  # noqa: E402,F401  (Ray's environment before ``import ray``)

MODES = ("single", "text", "latent")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=Path, default=None, help="trained pool dir (default: build a tiny random one)")
    p.add_argument("--source", default=None, help="source model (default: the pool's first)")
    p.add_argument("--target", default=None, help="target model (default: the pool's second, else the first)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=6, help="requests per client per measurement")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the self-built tiny models")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(base: str, body: dict, clients: int, requests: int) -> dict:
    """``clients`` threads, each sending ``requests`` requests back to back."""
    import httpx

    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            for _ in range(requests):
                t = time.perf_counter()
                r = c.post("/v1/generate", json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens.append(r.json()["new_tokens"])
                    else:
                        errors.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(latencies) / wall, "tok_per_s": sum(tokens) / wall,
            "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * percentile(latencies, 0.99)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import torch
    from ray import serve

    from kvlingua.pool import load_pool
    from serve_apps.app import build_app
    from serve_apps.options import ServeOptions

    tmp = None
    pool_dir = args.pool
    if pool_dir is None:
        from tests.serve_apps.tiny_pool import build_tiny_pool

        tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
        pool_dir = build_tiny_pool(Path(tmp.name), layers={"a": 2, "b": 2}, hidden=args.hidden)
    pool = load_pool(pool_dir, load_models=False)
    names = [m.name for m in pool.members]
    source = args.source or names[0]
    target = args.target or names[min(1, len(names) - 1)]
    vocab = min(m.summary.vocab_size for m in pool.members)
    prompt = torch.randint(4, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    common = {"prompt": prompt, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    bodies = {"single": {"target": target, **common},
              "text": {"source": source, "target": target, "handoff": "text", **common},
              "latent": {"source": source, "target": target, "handoff": "latent", **common}}

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(num_cpus=args.num_cpus, num_replicas=args.replicas,
                               max_prompt_tokens=max(512, args.prompt_tokens), max_new_tokens=max(256, args.max_new_tokens))
        serve.run(build_app(pool_dir, options), name="kvlingua", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        for mode in MODES:  # warm-up
            measure(base, bodies[mode], 1, 2)
        for clients in args.clients:
            for mode in MODES:
                row = {"mode": mode, **measure(base, bodies[mode], clients, args.requests)}
                results.append(row)
                print(f"{mode:7s} clients={clients:2d}  {row['req_per_s']:7.2f} req/s  {row['tok_per_s']:8.1f} tok/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    by = {(r["mode"], r["clients"]): r for r in results}
    summary = {}
    for clients in args.clients:
        ratio = by[("latent", clients)]["tok_per_s"] / by[("single", clients)]["tok_per_s"]
        summary[f"latent_over_single_{clients}"] = ratio
        print(f"latent / single throughput at {clients} clients: {ratio:.2f}x"
              + ("  (target >= 0.7x)" if clients == 8 else ""))
    print(f"errors: {sum(r['errors'] for r in results)}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
