"""`python -m run.probe --checkpoint C`: what a trained checkpoint gives up at inference:
context use, a sliding window, fewer K/V heads (with uptraining and a control), rotary
positions past n_ctx, and samples of each setting; writes OUT/results.json, OUT/probe.md
and figures.

    python -m run.probe --checkpoint gpt2/ --data book.txt --out probe/ [--settings context,window]
        [--windows 32,64,128] [--uptrain-steps 20] [--max-tokens 8192]

Evaluation text: as run.eval's (a text file is scored whole; anything else gives its
validation split; default: the built-in corpus). The GQA section scores the validation split
of --data and uptrains on its training split. An estimate of the time is printed first.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from fgpt.checkpoint import load_checkpoint
from fgpt.evaluation.probe import SETTINGS, ProbeOptions, check_model, check_options, run_probe
from fgpt.evaluation.probe_report import write_outputs
from run._cli import ArgumentParser, checkpoint_or_default, main_guard, summary
from run.eval import load_tokens


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    d = ProbeOptions()
    ap = ArgumentParser(prog="python -m run.probe", description=summary(__doc__))
    ap.add_argument("--checkpoint", help="a checkpoint file or directory (default: the newest training run under out/)")
    ap.add_argument("--data", help="evaluation text: a text file, or anything run.train --data takes "
                    "(default: the built-in corpus)")
    ap.add_argument("--out", default="probe", help="output directory (default probe/)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"sections to run (default {','.join(SETTINGS)})")
    ap.add_argument("--windows", type=int_list, help="window sizes (default 32, 64, ... below n_ctx, and n_ctx)")
    ap.add_argument("--uptrain-steps", type=int, default=d.uptrain_steps,
                    help=f"GQA uptraining steps, for every converted model and the control (default {d.uptrain_steps}; 0: none)")
    ap.add_argument("--uptrain-batch", type=int, default=d.uptrain_batch, help="sequences per uptraining step")
    ap.add_argument("--uptrain-seq", type=int, help="tokens per uptraining sequence (default min(256, n_ctx))")
    ap.add_argument("--uptrain-lr", type=float, default=d.uptrain_lr, help=f"uptraining lr (default {d.uptrain_lr:g})")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens,
                    help=f"evaluate the first N tokens of the text (default {d.max_tokens})")
    ap.add_argument("--stride", type=int, help="strided evaluation: tokens between windows (default n_ctx // 2)")
    ap.add_argument("--context-targets", type=int, default=d.context_targets,
                    help=f"targets of the context-use curve (default {d.context_targets})")
    ap.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="new tokens per decode timing")
    ap.add_argument("--decode-runs", type=int, default=d.decode_runs, help="timed decode runs per setting")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="evaluation windows per forward")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    opts = ProbeOptions(settings=tuple(s.strip() for s in args.settings.split(",") if s.strip()),
                        windows=args.windows, uptrain_steps=args.uptrain_steps, uptrain_batch=args.uptrain_batch,
                        uptrain_seq=args.uptrain_seq, uptrain_lr=args.uptrain_lr, max_tokens=args.max_tokens,
                        stride=args.stride, context_targets=args.context_targets,
                        decode_tokens=args.decode_tokens, decode_runs=args.decode_runs,
                        batch_size=args.batch_size, seed=args.seed)
    check_options(opts)
    path = checkpoint_or_default(args.checkpoint)
    config, params = load_checkpoint(path)
    check_model(opts, config)  # before any text is read
    tokens = load_tokens(args.data)
    gqa_tokens = train_tokens = None
    if "gqa" in opts.settings:
        from fgpt.data import load_corpus
        corpus = load_corpus(args.data, progress=False)
        gqa_tokens, train_tokens = np.asarray(corpus.val[:opts.max_tokens]), corpus.train
    results = run_probe(config, params, tokens, opts, gqa_tokens=gqa_tokens, train_tokens=train_tokens,
                        checkpoint=str(path), data=args.data or "", progress=not args.no_progress)
    out = write_outputs(results, args.out)
    print(f"wrote {out / 'probe.md'} and {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
