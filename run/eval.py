"""`python -m run.eval`: a checkpoint's strided perplexity on a text, or its multiple-choice accuracy.

    python -m run.eval --checkpoint C --data book.txt [--n-ctx N] [--stride S]
    python -m run.eval --checkpoint C --task mc --data hellaswag_val.jsonl

The last line of stdout is one JSON object: {"loss", "ppl", "tokens", "bits_per_byte"} for
perplexity, {"acc", "acc_norm", "n"} for multiple choice. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from fgpt import tree
from fgpt.checkpoint import load_checkpoint
from fgpt.data import check_text_field
from fgpt.data.sources import JSONL_SUFFIXES, PARQUET_SUFFIX, read_text
from fgpt.data.tokenizer import gpt2_encoding, token_byte_lengths
from fgpt.errors import FgptError, check_at_least
from fgpt.evaluation.multiple_choice import accuracy, read_questions, score_endings
from fgpt.evaluation.perplexity import batches, check_window_flags, model_windows, strided_nll, window_nll
from fgpt.parallel.process_group import resolve_device
from fgpt.tree import FLOAT_DTYPES
from run._cli import ArgumentParser, checkpoint_or_default, main_guard, summary

# single files that are corpora rather than one text (the formats fgpt.data.sources reads as
# records): handed to the data module, which evaluates their validation split as training would
CORPUS_SUFFIXES = (*JSONL_SUFFIXES, PARQUET_SUFFIX)


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.eval", description=summary(__doc__))
    ap.add_argument("--checkpoint", help="a .safetensors or pytorch_model.bin file, a directory or a hub "
                    "name; default: the newest training run under out/")
    ap.add_argument("--task", choices=["ppl", "mc"], default="ppl",
                    help="ppl: strided perplexity (default); mc: multiple choice (HellaSwag layout)")
    ap.add_argument("--data", help="ppl: a text file (scored whole, as one stream) or anything "
                    "run.train --data takes (its validation split; default: the built-in corpus's); "
                    "mc: a JSONL file of {ctx, endings, label}")
    ap.add_argument("--text-field", help="ppl: the JSONL field / Parquet column of --data "
                    "holding the text (default text)")
    ap.add_argument("--n-ctx", type=int, help="ppl: window length (default: the model's n_ctx)")
    ap.add_argument("--stride", type=int, help="ppl: tokens between window starts (default: n_ctx // 2)")
    ap.add_argument("--max-tokens", type=int, help="ppl: score only the first N tokens of the stream")
    ap.add_argument("--limit", type=int, help="mc: score only the first N questions")
    ap.add_argument("--batch-size", type=int, default=8, help="windows (ppl) or endings (mc) per forward")
    ap.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    check_flags(args)
    device = resolve_device(args.device)
    questions = read_questions(args.data, limit=args.limit) if args.task == "mc" else None  # before loading
    path = checkpoint_or_default(args.checkpoint)
    config, params = load_checkpoint(path, dtype=FLOAT_DTYPES[args.dtype], device=device)
    print(f"loaded {path} ({tree.count(params):,} parameters, {args.dtype}, {device})", file=sys.stderr)
    t0 = time.perf_counter()
    if args.task == "mc":
        scores = score_endings(params, config, questions, batch_size=args.batch_size, device=device)
        result = accuracy(questions, scores)
        done = f"{result['n']} question{'s' if result['n'] != 1 else ''}"
    else:
        tokens = load_tokens(args.data, args.text_field or "text")
        if args.max_tokens is not None:
            tokens = tokens[:args.max_tokens]
        announce_cost(params, config, tokens, args, device)
        t0 = time.perf_counter()
        total = strided_nll(params, config, tokens, n_ctx=args.n_ctx, stride=args.stride,
                            batch_size=args.batch_size, byte_lengths=token_byte_lengths(), device=device)
        result = {"loss": total.loss, "ppl": total.ppl, "tokens": total.tokens,
                  "bits_per_byte": total.bits_per_byte}
        done = f"{total.tokens:,} tokens"
    elapsed = time.perf_counter() - t0
    print(f"scored {done} in {elapsed:.1f}s", file=sys.stderr)
    print(json.dumps(result))


def announce_cost(params: dict, config, tokens, args: argparse.Namespace, device) -> None:
    """Before scoring: how many tokens, and about how long, timed on the first batch here."""
    windows = model_windows(config, len(tokens), args.n_ctx, args.stride)
    groups = batches(windows, args.batch_size)
    line = f"scoring {sum(w.end - w.first for w in windows):,} tokens in {len(windows):,} windows"
    if len(groups) > 1:
        t0 = time.perf_counter()
        window_nll(params, config, tokens, groups[0], device)
        estimate = (time.perf_counter() - t0) * len(groups)
        line += f", about {estimate / 60:.1f} min" if estimate >= 60 else f", about {estimate:.0f} s"
        line += " (timed on the first batch here)"
    if args.max_tokens is None:
        line += "; --max-tokens N scores only the first N"
    print(line, file=sys.stderr, flush=True)


def check_flags(args: argparse.Namespace) -> None:
    """Flags of the other task, and values that cannot work, fail before any loading."""
    ppl_only = {"--n-ctx": args.n_ctx, "--stride": args.stride, "--max-tokens": args.max_tokens,
                "--text-field": args.text_field}
    if args.task == "mc":
        given = [flag for flag, value in ppl_only.items() if value is not None]
        if given:
            raise FgptError(f"{', '.join(given)}: only for --task ppl")
        if not args.data:
            raise FgptError("--task mc needs --data FILE.jsonl")
        check_at_least("--limit", args.limit, 1)
    elif args.limit is not None:
        raise FgptError("--limit applies to --task mc only (--max-tokens limits perplexity)")
    check_at_least("--batch-size", args.batch_size, 1)
    check_text_field(args.data, args.text_field)
    check_window_flags(args.n_ctx, args.stride)  # the rest once the model's n_ctx is known
    check_at_least("--max-tokens", args.max_tokens, 2)


def load_tokens(spec: str | None, text_field: str = "text"):
    """A text file -> its tokens as one stream (encode_ordinary: `<|endoftext|>` in the text
    is text). Anything else -> the validation split of what run.train --data would load."""
    if spec is not None and Path(spec).is_file() and not Path(spec).name.endswith(CORPUS_SUFFIXES):
        text = read_text(Path(spec))  # a lone token shard (.bin) is refused here, naming its directory
        return np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.int64)
    from fgpt.data import load_corpus
    return load_corpus(spec, text_field=text_field).val


if __name__ == "__main__":
    main_guard(main)
