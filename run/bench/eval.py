"""`just bench eval`: strided-perplexity tokens/s, fgpt vs transformers running Hugging Face's
perplexity guide loop, in one run.

GPT-2 shapes with random weights over random tokens; windows of --n-ctx tokens every
--n-ctx // 2. transformers scores one window a forward, all logits (the guide's loop, its
`labels` loss); fgpt batches windows and runs the LM head on scored positions only. Both
must give the same loss (rel 1e-4), or the comparison is void.
"""

from __future__ import annotations

import argparse

import torch

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.evaluation.perplexity import strided_nll
from fgpt.measure import machine_line, repeat_times, spread
from fgpt.model import init_params
from run._cli import summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench eval", description=summary(__doc__))
    ap.add_argument("--model", default="gpt2", help="config preset for the shapes (default gpt2 = 124M)")
    ap.add_argument("--n-ctx", type=int, default=256, help="window length")
    ap.add_argument("--tokens", type=int, default=1024, help="length of the scored stream")
    ap.add_argument("--batch-size", type=int, default=8, help="fgpt's batched row")
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def hf_guide_nll(hf, tokens: torch.Tensor, n_ctx: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide: transformers' own loss on `labels`, with
    the context tokens masked to -100, weighted by the exact number of targets it scored
    (the model shifts labels left by one). Also the tests' reference."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, len(tokens), stride):
            end = min(begin + n_ctx, len(tokens))
            ids = tokens[None, begin:end]
            labels = ids.clone()
            labels[:, :-(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll, count = nll + float(hf(ids, labels=labels).loss) * n, count + n
            prev_end = end
            if end == len(tokens):
                break
    return nll, count


def main(argv=None) -> None:
    args = parse_args(argv)
    config = GPTConfig.preset(args.model, n_ctx=args.n_ctx)
    params = init_params(config, seed=0)
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx,
                                    n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head))
    hf.transformer.load_state_dict(tree.flatten(params), strict=True)
    hf.eval()
    tokens = torch.randint(0, config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    stride = args.n_ctx // 2

    def fgpt(batch_size):
        total = strided_nll(params, config, tokens.numpy(), n_ctx=args.n_ctx, stride=stride,
                            batch_size=batch_size, progress=False)
        return total.nll, total.tokens

    engines = {"transformers (guide loop, 1 window a forward)": lambda: hf_guide_nll(hf, tokens, args.n_ctx, stride),
               "fgpt, batch 1": lambda: fgpt(1), f"fgpt, batch {args.batch_size}": lambda: fgpt(args.batch_size)}
    results = {name: run() for name, run in engines.items()}
    (ref_nll, ref_n), *others = results.values()
    if any(n != ref_n or abs(nll - ref_nll) > 1e-4 * abs(ref_nll) for nll, n in others):
        raise FgptError(f"fgpt and transformers disagree on the strided loss: {results}")
    # round-robin (the first pass above was the warm-up): load drifting over the run hits every engine alike
    seconds = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, run in engines.items():
            seconds[name] += repeat_times(run, 1, warmup=0)
    times = {name: spread(s) for name, s in seconds.items()}
    ref = times[next(iter(engines))]["median"]
    print(f"strided perplexity, {args.model} shapes, random weights, {args.tokens} tokens, windows of "
          f"{args.n_ctx} every {stride}; losses equal (rel 1e-4): yes")
    print(machine_line())
    print("| engine | tokens/s (median) | min-max s | vs transformers |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {ref_n / t['median']:,.0f} | {t['min']:.2f}-{t['max']:.2f} | {ref / t['median']:.2f}x |")
