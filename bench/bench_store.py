"""Context-store benchmark: N targets answering after one long shared context, Σ store vs re-reading.

One run, side by side, over HTTP on loopback (``/v1/completions`` with ``stream: true``;
time to first token = until the first token's chunk arrives):

* ``re-read``: every target reads the context + question itself (no store);
* ``store, first``: the context was stored once (source prefill + ``IN_source``); a target's
  first request decodes it (``OUT_target``) and reads the question;
* ``store, reused``: later requests reuse the target's decoded copy and read only the question;
* ``store + decode_for, first``: another context of the same length, stored with ``decode_for`` naming
  every target (each decodes it at store time): a target's first request reads only the question.

Bytes held: the store keeps one latent ``[1, C, Q]`` (keys + values) instead of one native
cache ``[1, C, L_i, D_i]`` per target. Target (DESIGN.md): TTFT with the store ≤ 0.5× re-read.
The pool is built here from configs (random weights, no download): a source and N targets,
Llama-style, ``--layers`` layers of width ``--hidden``.

    python bench/bench_store.py [--targets 2] [--context 512] [--layers 8] [--hidden 384] [--repeats 5]
                                [--space default|latency|latency-per-layer]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import serve_apps  # noqa: E402,F401  (Ray's environment before ``import ray``)


SPACES = {"default": {}, "latency": {"num_layers": 1, "embed_dim_factor": 1.0},
          "latency-per-layer": {"num_layers": 1, "output": "per_layer"}}
"""``--space`` -> SpaceConfig fields of the pool's adapters."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--context", type=int, default=512, help="context tokens")
    p.add_argument("--question", type=int, default=8, help="question tokens after the context")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--q-dim", type=int, default=256)
    p.add_argument("--space", choices=list(SPACES), default="default",
                   help="the pool's adapters: the default translator; latency: one translator layer, D' = D; "
                   "latency-per-layer: one layer with per-layer output heads (linear in depth, D' = D/2); the "
                   "cheaper the decode, the cheaper a target's first read of a stored latent")
    p.add_argument("--repeats", type=int, default=5, help="requests per target and mode (medians reported)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build_pool(root: Path, args) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvlingua.cache import arch_summary, fingerprint
    from kvlingua.pool import PoolMember, save_pool
    from kvlingua.space import SharedSpace
    from kvlingua.translator import SpaceConfig
    from tests.serve_apps.tiny_pool import train_tiny_tokenizer

    train_tiny_tokenizer(root / "tokenizer")
    heads = max(args.hidden // 64, 1)
    members = []
    for i, name in enumerate(["source"] + [f"t{k}" for k in range(1, args.targets + 1)]):
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                          head_dim=64, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg).eval()
        model.save_pretrained(str(root / "models" / name))
        members.append(PoolMember(name, str(root / "models" / name), arch_summary(model), fingerprint(model)))
    torch.manual_seed(0)
    space = SharedSpace({m.name: m.summary for m in members}, SpaceConfig(q_dim=args.q_dim, **SPACES[args.space]))
    return save_pool(root / "pool", space, members, tokenizer_dir=root / "tokenizer")


def ttft(client, body: dict) -> float:
    """Seconds until the first token's chunk of a streamed completion."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"choices": [{' in line:
                first = time.perf_counter() - t0
    return first


def main(argv=None) -> dict:
    args = parse_args(argv)
    import httpx
    import ray
    import torch
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.options import ServeOptions

    wall = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    pool = build_pool(tmp, args)
    meta = json.loads((pool / "pool.json").read_text())
    targets = [m["name"] for m in meta["members"][1:]]
    g = torch.Generator().manual_seed(0)
    context = torch.randint(4, 128, (args.context,), generator=g).tolist()
    question = torch.randint(4, 128, (args.question,), generator=g).tolist()
    context2 = torch.randint(4, 128, (args.context,), generator=g).tolist()  # for decode_for: never decoded before
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ServeOptions(num_cpus=args.ray_cpus / (len(targets) + 1) * 0.99, max_prompt_tokens=2 * args.context,
                            max_new_tokens=8, request_timeout_s=300, verify=False)
        serve.run(build_app(pool, opts), name="bench", route_prefix="/")
        rows: dict[str, list[float]] = {"re-read": [], "store, first": [], "store, reused": [],
                                        "store + decode_for, first": []}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            common = {"max_tokens": 2, "temperature": 0, "kvlingua": {"ignore_eos": True}}
            for t in targets:  # warm-up: load paths, allocate
                ttft(c, {"model": t, "prompt": question, **common})
            for _ in range(args.repeats):
                for t in targets:
                    rows["re-read"].append(ttft(c, {"model": t, "prompt": context + question, **common}))
            t0 = time.perf_counter()
            stored = c.post("/v1/contexts", json={"model": "source", "tokens": context}).json()
            store_s = time.perf_counter() - t0
            cid = stored["id"]
            with_ctx = {**common, "kvlingua": {"context_id": cid, "ignore_eos": True}}
            for t in targets:
                rows["store, first"].append(ttft(c, {"model": t, "prompt": question, **with_ctx}))
            for _ in range(args.repeats):
                for t in targets:
                    rows["store, reused"].append(ttft(c, {"model": t, "prompt": question, **with_ctx}))
            t0 = time.perf_counter()
            pre = c.post("/v1/contexts", json={"model": "source", "tokens": context2, "decode_for": targets}).json()
            store_decode_s = time.perf_counter() - t0
            for t in targets:
                rows["store + decode_for, first"].append(ttft(c, {"model": t, "prompt": question, **common,
                                                                  "kvlingua": {"context_id": pre["id"],
                                                                               "ignore_eos": True}}))
    finally:
        serve.shutdown()
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rows.items()}
    native = sum(2 * args.context * m["summary"]["num_layers"] * m["summary"]["n_kv_heads"] * m["summary"]["head_dim"] * 4
                 for m in meta["members"][1:])
    result = {
        "ttft_s": med, "store_context_s": store_s, "store_and_decode_s": store_decode_s,
        "decode_for_s": pre["decoded_for"],
        "ratio_first": med["store, first"] / med["re-read"], "ratio_reused": med["store, reused"] / med["re-read"],
        "ratio_first_decode_for": med["store + decode_for, first"] / med["re-read"],
        "latent_bytes": stored["bytes"], "native_bytes_all_targets": native,
        "bytes_ratio": stored["bytes"] / native, "wall_s": time.perf_counter() - wall,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(f"{len(targets)} targets, {args.context}-token context + {args.question}-token question, "
          f"Llama L={args.layers} hidden={args.hidden}, Q={args.q_dim}, {args.space} translator")
    print("| mode | TTFT median (ms) | × re-read |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {1000 * v:.0f} | {v / med['re-read']:.2f} |")
    print(f"storing the context once (source prefill + IN): {1000 * store_s:.0f} ms; with decode_for all "
          f"{len(targets)} targets: {1000 * store_decode_s:.0f} ms")
    print(f"bytes held: one latent {stored['bytes']:,} vs {len(targets)} native caches {native:,} "
          f"= {result['bytes_ratio']:.2f}x; wall {result['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
