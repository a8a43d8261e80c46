"""`python -m run.convert --checkpoint IN --to-gqa N --out OUT`: turn an MHA checkpoint into
a grouped-query one by mean-pooling each group's K/V heads (then uptrain it with
`python -m run.train --init-from OUT`)."""

from __future__ import annotations

import argparse
import logging
import sys

from fgpt.checkpoint import load_checkpoint, save_checkpoint
from fgpt.convert import to_gqa
from run._cli import main_guard

log = logging.getLogger("run.convert")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m run.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a .safetensors file or a directory holding one")
    ap.add_argument("--to-gqa", type=int, required=True, metavar="N", help="number of kv heads to keep")
    ap.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config, params = load_checkpoint(args.checkpoint)
    new_config, new_params = to_gqa(config, params, args.to_gqa)
    out = save_checkpoint(args.out, new_config, new_params)
    log.info("pooled %d kv heads into %d (n_head=%d): wrote %s", config.kv_heads, args.to_gqa,
             config.n_head, out)


if __name__ == "__main__":
    main_guard(main)
