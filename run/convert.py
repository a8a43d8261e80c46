"""`python -m run.convert --checkpoint IN (--to-gqa N | --to-safetensors | --to-gguf TYPE) --out OUT`:
turn an MHA checkpoint into a grouped-query one by mean-pooling each group's K/V heads (then
uptrain it with `python -m run.train --init-from OUT`), write a `pytorch_model.bin`
checkpoint's safetensors twin (same tensors, same dtype), or write a plain GPT-2 as a GGUF
file llama.cpp loads (TYPE f32, f16 or q8_0; OUT is the .gguf file)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fgpt.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint
from fgpt.convert import to_gqa
from fgpt.errors import FgptError
from fgpt.gguf_export import TYPES, check_exportable, write_gguf
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
    what.add_argument("--to-gguf", choices=TYPES, metavar="{" + ",".join(TYPES) + "}",
                      help="a GGUF file for llama.cpp's gpt2 architecture, weights in that type")
    ap.add_argument("--out", required=True,
                    help="output directory (model.safetensors + config.json); with --to-gguf the .gguf file")
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
    if args.to_gguf:
        if Path(args.out).exists() and not args.force:
            raise FgptError(f"--out {args.out} exists; give another --out, or --force to overwrite")
        if Path(args.out).is_dir():
            raise FgptError(f"--out {args.out} is a directory; --to-gguf writes one file (e.g. model-{args.to_gguf}.gguf)")
        config, params = load_checkpoint(args.checkpoint)
        check_exportable(config)
        out = write_gguf(args.out, config, params, args.to_gguf, name=Path(args.checkpoint).resolve().stem)
        log.info("wrote %s (GGUF, gpt2, %s; %.1f MB)", out, args.to_gguf, out.stat().st_size / 1e6)
        return
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
