"""`just bench profile train|decode`: where one step's time goes, op by op (torch.profiler).

  train   one eager training step of GPT-2 124M (forward, backward, clip, fused AdamW) after
          two warm-up steps; --precision bf16 (default) or fp32, --batch-size x --seq-len.
  decode  8 greedy decode steps of 124M at batch 1 after a 64-token prefill (KV cache, the
          weights in their measured decode layouts), fp32 or bf16.
The table lists the ops by self CPU time; the first line gives the share of the matrix
products and attention kernels, and how many aten calls the step made: what an op-fusing
compiler or step capture could remove is the rest.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fgpt import GPTConfig, init_params
from fgpt.inference.generate import decode_layout
from fgpt.inference.kv_cache import KVCache
from fgpt.measure import machine_line
from fgpt.model import forward
from run._cli import summary

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
           "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def print_profile(prof, label: str, wall: float, steps: int = 1, rows: int = 14) -> None:
    events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in events) or 1
    kernels = sum(t for key, t, _ in events if key in KERNELS)
    calls = sum(n for key, _, n in events if key.startswith("aten::"))
    print(f"{label}: wall {wall:.3f} s; matrix products + attention kernels {kernels / total:.0%} of self CPU; "
          f"{calls // steps} aten calls per step\n| op | self CPU ms | share | calls |\n|---|---:|---:|---:|")
    for key, t, n in sorted(events, key=lambda e: -e[1])[:rows]:
        print(f"| {key} | {t / 1e3:.1f} | {t / total:.1%} | {n} |")


def profile_train(args) -> None:
    from run.bench.train import fgpt_step, make_batches
    config = GPTConfig.preset(args.model)
    step = fgpt_step(config, args.precision, "cpu")
    batches = make_batches(config, args.batch_size, args.seq_len, "cpu", 3)
    step(*batches[0])
    step(*batches[1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(*batches[2])
        wall = time.perf_counter() - start
    print_profile(prof, f"eager {args.precision} training step, {args.model}, {args.batch_size} x {args.seq_len}", wall)


def profile_decode(args) -> None:
    config = GPTConfig.preset(args.model)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    params = decode_layout(init_params(config, seed=0, dtype=dtype))
    cache = KVCache.allocate(config, 1, 128, dtype=dtype, device="cpu", pad=torch.zeros(1, dtype=torch.long))
    token = torch.tensor([[5]])
    with torch.inference_mode():
        forward(params, torch.randint(0, config.vocab_size, (1, 64)), config, cache=cache, last_only=True)
        for _ in range(3):
            forward(params, token, config, cache=cache, last_only=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(8):
                forward(params, token, config, cache=cache, last_only=True)
            wall = (time.perf_counter() - start) / 8
    print_profile(prof, f"{args.precision} decode, {args.model}, batch 1, positions 68-75 (8 steps; wall per step)",
                  wall, steps=8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="just bench profile", description=summary(__doc__))
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 to train, fp32 to decode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.what == "train" else "fp32")
    print(machine_line())
    (profile_train if args.what == "train" else profile_decode)(args)


if __name__ == "__main__":
    main()
