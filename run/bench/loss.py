"""`just bench loss [--rounds N] [--tokens N,N,...]`: the LM head's loss on this machine.

fgpt's chunked linear cross-entropy (fgpt/cross_entropy.py: the gradients made chunk by
chunk in the forward, no [tokens, V] logits) against F.cross_entropy over the full logits:
  1. the head alone, forward + backward at GPT-2 124M's shapes (d 768, V 50257), fp32,
     for several token counts: time and peak memory;
  2. a whole GPT-2 124M fp32 training step (8 x 512 tokens: forward, backward, clip,
     fused AdamW) with each loss: time and peak memory.
Up to one chunk of rows (1335 at this vocabulary) fgpt calls F.cross_entropy itself, so
the token counts start past it.
Every measurement runs in a child process of its own (fgpt.measure.in_child), the two
losses alternating round by round; times are the best of the rounds, memory the resident
set's peak growth during one call after a warm-up.
"""

from __future__ import annotations

import argparse

import torch

from fgpt import GPTConfig, model
from fgpt.cross_entropy import linear_cross_entropy, reference_cross_entropy
from fgpt.heap import release_freed_memory
from fgpt.measure import in_child, machine_line, peak_rss_growth, repeat_times
from run._cli import summary
from run.bench import loss as bench_loss  # this module by its import name, for the child processes

LOSSES = {"F.cross_entropy": reference_cross_entropy, "fgpt": linear_cross_entropy}
MiB = 2 ** 20


def measured(run, repeats: int) -> dict:
    run()  # warm-up
    release_freed_memory()
    grew = peak_rss_growth(run)
    return {"s": min(repeat_times(run, repeats, warmup=0)), "mib": grew / MiB}


def head(loss: str, tokens: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 768, generator=gen).requires_grad_()
    w = (torch.randn(50257, 768, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, 50257, (tokens,), generator=gen)
    return measured(lambda: torch.autograd.grad(LOSSES[loss](x, w, t), (x, w)), repeats)


def step(loss: str, repeats: int) -> dict:
    from run.bench.train import fgpt_step
    model.linear_cross_entropy = LOSSES[loss]  # this child process's head_loss uses that loss
    config = GPTConfig.preset("gpt2")
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, config.vocab_size, (8, 512), generator=gen) for _ in range(2))
    run = fgpt_step(config, "fp32", "cpu")
    return measured(lambda: run(x, y), repeats)


def alternating(function: str, rounds: int, *args) -> dict[str, dict]:
    """Each loss in its own child, alternating, `rounds` times: the best time, the last memory."""
    best = {}
    for _ in range(rounds):
        for loss in LOSSES:
            r = in_child(bench_loss, function, loss, *args)
            best[loss] = {"s": min(r["s"], best.get(loss, r)["s"]), "mib": r["mib"]}
    return best


def row(label: str, r: dict[str, dict]) -> str:
    ref, ours = r["F.cross_entropy"], r["fgpt"]
    return (f"| {label} | {ref['s'] * 1e3:,.0f} | {ours['s'] * 1e3:,.0f} | {ref['s'] / ours['s']:.2f}x "
            f"| {ref['mib']:,.0f} | {ours['mib']:,.0f} | {ref['mib'] / max(ours['mib'], 1):.1f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="just bench loss", description=summary(__doc__))
    p.add_argument("--rounds", type=int, default=2, help="child processes per loss and measurement")
    p.add_argument("--tokens", default="2048,4096,8192", help="token counts of the head-alone table")
    p.add_argument("--no-step", action="store_true", help="leave out the 124M training step")
    args = p.parse_args(argv)
    tokens = [int(n) for n in args.tokens.split(",")]
    print(machine_line())
    header = ("| {} | F.cross_entropy ms | fgpt ms | time: F.ce / fgpt | F.cross_entropy peak MiB | fgpt peak MiB "
              "| memory: F.ce / fgpt |\n|---|---:|---:|---:|---:|---:|---:|")
    print("\n1. the head's loss alone, forward + backward, d 768, V 50257, fp32\n")
    print(header.format("tokens"))
    for n in tokens:
        print(row(f"{n:,}", alternating("head", args.rounds, n, 3)), flush=True)
    if not args.no_step:
        print("\n2. a GPT-2 124M fp32 training step, 8 x 512 tokens\n")
        print(header.format("step"))
        print(row("124M, 8 x 512", alternating("step", args.rounds, 2)))


if __name__ == "__main__":
    main()
