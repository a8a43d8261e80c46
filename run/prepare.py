"""`python -m run.prepare --data SRC --out DIR`: tokenise a corpus into token shards.

SRC is a text file, a directory (every file below it) or a glob; `.jsonl` / `.jsonl.gz` files
hold one document per line (`--text-field`), `.parquet` files one per row (needs
`pip install 'fgpt[data]'`), any other file is one document of UTF-8 text. DIR receives
`train_*.bin` / `val_*.bin` shards and `manifest.json`; train on it with
`python -m run.train --data DIR`. Prints DIR on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fgpt.data.pipeline import SHARD_TOKENS, VAL_FRACTION, prepare
from fgpt.data.sources import list_files
from fgpt.errors import check_at_least
from fgpt.outdir import check_not_source, exclusive
from run._cli import ArgumentParser, main_guard, summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.prepare", description=summary(__doc__))
    ap.add_argument("--data", required=True, help="text / JSONL / Parquet file, directory or glob")
    ap.add_argument("--out", required=True, help="the prepared directory to write (must not exist)")
    ap.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text (text)")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser threads (default: all cores)")
    split = ap.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                       help=f"share of documents held out for validation, by a hash of each document's name ({VAL_FRACTION})")
    split.add_argument("--val", metavar="SRC", help="validation documents from another source instead")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard file ({SHARD_TOKENS:,})")
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new one is complete)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_at_least("--shard-tokens", args.shard_tokens, 1)
    check_at_least("--workers", args.workers, 1)
    check_not_source("--out", args.out, {"--data": args.data, "--val": args.val})
    out = Path(args.out)
    with exclusive(out.parent / f".{out.name}.lock", what=f"--out {args.out}"):
        prepare_locked(args)


def prepare_locked(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    files = list_files(args.data)
    val_files = list_files(args.val, "--val") if args.val else None
    manifest = prepare(files, Path(args.out), val_files=val_files, val_fraction=args.val_fraction,
                       text_field=args.text_field, workers=args.workers, shard_tokens=args.shard_tokens,
                       progress=not args.quiet, description=args.data, val_description=args.val,
                       force=args.force)
    seconds = time.perf_counter() - start
    mb = sum(f.size for f in files + (val_files or [])) / 1e6
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    shards = lambda split: f"{len(split['shards'])} shard{'' if len(split['shards']) == 1 else 's'}"  # noqa: E731
    print(f"prepared {args.out}: train {train['tokens']:,} tokens in {shards(train)}, "
          f"val {val['tokens']:,} in {shards(val)} ({manifest['split_by']} split); "
          f"{manifest['documents']:,} documents, {mb:.3g} MB in {seconds:.1f} s ({mb / seconds:.3g} MB/s)",
          file=sys.stderr)
    print(args.out)


if __name__ == "__main__":
    main_guard(main)
