"""``kvlingua modules learn|port|meta-train|eval|experiment``: portable soft-prompt modules (paper §6).

Every subcommand reads a modules config (``configs/modules/*.yaml``, :class:`kvlingua.modules.conditions.ModulesConfig`)
with ``-o key=value`` overrides; errors (a module for a model not in the pool, a fingerprint mismatch, a prompt
longer than the pool was meta-trained for, a missing pool, a member without a tokenizer) end in one line. The pool's
members may tokenize differently: each learns on, and is scored on, its own tokens of the tasks' text.
"""
from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "modules"
DEFAULT = CONFIG_DIR / "experiment.yaml"
SMOKE = CONFIG_DIR / "smoke.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=str(DEFAULT), help=f"modules config YAML (default {DEFAULT.name})")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -o pool=runs/seeds/pool -o prompt.steps=50")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("modules", help="portable soft-prompt modules: learn, port, meta-train, evaluate (paper §6)",
                       description="Soft prompts learned on one pool model, ported through Σ to another, and a Σ "
                       "meta-trained so that ported modules work zero-shot.")
    s = p.add_subparsers(dest="modules_command", metavar="SUBCOMMAND", required=True)

    learn = s.add_parser("learn", help="learn (or reuse) a pool model's soft prompts of the tasks",
                         description="Prompt tuning of every task of a role on one pool model, many tasks at once; "
                         "modules land in the module store and are reused by later runs.")
    _common(learn)
    learn.add_argument("--model", required=True, help="pool model to learn the modules on")
    learn.add_argument("--role", choices=["meta-train", "meta-test"], default="meta-test")
    learn.set_defaults(func=run_learn)

    port = s.add_parser("port", help="port a module to a target model and score it on its task",
                        description="Ports MODULE (a module file) through the pool's Σ to --target and prints the "
                        "target's held-out NLL with no prompt and with the ported module.")
    _common(port)
    port.add_argument("--module", required=True, help="a module file (.safetensors)")
    port.add_argument("--target", required=True, help="pool model that reads the ported module")
    port.add_argument("--pool", default=None, help="pool directory whose Σ ports (default: the config's pool)")
    port.set_defaults(func=run_port)

    meta = s.add_parser("meta-train", help="meta-train Σ so that ported modules work on the target (Ray Train)",
                        description="Learns (or reuses) every model's meta-train modules, then fine-tunes Σ on the "
                        "target's held-out loss after the translated module (§6.1), on Ray Train (or --in-process); "
                        "writes <out_dir>/pool-meta.")
    _common(meta)
    meta.add_argument("--init", choices=["pretrained", "random"], default=None,
                      help="start from the pool's trained Σ or from random adapters (default: meta.init)")
    meta.add_argument("--in-process", action="store_true", help="train in this process instead of on Ray Train")
    meta.add_argument("--workers", type=int, default=1, help="Ray Train workers (ranks)")
    meta.set_defaults(func=run_meta)

    ev = s.add_parser("eval", help="score every condition on the meta-test tasks for a pool's Σ",
                      description="No prompt, random prompt, direct prompt and the ported module through the Σ of "
                      "--pool (default: the config's pool), per direction, with the share of the gap recovered.")
    _common(ev)
    ev.add_argument("--pool", default=None, help="pool directory (e.g. <out_dir>/pool-meta)")
    ev.set_defaults(func=run_eval)

    ex = s.add_parser("experiment", help="Figure 5 / Table 4: every condition, the meta-training curve, the report",
                      description="Runs the whole module-portability experiment and writes docs/results/modules.md "
                      "with its plot.")
    _common(ex)
    ex.add_argument("--smoke", action="store_true", help=f"the tiny configuration ({SMOKE.name}; seconds)")
    ex.set_defaults(func=run_experiment_cmd)


def _config(args: argparse.Namespace):
    from kvlingua.config import load_config, parse_override
    from kvlingua.modules.conditions import ModulesConfig, check_config_pool

    path = SMOKE if getattr(args, "smoke", False) else Path(args.config)
    cfg = load_config(ModulesConfig, path, dict(parse_override(o) for o in args.override))
    check_config_pool(cfg)
    import torch

    torch.set_num_threads(cfg.threads)
    return cfg


def _log(msg: str) -> None:
    import sys

    print(f"[kvlingua.modules] {msg}", file=sys.stderr)


def run_learn(args: argparse.Namespace) -> int:
    from kvlingua.modules.conditions import load_modules_pool
    from kvlingua.modules.prompt import ModuleError
    from kvlingua.modules.module_store import ModuleStore
    from kvlingua.modules.tasks import member_tasks

    cfg = _config(args)
    pool = load_modules_pool(cfg.pool)
    if args.model not in pool.models:
        raise ModuleError(f"model {args.model!r} is not in the pool ({sorted(pool.models)})")
    tasks = member_tasks(pool.tokenizers, cfg.tasks, args.role)[args.model]  # eligible for every member
    fp = {m.name: m.fingerprint for m in pool.members}[args.model]
    store = ModuleStore(cfg.store_dir())
    modules = store.learn(args.model, pool.models[args.model], tasks, cfg.prompt, cfg.tasks.train_len, log=_log,
                          fingerprint=fp)
    losses = [m.info["train_loss"] for m in modules]
    print(f"{len(modules)} modules of {args.model} ({args.role}), mean last training NLL "
          f"{sum(losses) / len(losses):.3f}: {store.directory(fp, cfg.prompt)}")
    return 0


