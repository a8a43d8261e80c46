"""`just bench train`: training tokens/s, fgpt vs transformers' GPT2LMHeadModel, measured in
the same run on the same batches, and each contender's peak memory.

A step is forward + backward + global-norm clip + AdamW. Contenders run in interleaved
rounds (one step each per round) so that machine noise hits them alike; the table shows the
median step time per contender and its speed relative to transformers in fp32 (or to the
first contender, where --only leaves transformers fp32 out). The memory column is the
resident set's peak growth during one step after a warm-up (activations, gradients and
temporaries: not the weights or AdamW's state), measured in a child process per contender
(fgpt.measure.in_child). The `recompute` rows are fgpt with --recompute attention / full;
"fgpt bf16" runs full causal attention with the kernel run.train measures for the step's
shape (fgpt/training/attention_kernel.py), "fgpt bf16 SDPA attention" with SDPA's always.
All timed contenders share one heap: by default the one fgpt's training loop sets (freed
memory kept for reuse, fgpt/heap.py); `--heap glibc` leaves glibc's default (large blocks
mapped and unmapped every step), as a transformers script runs unless it sets this itself.
Memory is measured in child processes that hand freed memory back, whatever --heap says.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fgpt import GPTConfig, init_params
from fgpt.attention import use_causal_kernel
from fgpt.heap import HEAPS, keep_freed_memory, release_freed_memory
from fgpt.measure import in_child, machine_line, matmul_flops, peak_rss_growth
from fgpt.parallel.base import adamw_param_groups
from fgpt.parallel.single import SingleDevice
from fgpt.training import attention_kernel
from fgpt.training.metrics import flops_per_token
from fgpt.tree import COMPUTE_DTYPES
from run.bench import train as bench_train  # this module by its import name, for the child processes

OPT = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))


def fgpt_step(config: GPTConfig, precision: str, device: str, compile: bool = False, recompute: str = "none",
              window_kernel: str = "band", attention: str = "auto"):
    """`attention`: the kernel of full causal layers, "auto" (run.train's measured choice) or
    one of fgpt.attention.CAUSAL_KERNELS; set again before every step, since the contenders
    of one process take turns."""
    strategy = SingleDevice(device, compile=compile, recompute=recompute, window_kernel=window_kernel)
    strategy.setup(init_params(config, seed=0), config, precision=precision, **OPT)
    dtype, kernels = COMPUTE_DTYPES[precision], {}

    def step(x, y):
        if x.shape not in kernels:
            kernels[x.shape] = attention if attention != "auto" else \
                attention_kernel.fastest(config, *x.shape, dtype, device)
        use_causal_kernel(attention_kernel.step_key(config, *x.shape, dtype, device), kernels[x.shape])
        strategy.forward_backward(x, y, scale=1.0, sync=True)
        strategy.clip_grad_norm(1.0)
        strategy.step()
    return step


def hf_model(config: GPTConfig, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx, n_layer=config.n_layer,
                                    n_head=config.n_head, n_embd=config.n_embd,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return hf.to(device).train()


def hf_step(hf, *, autocast: bool, fused: bool, compile: bool = False):
    """A plain transformers training step; the contenders share one model (timing only)."""
    device = hf.device.type
    named = dict(hf.named_parameters())
    opt = torch.optim.AdamW(adamw_param_groups(named, OPT["weight_decay"]), lr=OPT["lr"],
                            betas=OPT["betas"], fused=fused or None)
    model = torch.compile(hf) if compile else hf

    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def builders(config: GPTConfig, dev: str, compile: bool) -> dict:
    """Contender name -> a function building its step(x, y)."""
    hf = {}

    def shared_hf():  # the transformers contenders share one model (timing only)
        hf.setdefault("model", hf_model(config, dev))
        return hf["model"]
    out = {
        "transformers fp32": lambda: hf_step(shared_hf(), autocast=False, fused=False),
        "transformers fp32 fused AdamW": lambda: hf_step(shared_hf(), autocast=False, fused=True),
        "transformers bf16 autocast": lambda: hf_step(shared_hf(), autocast=True, fused=False),
        "fgpt fp32": lambda: fgpt_step(config, "fp32", dev),
        "fgpt bf16": lambda: fgpt_step(config, "bf16", dev),
        "fgpt bf16 SDPA attention": lambda: fgpt_step(config, "bf16", dev, attention="sdpa"),
        "fgpt bf16 recompute attention": lambda: fgpt_step(config, "bf16", dev, recompute="attention"),
        "fgpt bf16 recompute full": lambda: fgpt_step(config, "bf16", dev, recompute="full"),
    }
    if compile:
        out["transformers fp32 compiled"] = lambda: hf_step(shared_hf(), autocast=False, fused=True, compile=True)
        out["fgpt fp32 compiled"] = lambda: fgpt_step(config, "fp32", dev, compile=True)
        out["fgpt bf16 compiled"] = lambda: fgpt_step(config, "bf16", dev, compile=True)
    return out


def make_batches(config: GPTConfig, B: int, T: int, dev: str, n: int) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, config.vocab_size, (B, T), generator=gen).to(dev),
             torch.randint(0, config.vocab_size, (B, T), generator=gen).to(dev)) for _ in range(n)]


def bench_config(model: str, T: int) -> GPTConfig:
    """The preset, its context stretched to T where T is longer (learned positions: a longer wpe)."""
    config = GPTConfig.preset(model)
    return config.replace(n_ctx=T) if T > config.n_ctx else config


def step_memory(model: str, B: int, T: int, dev: str, name: str) -> int:
    """In a child process: bytes the memory grew by at its peak during one step of contender
    `name`, after a warm-up step (so AdamW's state and the allocator's pools exist)."""
    config = bench_config(model, T)
    step = builders(config, dev, compile="compiled" in name)[name]()
    (x0, y0), (x1, y1) = make_batches(config, B, T, dev, 2)
    step(x0, y0)
    release_freed_memory()
    return peak_rss_growth(lambda: step(x1, y1), device=dev)


def recompute_step(model: str, B: int, T: int, dev: str, precision: str, mode: str) -> dict:
    """In a child process: one forward + backward of fgpt's single-device loss (torch.func.vjp,
    then its pullback, as SingleDevice does) with --recompute `mode` on a fresh model: the
    seconds, the bytes the forward leaves held for backward (the activations kept), the
    peak growth over both, and the gradient tree's bytes (part of that peak). CPU only."""
    from torch.func import vjp
    from fgpt import tree
    from fgpt.measure import status_bytes
    config = bench_config(model, T)
    strategy = SingleDevice(dev, recompute=mode)
    strategy.setup(init_params(config, seed=0), config, precision=precision, **OPT)
    ((x, y),) = make_batches(config, B, T, dev, 1)
    params = strategy._compute_params()
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := now
    base = status_bytes("VmRSS")
    start = time.perf_counter()
    value, pullback = vjp(lambda p: strategy._loss(p, x, y), params)
    kept = status_bytes("VmRSS") - base
    with torch.no_grad():
        (grads,) = pullback(torch.ones_like(value), retain_graph=False)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM") - base
    return {"s": seconds, "kept": kept, "bytes": peak,
            "grad_bytes": sum(g.numel() * g.element_size() for g in tree.leaves(grads))}


