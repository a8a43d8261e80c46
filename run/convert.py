"""`python -m run.convert --checkpoint IN (--to-gqa N | --to-safetensors) --out OUT`: turn an
MHA checkpoint into a grouped-query one by mean-pooling each group's K/V heads (then uptrain
it with `python -m run.train --init-from OUT`), or write a `pytorch_model.bin` checkpoint's
safetensors twin (same tensors, same dtype)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fgpt.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint
from fgpt.convert import to_gqa
from fgpt.errors import FgptError
from fgpt.outdir import check_not_source
from run._cli import ArgumentParser, main_guard, summary

log = logging.getLogger("run.convert")


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.convert", description=summary(__doc__))
    ap.add_argument("--checkpoint", required=True,
                    help="a .safetensors or pytorch_model.bin file, or a directory holding one")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--to-gqa", type=int, metavar="N", help="number of kv heads to keep")
    what.add_argument("--to-safetensors", action="store_true",
                      help="rewrite the weights as model.safetensors, unchanged")
    ap.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    ap.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    return ap.parse_args(argv)


def check_out(out: str, force: bool) -> None:
    """Refuse to write over a checkpoint unless told to (never over the input: main checks)."""
    there = [f for f in (WEIGHTS, CONFIG) if (Path(out) / f).exists()]
    if there and not force:
        raise FgptError(f"--out {out} already holds {' and '.join(there)}; give another --out, "
                        "or --force to overwrite")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    check_not_source("--out", args.out, {"--checkpoint": args.checkpoint})
    check_out(args.out, args.force)
    config, params = load_checkpoint(args.checkpoint)
    if args.to_safetensors:
        out = save_checkpoint(args.out, config, params)
        log.info("wrote %s (%s)", out, "model.safetensors + config.json")
        return
    new_config, new_params = to_gqa(config, params, args.to_gqa)
    out = save_checkpoint(args.out, new_config, new_params)
    log.info("pooled %d kv heads into %d (n_head=%d): wrote %s", config.kv_heads, args.to_gqa,
             config.n_head, out)


if __name__ == "__main__":
    main_guard(main)