def _find_task(pool, cfg, name: str, model: str):
    """Task ``name`` in ``model``'s own tokens."""
    from kvlingua.modules.prompt import ModuleError
    from kvlingua.modules.tasks import member_tasks

    for role in ("meta-test", "meta-train"):
        for t in member_tasks(pool.tokenizers, cfg.tasks, role)[model]:
            if t.name == name:
                return t
    raise ModuleError(f"task {name!r} is not among this config's tasks; cannot score it")


def run_port(args: argparse.Namespace) -> int:
    import torch

    from kvlingua.modules.conditions import load_modules_pool
    from kvlingua.modules.port import meta_prompt_len, port_module
    from kvlingua.modules.prompt import ModuleError, load_module
    from kvlingua.view import model_rotation

    cfg = _config(args)
    pool = load_modules_pool(args.pool or cfg.pool)
    module = load_module(args.module)
    if module.model not in pool.models:
        raise ModuleError(f"{args.module}: module learned on model {module.model!r}, which is not in the pool "
                          f"({sorted(pool.models)})")
    if args.target not in pool.models:
        raise ModuleError(f"--target {args.target!r} is not in the pool ({sorted(pool.models)})")
    fps = {m.name: m.fingerprint for m in pool.members}
    try:
        block = port_module(pool.space, module, pool.models[module.model], args.target,
                            source_fingerprint=fps[module.model], max_prompt_len=meta_prompt_len(pool.meta),
                            target_rotation=model_rotation(pool.models[args.target]))
    except ModuleError as e:
        raise ModuleError(f"{args.module}: {e}") from None
    task = _find_task(pool, cfg, module.task, args.target)  # scored on the target's tokens
    from kvlingua.backend import LocalBackend

    backend = LocalBackend(pool.models)
    with torch.no_grad():
        none = float(backend.suffix_nll(args.target, None, task.held_out[None]).mean())
        ported = float(backend.suffix_nll(args.target, block, task.held_out[None]).mean())
    print(f"{module.task}: {module.model} -> {args.target}: held-out NLL {none:.3f} with no prompt, "
          f"{ported:.3f} after the ported module (p={module.length})")
    return 0


def run_meta(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from experiments.modules.experiment import tracked_meta_training

    cfg = _config(args)
    if args.init:
        cfg = replace(cfg, meta=replace(cfg.meta, init=args.init))
    result = tracked_meta_training(cfg, in_process=args.in_process, workers=args.workers,
                                   progress=not args.no_progress, log=_log)
    print(f"meta-trained pool ({result['init']}, {result['tasks_seen']} tasks seen, final loss "
          f"{result['loss']:.3f}): {result['pool']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from kvlingua.modules.conditions import (
        condition_nll,
        directions,
        gap_recovered,
        load_modules_pool,
        ported_nll,
        prepare,
    )
    from kvlingua.modules.port import meta_prompt_len
    from kvlingua.modules.prompt import ModuleError

    cfg = _config(args)
    pool = load_modules_pool(args.pool or cfg.pool)
    limit = meta_prompt_len(pool.meta)
    if limit is not None and cfg.prompt.length > limit:
        raise ModuleError(f"prompt.length={cfg.prompt.length} is larger than the {limit} virtual tokens this pool "
                          f"was meta-trained for ({pool.root})")
    setup = prepare(cfg, _log, roles=("meta-test",), pool=pool)
    c = cfg.eval_batch
    print("| direction | no prompt | random | direct | ported | gap recovered |\n|---|---|---|---|---|---|")
    for i, j in directions(pool.space.names):
        held = setup.tasks["meta-test"][j]  # the target's own tokens of the held-out verses
        none = float(condition_nll(setup.backend, j, None, held, c).mean())
        rnd = float(condition_nll(setup.backend, j, setup.random_blocks[j], held, c).mean())
        direct = float(condition_nll(setup.backend, j, setup.test_blocks[j], held, c).mean())
        ported = float(ported_nll(pool.space, setup, i, j, c).mean())
        print(f"| {i}->{j} | {none:.3f} | {rnd:.3f} | {direct:.3f} | {ported:.3f} | "
              f"{gap_recovered(ported, rnd, direct):.2f} |")
    return 0


def run_experiment_cmd(args: argparse.Namespace) -> int:
    from experiments.modules.experiment import tracked_experiment

    cfg = _config(args)
    command = "kvlingua modules experiment" + (" --smoke" if args.smoke else "") + \
        ("" if args.smoke or Path(args.config).resolve() == DEFAULT.resolve() else f" {args.config}") + \
        "".join(f" -o {o}" for o in args.override)
    result = tracked_experiment(cfg, command, progress=not args.no_progress, log=_log)
    for path, stats in result["table"].items():
        gaps = ", ".join(f"{c} {s['gap_recovered']:.2f}" for c, s in stats.items() if c.startswith("meta/"))
        print(f"{path}: gap recovered after meta-training: {gaps}")
    print(f"written: {result['files'].get('markdown1', result['files']['markdown'])}")
    return 0
