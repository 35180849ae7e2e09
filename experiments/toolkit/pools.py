"""What a report says about a pool: its members by depth, its manifest, and the table of how each was made."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kvlingua.report import fmt


def deep_and_shallow(members: Sequence[Mapping]) -> tuple[str, str]:
    """``(deep, shallow)``: the names of the members (``pool.json`` entries) with the most and the fewest layers
    (the first of equals for the shallow one, the last for the deep one)."""
    ordered = sorted(members, key=lambda m: m["summary"]["num_layers"])
    return ordered[-1]["name"], ordered[0]["name"]


def read_pool_manifest(pool_yaml: str | Path) -> dict | None:
    """The manifest beside the pool a pool YAML describes (``pretrain.pools.MANIFEST``); None before it is built."""
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import MANIFEST, PoolConfig, pool_dir

    manifest = pool_dir(load_config(PoolConfig, pool_yaml)) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def made_by(mem: dict, met: dict) -> str:
    """How a pool member was made, from its manifest entry: pre-trained here, a snapshot, or a fetched model."""
    if mem.get("snapshot_of"):
        return f"{mem['snapshot_of']['member']} at step {mem['snapshot_of']['step']}"
    if mem.get("model"):
        fetch = Path(met.get("path", "")) / "fetch.json"
        source = json.loads(fetch.read_text())["requirement"] if fetch.is_file() else "its checkpoint"
        return f"pretrained `{mem['model']}` ({source}), frozen as is"
    run = mem.get("pretrain") or {}
    return (f"{run.get('size')}, {run.get('steps')} steps on {run.get('data', {}).get('view')}"
            + (f" from {mem['init_from']}" if mem.get("init_from") else f", seed {run.get('seed')}"))


def pool_table(pools: Iterable[str]) -> list[str]:
    """A table per pool YAML (from the manifest beside the pool): how each member was made, its pre-training
    minutes, held-out NLL and how much it uses its context (own prefix against another passage's), which bounds
    what Σ can carry. Pools not pre-trained yet are left out."""
    out = []
    for pool in sorted(pools):
        m = read_pool_manifest(pool)
        if m is None:
            continue
        ctx0 = m["members"][0]["metrics"].get("context_use", {})
        out += [f"**Pool `{m['name']}`** (vocabulary {m['vocab_size']:,}; `{Path(pool).name}`). "
                f"Context use: held-out NLL after the passage's own {ctx0.get('prefix_len')}-token prefix against "
                "after another passage's, over the rows shown (the gap is what a cache can carry).\n",
                "| member | made by | pre-training (min) | held-out NLL | own prefix | other prefix | gap | rows |",
                "|---|---|---|---|---|---|---|---|"]
        for e in m["members"]:
            mem, met = e["member"], e["metrics"]
            ctx = met.get("context_use", {})
            wall = fmt(met["train_wall_s"] / 60, ".1f") if "train_wall_s" in met else "—"
            gap = fmt(100 * ctx["relative_gap"], ".1f") + " %" if "relative_gap" in ctx else "—"
            out.append(f"| {e['name']} | {made_by(mem, met)} | {wall} | {fmt(met.get('held_out_loss'))} | "
                       f"{fmt(ctx.get('nll_own'))} | {fmt(ctx.get('nll_other'))} | {gap} | {ctx.get('rows', '—')} |")
        out.append("")
    return out


def pretraining_seconds(pool_yaml: str | Path | None) -> dict[str, float]:
    """Each member's own pre-training wall time in seconds (pool manifest); empty without one."""
    m = None if pool_yaml is None else read_pool_manifest(pool_yaml)
    if m is None:
        return {}
    return {e["name"]: e["metrics"]["train_wall_s"] for e in m["members"] if "train_wall_s" in e["metrics"]}