def recompute_times(args, modes) -> dict[str, float]:
    """Seconds of one forward + backward per mode: the modes' models side by side in this
    process, interleaved round by round (load that drifts hits them alike), the best of
    `--rounds` (the first round also warms up)."""
    config = bench_config(args.model, args.seq_len)
    strategies = {}
    for mode in modes:
        strategies[mode] = SingleDevice(args.device, recompute=mode)
        strategies[mode].setup(init_params(config, seed=0), config, precision=args.precision, **OPT)
    ((x, y),) = make_batches(config, args.batch_size, args.seq_len, args.device, 1)
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(args.rounds):
        for mode, strategy in strategies.items():
            start = time.perf_counter()
            strategy.forward_backward(x, y, scale=1.0, sync=True)
            best[mode] = min(best[mode], time.perf_counter() - start)
            strategy.optimizer.zero_grad(set_to_none=True)
    return best


def recompute_table(args) -> None:
    """--recompute-memory: none / attention / full; memory each in its own child process,
    time interleaved in this one (recompute_times)."""
    modes = ("none", "attention", "full")
    best = {mode: in_child(bench_train, "recompute_step", args.model, args.batch_size, args.seq_len, args.device,
                           args.precision, mode) for mode in modes}
    for mode, seconds in recompute_times(args, modes).items():
        best[mode]["s"] = seconds
    print(f"--recompute, fgpt single device, {args.model} at n_ctx {args.seq_len}, batch {args.batch_size}, "
          f"{args.precision}: memory of one forward + backward in a child process per mode; time the best of "
          f"{args.rounds} interleaved rounds in one process; {machine_line()}")
    grads = best["none"]["grad_bytes"] / 2 ** 20
    print(f"kept: what the forward leaves held for backward; peak: the resident set's growth over forward + "
          f"backward, which includes the {grads:,.0f} MiB {args.precision} gradient tree; peak - grads: without it")
    print("| --recompute | s fwd+bwd | vs none | kept MiB | of none's | peak MiB | of none's | peak - grads MiB "
          "| of none's |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = best["none"]
    act = {m: r["bytes"] - r["grad_bytes"] for m, r in best.items()}
    for mode in modes:
        r = best[mode]
        print(f"| {mode} | {r['s']:.1f} | {r['s'] / ref['s']:.2f}x | {r['kept'] / 2 ** 20:,.0f} | "
              f"{r['kept'] / ref['kept']:.0%} | {r['bytes'] / 2 ** 20:,.0f} | {r['bytes'] / ref['bytes']:.0%} | "
              f"{act[mode] / 2 ** 20:,.0f} | {act[mode] / act['none']:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(prog="just bench train")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per contender")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="comma list of contender names to run")
    p.add_argument("--compile", action="store_true",
                   help="also under torch.compile: fp32 fgpt and transformers, bf16 fgpt (compile time apart)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="leave out the memory column (one more child process and two steps per contender)")
    p.add_argument("--recompute-memory", action="store_true",
                   help="instead: fgpt's forward + backward with --recompute none / attention / full, "
                   "time and peak memory, each in a child process")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="for --recompute-memory")
    p.add_argument("--heap", default="kept", choices=HEAPS,
                   help="kept: freed memory stays for reuse, as in fgpt's training loop (default); "
                   "glibc: glibc's default, large blocks mapped afresh every step")
    args = p.parse_args()
    if args.heap == "kept":
        keep_freed_memory()
    if args.recompute_memory:
        return recompute_table(args)
    B, T, dev = args.batch_size, args.seq_len, args.device
    config = bench_config(args.model, T)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    chosen = builders(config, dev, args.compile)
    if args.only:
        keep = args.only.split(",")
        unknown = [k for k in keep if k not in chosen]
        if unknown:
            p.error(f"unknown contender {unknown[0]!r}; choose from {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in keep}
    batches = make_batches(config, B, T, dev, args.rounds + 1)
    steps = {name: build() for name, build in chosen.items()}
    first: dict[str, float] = {}
    for name, step in steps.items():  # warm-up: allocator, kernels, optimizer state, compile
        start = time.perf_counter()
        step(*batches[0])
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    for x, y in batches[1:]:
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step(x, y)
            sync()
            times[name].append(time.perf_counter() - start)
    del steps
    memory = {name: in_child(bench_train, "step_memory", args.model, B, T, dev, name) / 2 ** 20
              for name in times} if args.memory else {}

    ceiling = {name: matmul_flops(dev, dtype) for name, dtype in COMPUTE_DTYPES.items()
               if any(name in contender for contender in times)}
    print(f"training step, {args.model} ({B} x {T} tokens), {dev}, median of {args.rounds} interleaved rounds, "
          f"{args.heap} heap; {machine_line()}")
    print("matmul ceiling (one 1024^3 matmul): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceiling.items()))
    ref_name = "transformers fp32" if "transformers fp32" in times else next(iter(times))
    ref = statistics.median(times[ref_name])
    flops = flops_per_token(config, T) * B * T  # per step: 6N + attention (PaLM's count)
    vs = f"vs {ref_name}"
    print(f"| {'contender':<30} | {'s/step':>7} | {'tokens/s':>9} | {vs:>20} | "
          f"{'of its matmul ceiling':>21} | {'peak MiB':>8} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 11}|{'-' * (max(20, len(vs)) + 2)}|{'-' * 23}|{'-' * 10}|")
    for name, ts in times.items():
        t = statistics.median(ts)
        of_ceiling = flops / t / ceiling["bf16" if "bf16" in name else "fp32"]
        mib = f"{memory[name]:8,.0f}" if name in memory else f"{'-':>8}"
        print(f"| {name:<30} | {t:7.3f} | {B * T / t:9.0f} | {ref / t:19.2f}x | {of_ceiling:20.0%} | {mib} |")
    if memory:
        print("peak MiB: the resident set's growth during one step after a warm-up, in a child process "
              "(activations, gradients, temporaries; not weights or AdamW state)")
    for name in times:
        if "compiled" in name:
            print(f"{name}: first step (compiles) {first[name]:.1f} s, not in the table")
