"""Measurements on trained or freshly initialised models: loss by position, KV-cache
size and decode speed, and attention time / memory against sequence length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fgpt import data
from fgpt.attention import causal_attention, dense_window_attention, sliding_window_attention
from fgpt.config import GPTConfig
from fgpt.kv_cache import KVCache
from fgpt.model import forward, init_params

EVAL_SEED = 1234  # the same validation windows for every arm and every training seed


@torch.no_grad()
def loss_by_position(params: dict, config: GPTConfig, val: np.ndarray, *, seq_len: int, n_seqs: int,
                     chunk: int = 4) -> list[float]:
    """Mean next-token loss at each position 0..seq_len-1 over `n_seqs` fixed validation windows."""
    x, y = data.eval_batch(val, seq_len=seq_len, batch_size=n_seqs, seed=EVAL_SEED, index=0)
    total = torch.zeros(seq_len)
    for xs, ys in zip(x.split(chunk), y.split(chunk)):  # logits are [chunk, T, 50257]: keep them small
        logits = forward(params, xs, config)
        total += F.cross_entropy(logits.transpose(1, 2), ys, reduction="none").sum(0)  # [T]
    return (total / n_seqs).tolist()


def kv_bytes_per_token(config: GPTConfig, capacity: int) -> float:
    """fp32 KV-cache bytes per cached token (all layers, keys and values)."""
    return KVCache.allocate(config, batch=1, capacity=capacity).nbytes() / capacity


@torch.no_grad()
def decode_tokens_per_s(config: GPTConfig, *, context: int, batch: int, new_tokens: int, repeats: int = 3) -> float:
    """Greedy one-token steps after `context` cached tokens, with random weights and a cache
    filled with random keys/values (the speed does not depend on their values)."""
    config = config.replace(n_ctx=max(config.n_ctx, context + new_tokens))
    params = init_params(config, seed=0)
    best = float("inf")
    for _ in range(repeats):
        cache = KVCache.allocate(config, batch, capacity=context + new_tokens)
        for k, v, slots in zip(cache.k, cache.v, cache.slot_pos):
            k.normal_(), v.normal_()
            kept = torch.arange(max(0, context - slots.numel()), context)  # a rolling buffer keeps the last
            slots[kept % slots.numel()] = kept
        cache.length = context
        token = torch.zeros(batch, 1, dtype=torch.long)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = forward(params, token, config, cache=cache)[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


# --- attention cost against sequence length --------------------------------------------

def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(fn) -> int:
    """Peak resident memory above the starting point while `fn()` runs (Linux VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _rss_bytes("VmRSS")
    fn()
    return max(0, _rss_bytes("VmHWM") - before)


def best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


ATTENTION_KERNELS = {
    "full causal": lambda q, k, v, w: causal_attention(q, k, v),
    "window as dense mask": lambda q, k, v, w: dense_window_attention(q, k, v, w),
    "sliding window": lambda q, k, v, w: sliding_window_attention(q, k, v, w),
}


def attention_scaling(lengths, window: int, *, n_head: int = 4, head_dim: int = 16) -> list[dict]:
    """`measure_attention_scaling` in a child process whose glibc hands every large free
    straight back to the OS (so the peak resident size tracks live tensors) without
    slowing this process's allocations."""
    args = json.dumps([list(lengths), window, n_head, head_dim])
    code = ("import json, sys; from fgpt.report.measure import measure_attention_scaling as m; "
            "print(json.dumps(m(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True,
                          env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(proc.stdout)


@torch.no_grad()
def measure_attention_scaling(lengths, window: int, n_head: int, head_dim: int) -> list[dict]:
    """Forward time (ms) and peak extra memory (MiB) of each attention kernel per length."""
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(1, n_head, T, head_dim) for _ in range(3))  # [1, H, T, hd]
        kernels = {}
        for name, kernel in ATTENTION_KERNELS.items():
            run = lambda: kernel(q, k, v, window)  # noqa: E731
            kernels[name] = {"ms": best_time(run) * 1e3, "mib": peak_extra_bytes(run) / 2 ** 20}
        rows.append({"seq_len": T, "kernels": kernels})
    return rows
