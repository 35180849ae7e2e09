"""lm-evaluation-harness on a trained pool, served: every model, every path through Σ and through text.

Starts the pool's Serve app on a free loopback port, builds two local lm-eval tasks from the pool's
own text source (or ``--data``; held-out split ``--split``; see :mod:`serve_apps.lmeval`): a cloze
with four choices (``multiple_choice``, accuracy) and the next word (``generate_until`` with stop
strings, exact match of the first word generated), and runs lm-eval 0.4.13 on

* each pool model (``local-completions``): it reads its own text;
* each trained path ``TARGET@SOURCE`` (``kvlingua-completions``: SOURCE reads the context, its cache
  reaches TARGET through Σ, TARGET scores the choices / writes the answer);
* the same path with the text hand-off ``TARGET@SOURCE:text`` (TARGET re-reads the context).

Passages are at most the pool's trained prefix length in tokens, so every latent hand-off is inside
what the pool was trained for. Writes a generated Markdown table (``--out``). Needs
``pip install kvlingua[eval]``.

    python bench/bench_lm_eval.py runs/quickstart/pool [--examples 40] [--out docs/results/lm-eval.md]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSONL; nothing is downloaded
import serve_apps  # noqa: E402,F401  (Ray's environment before ``import ray``)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pool", type=Path, help="a trained pool directory (pool.json)")
    p.add_argument("--data", default=None, help="text source for the tasks (default: the pool's run data)")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--examples", type=int, default=40, help="examples per task")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="longest passage in tokens (default: the pool's trained prefix length + 1, at most 48)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/results/lm-eval.md"))
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_source(pool, data: str | None):
    """The ``DataConfig`` the tasks are built from: ``--data``, else the pool's run data (its English view for
    the parallel bible)."""
    from dataclasses import replace

    from kvlingua.config import from_dict
    from kvlingua.data.views import DataConfig

    if data is not None:
        return DataConfig(source=data, view="en" if data == "bible" else "text")
    job = pool.meta.get("job", {})
    cfg = from_dict(DataConfig, job["data"], "job.data") if "data" in job else DataConfig(view="en")
    return replace(cfg, view="en") if cfg.source == "bible" and cfg.view in ("parallel", "mixed") else cfg


def code_version() -> str:
    """``git describe --always --dirty`` of this checkout (``unknown`` outside git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def handoffs_used(url: str, names: list[str], ids: list[int]) -> dict[str, str]:
    """The hand-off each path alias really used (``kvlingua.handoff_used``) scoring one passage ``ids`` as
    lm-eval does (echo, ``handoff_tokens = len(ids) - 2``): ``latent`` unless the server fell back to text."""
    import httpx

    out = {}
    for name in names:
        body = {"model": name, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
                "kvlingua": {"handoff_tokens": len(ids) - 2}}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        out[name] = r.json()["kvlingua"]["handoff_used"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from kvlingua.data.views import carve_note, documents
    from kvlingua.pool import load_pool
    from serve_apps.app import build_app
    from serve_apps.lmeval import CLOZE, MODEL, NEXTWORD, build_tasks, run_lm_eval, table
    from serve_apps.limits import TrainedLimits
    from serve_apps.options import ServeOptions, fit_to_machine

    pool = load_pool(args.pool.resolve(), load_models=False, verify=False)
    members = [m.name for m in pool.members]
    limits = TrainedLimits.from_meta(pool.meta)
    paths = [(s, t) for t in members for s in members if limits.paths is None or (s, t) in limits.paths]
    context = args.context_tokens or min((limits.max_positions or 47) + 1, 48)
    data = task_source(pool, args.data)
    docs = documents(data, args.split)
    task_dir = build_tasks(docs, pool.tokenizer, Path(tempfile.mkdtemp(prefix="kvlingua-lm-eval-")), n=args.examples,
                           context_tokens=context)
    print(f"tasks: {task_dir} ({args.examples} examples each, passages <= {context} tokens, from {data.source} "
          f"{data.view} {args.split})", flush=True)

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    port = free_port()
    scores, seconds = {}, {}
    start = time.perf_counter()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = fit_to_machine(ServeOptions(max_prompt_tokens=max(512, 2 * context), request_timeout_s=120),
                              len(members), args.ray_cpus)
        serve.run(build_app(args.pool, opts), name="kvlingua", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        names = members + [f"{t}@{s}{h}" for s, t in paths for h in ("", ":text")]
        first = json.loads((task_dir / f"{CLOZE}.jsonl").read_text().splitlines()[0])
        ids = pool.tokenizer.encode(first["context"] + " " + first["choices"][first["label"]], add_special_tokens=False)
        used = handoffs_used(url, [f"{t}@{s}" for s, t in paths], ids)
        print(f"hand-offs used: {used}", flush=True)
        for name in names:
            t0 = time.perf_counter()
            client = "local-completions" if "@" not in name else MODEL
            scores[name] = run_lm_eval(url, name, args.pool / "tokenizer", task_dir, client=client)
            seconds[name] = time.perf_counter() - t0
            print(f"{name:>24}: {json.dumps(scores[name])} ({seconds[name]:.0f} s)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    total = time.perf_counter() - start

    note = carve_note(data)
    lines = ["# lm-evaluation-harness on a served pool", "",
             f"Generated by `python bench/bench_lm_eval.py {args.pool}` (lm-eval 0.4.13, `local-completions` for each "
             f"model, `{MODEL}` for each path alias; {total / 60:.1f} min on {args.ray_cpus} CPUs for "
             f"{len(scores)} model names; code {code_version()}).", "",
             f"Tasks built from `{data.source}` ({data.view}, {args.split} split{'; ' + note if note else ''}): "
             f"`{CLOZE}`: a passage of at most {context} tokens, then its true next word among four words drawn from the "
             f"split's running text (accuracy by log-likelihood); `{NEXTWORD}`: the same passages, greedy generation with stop "
             "strings, exact match of the first word. **own**: the target reads the passage itself; **Σ**: the "
             "source reads it and hands its cache to the target through Σ (`TARGET@SOURCE`; the target reads only "
             "the passage's last token and scores or writes the answer); **text**: the text hand-off "
             "(`TARGET@SOURCE:text`, the target re-reads the passage: equal to own, the reference Σ is measured "
             "against).", "",
             table(scores, members, paths, args.examples),
             "Hand-off each Σ column really used (one passage scored as lm-eval scores it; `text` would mean the "
             f"server fell back): {', '.join(f'`{k}` {v}' for k, v in used.items())}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
