"""``kvlingua plan``: adapter sizes, FLOPs and step memory of a run or of model configs, before any compute."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlingua.space_config import OUTPUTS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="adapter parameters, bytes, FLOPs per token and step memory, from configs alone",
        description="Print, per model, the IN/OUT adapters' parameters and bytes, their FLOPs per token against "
                    "the model's own prefill, and the memory of one training step, computed on the meta device "
                    "from configs (no weights read, nothing allocated, nothing fetched: a model not fetched yet is "
                    "planned at its known shape, configs/shapes/). Give a run config (YAML), or model "
                    "config.json files / checkpoint directories (e.g. configs/shapes/*.json), each planned alone.")
    parser.add_argument("paths", nargs="+", type=Path, help="a run config .yaml, or config.json files / checkpoint dirs")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config field (dotted key), as for `kvlingua train`")
    parser.add_argument("--q-dim", type=int, default=None,
                        help="Σ width for model configs (default 32 x the model's layers)")
    parser.add_argument("--output", choices=OUTPUTS, default="auto",
                        help="translator output layout for model configs (default auto: per_layer past max_share)")
    parser.add_argument("--batch-size", type=int, default=None, help="model configs: batch of a step (default 16)")
    parser.add_argument("--prefix-len", type=int, default=None, help="model configs: prefix positions (default 64)")
    parser.add_argument("--suffix-len", type=int, default=None, help="model configs: suffix tokens (default 64)")
    parser.add_argument("--bf16", action="store_true", help="count frozen weights at 2 bytes a parameter")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.plan import PlanError

    try:
        if len(args.paths) == 1 and args.paths[0].suffix in (".yaml", ".yml"):
            return _plan_run(args)
        if any(p.suffix in (".yaml", ".yml") for p in args.paths):
            raise PlanError("give one run config (.yaml) alone, or model config.json files / checkpoint dirs")
        return _plan_models(args)
    except (PlanError, ValueError) as e:
        print(f"kvlingua plan: error: {e}", file=sys.stderr)
        return 2


def _workload(args: argparse.Namespace, **defaults):
    from kvlingua.plan import Workload

    given = {"batch_size": args.batch_size, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len}
    fields = {k: v if v is not None else defaults.get(k, getattr(Workload, k)) for k, v in given.items()}
    return Workload(**fields, model_bytes=2 if args.bf16 else 4)


def _plan_models(args: argparse.Namespace) -> int:
    from kvlingua.plan import Q_PER_LAYER, format_plan, load_model_config, model_name, plan_pool
    from kvlingua.space_config import SpaceConfig

    work = _workload(args)
    rows = []
    for path in args.paths:
        config = load_model_config(path)
        q_dim = args.q_dim or Q_PER_LAYER * config.get_text_config().num_hidden_layers
        cfg, plans = plan_pool({model_name(path): config}, SpaceConfig(q_dim=q_dim, output=args.output), work)
        rows += [(cfg, p) for p in plans]
    print(format_plan(rows, work))
    return 0


def _plan_run(args: argparse.Namespace) -> int:
    from kvlingua.config import parse_override
    from kvlingua.plan import format_plan, load_model_config, plan_pool, pool_member_configs
    from workers.run_config import load_run_config

    cfg = load_run_config(args.paths[0], dict(parse_override(o) for o in args.override))
    # from configs alone: a model not fetched yet by its known shape, a member not pre-trained yet by its size rung
    configs = ({n: load_model_config(p) for n, p in cfg.models.items()} if cfg.models is not None
               else pool_member_configs(cfg.pool, cfg.pool_members))
    work = _workload(args, batch_size=cfg.batch_size, prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len)
    for i, (space_name, space) in enumerate(cfg.spaces.items()):
        resolved, plans = plan_pool(configs, space, work)
        print(("\n" if i else "") + format_plan([(resolved, p) for p in plans], work, title=f"space {space_name}: "))
    return 0
