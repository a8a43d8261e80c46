"""`just bench parallel [--model gpt2] [--nproc 2] [--steps 4] [--batch 4] [--seq 256]`:
ddp, fsdp (torch FSDP2) and custom-fsdp, each under its own torchrun launch, on a GPT-2-shaped
model. Per strategy: step time, tokens/s, per-rank peak resident memory during training
(VmHWM, measured), parameter+gradient+optimizer bytes per rank against the ZeRO formula,
and collective volume per step against Ψ (parameter count). Ratios are against fsdp,
measured in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fgpt import GPTConfig, count_params, init_params
from fgpt.errors import FgptError
from fgpt.measure import machine_line
from fgpt.model import param_shapes

STRATEGIES = ("ddp", "fsdp", "custom-fsdp")
PEER = "fsdp"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench parallel")
    ap.add_argument("--model", default="gpt2", help="preset (gpt2 = 124M)")
    ap.add_argument("--n-layer", type=int, help="override the preset's depth (e.g. 6)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    ap.add_argument("--batch", type=int, default=4, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # set on the torchrun side
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nproc < 1 or args.batch % args.nproc:
        raise FgptError(f"--batch {args.batch} must be a positive multiple of --nproc {args.nproc}")
    return args


def config_of(args) -> GPTConfig:
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    return GPTConfig.preset(args.model, **overrides)


# --- measured on each rank ------------------------------------------------------------

def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(strategy) -> int:
    """This rank's parameters + gradients + optimizer state (master copies, not gathers)."""
    total = 0
    for group in strategy.optimizer.param_groups:
        for p in group["params"]:
            total += tensor_bytes(p) + (tensor_bytes(p.grad) if p.grad is not None else 0)
            total += sum(tensor_bytes(v) for v in strategy.optimizer.state.get(p, {}).values()
                         if torch.is_tensor(v) and v.ndim > 0)
    return total


class CommCounter:
    """Collective volume per rank: all-gather output, reduce-scatter input, all-reduce
    twice its buffer (a ring all-reduce is a reduce-scatter plus an all-gather)."""

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self.on = False

    def _count(self, kind, tensor, factor=1):
        if self.on:
            self.bytes[kind] += factor * tensor.numel() * tensor.element_size()

    def install(self, strategy) -> None:
        import fgpt.parallel.custom_fsdp as custom

        def wrap(fn, kind, arg):
            signature = inspect.signature(fn)

            def counted(*a, **kw):
                self._count(kind, list(signature.bind(*a, **kw).arguments.values())[arg])
                return fn(*a, **kw)
            return counted
        for module in (dist, custom):  # FSDP2 calls dist.*_single; custom-fsdp its own names
            for name, kind, arg in (("all_gather_single", "all_gather", 0),
                                    ("all_gather_into_tensor", "all_gather", 0),
                                    ("reduce_scatter_single", "reduce_scatter", 1),
                                    ("reduce_scatter_tensor", "reduce_scatter", 1)):
                if hasattr(module, name):
                    setattr(module, name, wrap(getattr(module, name), kind, arg))
        if strategy.name == "ddp":  # DDP reduces in C++: count its buckets through a comm hook
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self._count("all_reduce", bucket.buffer(), factor=2)
                return allreduce_hook(state, bucket)
            strategy.model.register_comm_hook(None, hook)


def worker(args) -> None:
    from fgpt.parallel import make_strategy

    config = config_of(args)
    baseline_kib = proc_status_kib("VmRSS")
    strategy = make_strategy(args.worker, device="auto")
    params = init_params(config, seed=0)
    strategy.setup(params, config, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), precision=args.precision)
    del params
    gc.collect()
    counter = CommCounter()
    counter.install(strategy)
    micro = args.batch // strategy.world_size
    gen = torch.Generator().manual_seed(strategy.rank)
    times = []
    for step in range(args.steps + 1):
        x = torch.randint(0, config.vocab_size, (micro, args.seq + 1), generator=gen)
        if step == 1:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed set-up memory back first
            reset_peak_rss()
            counter.on = True
        strategy.barrier()
        start = time.perf_counter()
        loss = strategy.forward_backward(x[:, :-1], x[:, 1:], scale=1.0, sync=True)
        strategy.clip_grad_norm(1.0)
        if step == args.steps:  # gradients are live now; step() frees or zeroes them
            state = state_bytes(strategy)
        strategy.step()
        strategy.mean_across_ranks(loss)
        if step >= 1:
            times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times), "peak_rss_kib": proc_status_kib("VmHWM"),
              "baseline_rss_kib": baseline_kib, "state_bytes": state,
              "comm_bytes": {k: v / args.steps for k, v in counter.bytes.items()}}
    Path(args.out, f"{args.worker}.rank{strategy.rank}.json").write_text(json.dumps(result))
    strategy.close()


