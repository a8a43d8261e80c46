"""`just bench profile train|decode|products`: where one step's time goes, op by op.

  train     one eager training step of GPT-2 124M (forward, backward, clip, fused AdamW)
            after two warm-up steps, on the training loop's heap (fgpt/heap.py); --precision
            bf16 (default) or fp32, --batch-size x --seq-len.
  decode    8 greedy decode steps of 124M at batch 1 after a 64-token prefill (KV cache, the
            weights in their measured decode layouts), fp32 or bf16.
  products  the training step's matrix products alone, each shape timed on its own (forward
            x @ W, then dY @ W.T and X.T @ dY per weight), and attention forward + backward
            (the kernel run.train picks for the shape, fgpt/training/attention_kernel.py): a
            floor under any training step at that shape, however well fused, and so the most
            of the 1024^3 matmul rate (`just bench train`'s ceiling) such a step can reach.
The train and decode tables (torch.profiler) list the ops by self CPU time; the first line
gives the share of the matrix products and attention kernels, and how many aten calls the
step made: what an op-fusing compiler or step capture could remove is the rest.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fgpt import GPTConfig, init_params
from fgpt.attention import CAUSAL_KERNELS
from fgpt.heap import keep_freed_memory
from fgpt.inference.generate import decode_layout
from fgpt.inference.kv_cache import KVCache
from fgpt.measure import machine_line
from fgpt.model import forward
from fgpt.training import attention_kernel
from run._cli import summary

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
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
    keep_freed_memory()  # the training loop's heap
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


def product_shapes(config: GPTConfig, tokens: int) -> list[tuple[str, int, int, int, int, bool, bool]]:
    """(name, M, K, N, count, a transposed, b transposed) of every matrix product a @ b of one
    training step over `tokens` rows, with the operands laid out as autograd gets them: per
    block weight W [K, N] (stored so, HF's Conv1D) x @ W, dY @ W.T and X.T @ dY; for the tied
    head (wte [V, d]) x @ wte.T, dY @ wte and dY.T @ X. "Transposed": a view of the other layout."""
    d, qkv = config.n_embd, config.head_dim * (config.n_head + 2 * config.kv_heads)
    blocks = [("attn.c_attn", d, qkv), ("attn.c_proj", d, d), ("mlp.c_fc", d, 4 * d), ("mlp.c_proj", 4 * d, d)]
    rows = [row for name, K, N in blocks for row in (
        (f"{name} x @ W", tokens, K, N, config.n_layer, False, False),
        (f"{name} dY @ W.T", tokens, N, K, config.n_layer, False, True),
        (f"{name} X.T @ dY", K, tokens, N, config.n_layer, True, False))]
    V = config.vocab_size
    return rows + [("head x @ wte.T", tokens, d, V, 1, False, True), ("head dY @ wte", tokens, V, d, 1, False, False),
                   ("head dY.T @ X", V, tokens, d, 1, True, False)]


def profile_products(args) -> None:
    from fgpt.measure import best_time, matmul_flops
    from fgpt.training.metrics import flops_per_token
    config = GPTConfig.preset(args.model)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tokens = args.batch_size * args.seq_len
    gen = torch.Generator().manual_seed(0)

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        shape = (cols, rows) if transposed else (rows, cols)
        t = torch.randn(*shape, generator=gen).to(dtype)
        return t.T if transposed else t
    print(f"{args.precision} training step's matrix products, {args.model}, {args.batch_size} x {args.seq_len}, "
          f"each shape the best of 3\n| product | M x K x N | calls | ms each | GFLOP/s |\n|---|---|---:|---:|---:|")
    total = 0.0
    for name, M, K, N, n, a_t, b_t in product_shapes(config, tokens):
        a, b = operand(M, K, a_t), operand(K, N, b_t)
        seconds = best_time(lambda: a @ b, 3)
        total += n * seconds
        print(f"| {name} | {M} x {K} x {N} | {n} | {seconds * 1e3:.1f} | {2 * M * K * N / seconds / 1e9:.0f} |")
    q_shape, k_shape = attention_kernel.step_shapes(config, args.batch_size, args.seq_len)
    q = torch.randn(q_shape, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(k_shape, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    kernel = attention_kernel.fastest(config, args.batch_size, args.seq_len, dtype, "cpu")  # run.train's pick

    def attention():
        out = CAUSAL_KERNELS[kernel](q, k, v)
        out.backward(torch.ones_like(out))
    seconds = best_time(attention, 3)
    total += config.n_layer * seconds
    print(f"| attention forward + backward ({kernel}) | {' x '.join(map(str, q_shape))} | {config.n_layer} | "
          f"{seconds * 1e3:.1f} | - |")
    step_flops = flops_per_token(config, args.seq_len) * tokens
    ceiling = matmul_flops("cpu", dtype)
    print(f"products + attention: {total:.3f} s per step; the step's {step_flops / 1e12:.3f} TFLOP at the "
          f"1024^3 rate ({ceiling / 1e9:.0f} GFLOP/s) take {step_flops / ceiling:.3f} s: a step made of nothing "
          f"else would reach {step_flops / ceiling / total:.0%} of that ceiling")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="just bench profile", description=summary(__doc__))
    p.add_argument("what", choices=["train", "decode", "products"])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 to train, fp32 to decode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    args.precision = args.precision or ("fp32" if args.what == "decode" else "bf16")
    print(machine_line())
    {"train": profile_train, "decode": profile_decode, "products": profile_products}[args.what](args)


if __name__ == "__main__":
    main()
