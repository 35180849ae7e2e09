"""The ``kvlingua`` command line: one subcommand per module in ``orchestrator.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). Imports are lazy
enough that ``kvlingua --help`` stays fast and nothing runs at import time.

Every known failure (a :class:`kvlingua.config.KvlinguaError`, or a missing file) ends the
command with one line on stderr, ``kvlingua <command>: error: <file>: <what is wrong>``, and
exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from kvlingua.config import KvlinguaError

COMMANDS = ("quickstart", "data", "fetch", "pretrain", "train", "eval", "tune", "serve", "plan", "paper", "modules", "real-model")


def _module(command: str) -> str:
    """The module of a command: ``real-model`` lives in ``orchestrator/commands/real_model.py``."""
    return command.replace("-", "_")


def _available(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(f"orchestrator.commands.{_module(name)}") is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlingua",
        description="Teach a pool of frozen LMs to read each other's KV caches through a shared latent space.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in filter(_available, COMMANDS):
        importlib.import_module(f"orchestrator.commands.{_module(name)}").register(sub)
    return parser


def error_line(command: str, error: BaseException) -> str:
    """``kvlingua <command>: error: <message>``, the message's lines joined into one."""
    message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"kvlingua {command}: error: {message or type(error).__name__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KvlinguaError, FileNotFoundError) as e:
        print(error_line(args.command, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