# --- the table ------------------------------------------------------------------------

def launch(args, strategy: str, out: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "run.bench.parallel", "--worker", strategy, "--out", out, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--precision", args.precision] + (["--n-layer", str(args.n_layer)] if args.n_layer else [])
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once, so
    # resident memory tracks live tensors rather than the allocator's cache.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{strategy} failed (exit {proc.returncode})")


def formula_bytes(strategy: str, psi: int, block_psi: int, n: int) -> int:
    """fp32 weights + grads + AdamW's two moments: 16Ψ replicated (DDP) or 16Ψ/N (ZeRO-3),
    the latter plus one gathered block (4 bytes per block parameter)."""
    return 16 * psi if strategy == "ddp" else 16 * psi // n + 4 * block_psi


def main() -> None:
    args = parse()
    if args.worker:
        return worker(args)
    config = config_of(args)
    psi = count_params(config)
    block_psi = sum(torch.Size(s).numel() for k, s in param_shapes(config).items() if k.startswith("h.0."))
    strategies = args.strategies.split(",")
    if unknown := [s for s in strategies if s not in STRATEGIES]:
        raise FgptError(f"--strategies: unknown {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for name in strategies:
            print(f"running {name} on {args.nproc} ranks ...", file=sys.stderr, flush=True)
            launch(args, name, out)
            ranks = [json.loads(Path(out, f"{name}.rank{r}.json").read_text()) for r in range(args.nproc)]
            rows[name] = {"step_s": max(r["step_s"] for r in ranks),
                          "peak_mib": max(r["peak_rss_kib"] for r in ranks) / 1024,
                          "base_mib": max(r["baseline_rss_kib"] for r in ranks) / 1024,
                          "state": max(r["state_bytes"] for r in ranks),
                          "comm": ranks[0]["comm_bytes"]}
    tokens = args.batch * args.seq
    peer = rows.get(PEER)
    print(f"\n{config.n_layer}-layer GPT-2 shape (Ψ = {psi / 1e6:.1f}M), {args.nproc} ranks, "
          f"{args.batch}x{args.seq} tokens/step, {args.precision}, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU (gloo)'}; {machine_line()}\n")
    print("| strategy | step s | tokens/s | step vs fsdp | peak RSS/rank MiB (baseline) | mem vs fsdp "
          "| param+grad+opt MiB/rank (formula) | all-gather /Ψ | reduce-scatter /Ψ | all-reduce /Ψ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mib = 2 ** 20
    for name, r in rows.items():
        ratio = (lambda k: f"{r[k] / peer[k]:.2f}x") if peer else (lambda k: "-")
        comm = [r["comm"][k] / (4 * psi) for k in ("all_gather", "reduce_scatter", "all_reduce")]
        print(f"| {name} | {r['step_s']:.2f} | {tokens / r['step_s']:.0f} | {ratio('step_s')} "
              f"| {r['peak_mib']:.0f} ({r['base_mib']:.0f}) | {ratio('peak_mib')} "
              f"| {r['state'] / mib:.0f} ({formula_bytes(name, psi, block_psi, args.nproc) / mib:.0f}) | "
              + " | ".join(f"{c:.2f}" for c in comm) + " |")
    print("\ncollective volume per rank per step in units of Ψ fp32 parameters (4Ψ bytes): "
          "ZeRO-3 expects gather Ψ (forward) + Ψ (backward) and reduce-scatter Ψ = 3Ψ; "
          "DDP's all-reduce 2Ψ.")


if __name__ == "__main__":
    from run._cli import main_guard
    main_guard(main)
