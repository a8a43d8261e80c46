"""`python -m run.generate`: sample a continuation of a prompt from a checkpoint.

stdout carries only the text (prompt + continuation, decoded from the whole token
sequence); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import sys
import time

import torch

from fgpt import tree
from fgpt.attention import WINDOW_KERNELS
from fgpt.checkpoint import load_checkpoint
from fgpt.data.tokenizer import EOT, gpt2_encoding
from fgpt.errors import FgptError, check_at_least
from fgpt.inference import int8
from fgpt.inference.batched import batched_layout
from fgpt.inference.generate import Sampling, STOPPED, check_length, decode_layout, generate, stream
from fgpt.tree import FLOAT_DTYPES
from run._cli import ArgumentParser, checkpoint_or_default, main_guard, summary



def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.generate", description=summary(__doc__))
    ap.add_argument("--checkpoint", help="a .safetensors file, a directory (HF layout or a training "
                    "output) or a hub name like gpt2; default: the newest training run under out/")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample (default 100)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    ap.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    ap.add_argument("--dtype", choices=[*FLOAT_DTYPES, "int8"], default="float32")
    ap.add_argument("--allow-past-ctx", action="store_true",
                    help="rotary models: generate past n_ctx (an extrapolation experiment)")
    ap.add_argument("--window-kernel", choices=WINDOW_KERNELS, default="band",
                    help="prefill of windowed layers: band (plain, O(T·W)), flex (compiled flex_attention) or dense (a T² mask)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    sample_and_print(parse_args(argv))


def sample_and_print(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)  # validates before any loading
    check_at_least("--max-new-tokens", args.max_new_tokens, 0)
    check_at_least("--num-samples", args.num_samples, 1)
    if args.seed is not None and not 0 <= args.seed < 2 ** 63 - args.num_samples:  # sample i uses seed + i
        raise FgptError(f"--seed must be in [0, 2**63 - --num-samples), got {args.seed}")
    enc = gpt2_encoding()
    prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if not prompt:
        raise FgptError("empty prompt: give at least one token")
    path = checkpoint_or_default(args.checkpoint)
    t0 = time.perf_counter()
    # int8: weight-only (fgpt/inference/int8.py), loaded in fp32 then quantized; activations stay fp32
    config, params = load_checkpoint(path, dtype=FLOAT_DTYPES.get(args.dtype, torch.float32))
    if config.vocab_size < enc.n_vocab:
        raise FgptError(f"{path}: vocabulary of {config.vocab_size} is smaller than GPT-2's {enc.n_vocab}")
    check_length(config, len(prompt), args.max_new_tokens, args.allow_past_ctx)
    n_params = tree.count(params)
    if args.dtype == "int8":
        params = int8.quantize(params)
    params = decode_layout(params)
    if args.num_samples > 1 and not args.stream:  # the samples decode together, one row each
        params = batched_layout(params, args.num_samples)
    print(f"loaded {path} ({n_params:,} parameters, {args.dtype}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)

    # a vocabulary padded past GPT-2's (50304 is common) must not sample ids it cannot decode
    options = dict(sampling=sampling, ignore_eos=args.ignore_eos, allow_past_ctx=args.allow_past_ctx,
                   vocab_limit=enc.n_vocab, window_kernel=args.window_kernel)
    t0, n_new = time.perf_counter(), 0
    if args.stream:  # samples one after another, each printed as it grows
        for i in range(args.num_samples):
            seed = None if args.seed is None else args.seed + i
            steps = stream(params, config, [prompt], args.max_new_tokens, seed=seed, **options)
            n_new += print_streaming(enc, prompt, steps, ignore_eos=args.ignore_eos, separator=i > 0)
    else:
        rows = generate(params, config, [prompt], args.max_new_tokens, seed=args.seed,
                        num_samples=args.num_samples, **options)
        for i, row in enumerate(rows):
            n_new += len(row) - len(prompt)
            print(("\n" if i else "") + enc.decode(row))
    elapsed = time.perf_counter() - t0
    print(f"{n_new} new tokens in {elapsed:.1f}s ({n_new / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)


def print_streaming(enc, prompt: list[int], steps, *, ignore_eos: bool, separator: bool) -> int:
    """Print the prompt, then each new token as it arrives. An incremental UTF-8 decoder
    holds back partial characters, so the text equals decoding the whole sequence."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    out.write(("\n" if separator else "") + utf8.decode(enc.decode_bytes(prompt)))
    n = 0
    for new in steps:
        t = int(new[0])
        if t == STOPPED or (t == EOT and not ignore_eos):
            break
        out.write(utf8.decode(enc.decode_single_token_bytes(t)))
        out.flush()
        n += 1
    out.write(utf8.decode(b"", final=True) + "\n")
    out.flush()
    return n


if __name__ == "__main__":
    main_guard(main)
