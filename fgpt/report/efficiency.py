"""Efficiency measurements of the variants: KV-cache bytes, decode speed beside a
bytes-read model, the window kernel's time and memory against sequence length (forward and
forward + backward, against torch's flash causal kernel and a dense mask), and training step
time and memory at long T. Timing and memory come from fgpt.measure, as in the benchmarks.

Memory is measured in a child process (fgpt.measure.in_child), so that its resident set
tracks live tensors and one measurement cannot inherit another's. On a CUDA `device` the
times are CUDA events and the memory torch.cuda's peak allocation (fgpt.measure).
"""

from __future__ import annotations

import torch

from fgpt.attention import causal_attention, dense_window_attention, sliding_window_attention
from fgpt.config import GPTConfig
from fgpt.inference.kv_cache import KVCache
from fgpt.heap import release_freed_memory
from fgpt.measure import peak_rss_growth, repeat_times, spread
from fgpt.model import count_params, forward, init_params
from fgpt.parallel import make_strategy
from fgpt.training.train import optimizer_step
from fgpt.tree import tree_map

MiB = 2 ** 20


# --- KV cache -----------------------------------------------------------------------------

def kv_cache_bytes(config: GPTConfig, context: int, batch: int = 1) -> int:
    """Bytes fgpt's KV cache allocates (fp32) for `context` tokens: measured on the real
    allocation, on the meta device so 64k-token caches cost no memory."""
    return KVCache.allocate(config, batch, context, device="meta").nbytes()


def kv_cache_formula(config: GPTConfig, context: int, batch: int = 1) -> int:
    """The same from the shapes: K and V, n_kv_head x head_dim, min(context, W) slots a layer."""
    slots = sum(context if w is None else min(w, context) for w in config.layer_windows)
    return 2 * batch * slots * config.kv_heads * config.head_dim * 4


# --- decoding ------------------------------------------------------------------------------

def decode_bytes_per_step(config: GPTConfig, context: int, batch: int) -> int:
    """What one greedy step must read (fp32): every weight once, plus each row's cached K and V."""
    return 4 * count_params(config) + kv_cache_formula(config, context, batch)


@torch.no_grad()
def decode_runs(config: GPTConfig, *, context: int, batch: int, new_tokens: int, runs: int,
                device: str = "cpu") -> list[float]:
    """Tokens/s of `runs` timed runs of `new_tokens` greedy steps after `context` cached
    tokens (random weights, a zero-filled cache: a step's cost does not depend on the values);
    each run starts from a freshly filled cache, made outside the timing."""
    config = config.replace(n_ctx=max(config.n_ctx, context + new_tokens))
    params = init_params(config, seed=0)
    if device != "cpu":
        params = tree_map(lambda t: t.to(device), params)

    def filled_cache() -> KVCache:
        cache = KVCache.allocate(config, batch, capacity=context + new_tokens, device=device)
        for slots in cache.slot_pos:
            kept = torch.arange(max(0, context - slots.numel()), context, device=slots.device)  # a rolling buffer keeps the last
            slots[kept % slots.numel()] = kept
        cache.advance(context)
        return cache

    def run(cache: KVCache):
        t = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for _ in range(new_tokens):
            t = forward(params, t, config, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    times = repeat_times(run, runs, setup=filled_cache, **({} if device == "cpu" else {"device": device}))
    return [batch * new_tokens / s for s in times]


def decode_row(config: GPTConfig, *, context: int, batch: int, new_tokens: int, runs: int,
               bandwidth: float, device: str = "cpu") -> dict:
    speeds = decode_runs(config, context=context, batch=batch, new_tokens=new_tokens, runs=runs, device=device)
    step_bytes = decode_bytes_per_step(config, context, batch)
    return {"context": context, "batch": batch, "tokens_per_s": spread(speeds), "runs": speeds,
            "bytes_per_step": step_bytes, "mib_per_step": step_bytes / MiB,
            "bound_tokens_per_s": batch * bandwidth / step_bytes}


# --- attention kernels against sequence length (run in a child process) ------------------------

KERNELS = {
    "sliding window": lambda q, k, v, w: sliding_window_attention(q, k, v, w),
    "flash causal": lambda q, k, v, w: causal_attention(q, k, v),
    "dense window mask": lambda q, k, v, w: dense_window_attention(q, k, v, w),
}


def kernel_scaling(lengths: list[int], window: int, heads: int, head_dim: int, dense_max: int,
                   repeats: int, device: str = "cpu") -> list[dict]:
    """Per length and kernel: forward and forward+backward time (median ms) and peak memory
    growth (MiB) of one attention call [1, heads, T, head_dim]."""
    release_freed_memory()
    torch.manual_seed(0)
    rows = []
    for T in lengths:
        row = {"seq_len": T, "kernels": {}}
        for name, kernel in KERNELS.items():
            if name == "dense window mask" and T > dense_max:
                continue
            q, k, v = (torch.randn(1, heads, T, head_dim, device=device) for _ in range(3))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            grad = torch.randn(1, heads, T, head_dim, device=device)

            def fwd():
                with torch.no_grad():
                    kernel(q, k, v, window)

            def fwd_bwd():
                kernel(qg, kg, vg, window).backward(grad)
                for t in (qg, kg, vg):
                    t.grad = None

            on = {} if device == "cpu" else {"device": device}
            row["kernels"][name] = {
                "fwd_ms": spread([1e3 * s for s in repeat_times(fwd, repeats, **on)])["median"],
                "fwd_bwd_ms": spread([1e3 * s for s in repeat_times(fwd_bwd, repeats, **on)])["median"],
                "fwd_mib": peak_rss_growth(fwd, **on) / MiB, "fwd_bwd_mib": peak_rss_growth(fwd_bwd, **on) / MiB}
        rows.append(row)
    return rows


def step_scaling(configs: dict[str, dict], lengths: list[int], repeats: int,
                 device: str = "cpu") -> dict[str, list[dict]]:
    """Per model and length: one training step (forward, backward, clip, AdamW) of batch
    1 x T: its times (median of `repeats`) and the peak memory growth of a step once AdamW's
    state exists."""
    release_freed_memory()
    out = {}
    for name, fields in configs.items():
        out[name] = []
        for T in lengths:
            config = GPTConfig(**fields).replace(n_ctx=T)
            strategy = make_strategy("single", device=device)
            strategy.setup(init_params(config, seed=0), config, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                           precision="fp32")
            x = torch.randint(0, config.vocab_size, (1, T), device=device)

            def step():
                optimizer_step(strategy, [(x, x)], lr=1e-4, grad_clip=1.0, step=0)

            on = {} if device == "cpu" else {"device": device}
            times = repeat_times(step, repeats, **on)
            out[name].append({"seq_len": T, "step_s": spread(times), "times": times,
                              "mib": peak_rss_growth(step, **on) / MiB})
            del strategy
            release_freed_memory()
    return out
