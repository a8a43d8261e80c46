"""Which kernel computes a training run's full causal attention (fgpt.attention's "sdpa" or
"scores"), measured once per machine and shape:

    kernel = use_fastest(config, batch=4, seq_len=256, dtype=torch.bfloat16, device="cpu")  # forward uses it

SDPA's CPU flash kernel keeps O(T) memory; the explicit scores cost O(T²) memory and, in
bf16, ran forward + backward 1.85x as fast at 4 x 12 x 256 x 64 on an AVX-512 EPYC, but
slower at 1024 tokens (docs/performance.md, "Causal attention kernels"). So the two are
timed against each other (forward + backward, interleaved rounds, on the run's threads),
and the pick is cached per machine (fgpt.machine_cache) like the decode layouts. Only
candidates that can win are timed:
- CPUs, in bf16 / fp16: on a GPU SDPA's fused kernels stay; in fp32 the scores were no
  faster on that CPU (0.72-1.05x), and fp32 runs keep one kernel everywhere;
- at most SCORES_BYTES of kept scores per layer, so that the O(T²) memory stays small
  beside a step's other activations (4 x 12 x 256² in bf16: 19 MB);
- no attention dropout (the scores path has none).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import vjp

from fgpt.attention import causal_key, scores_causal_attention, use_causal_kernel
from fgpt.config import GPTConfig
from fgpt.machine_cache import measured_once
from fgpt.measure import interleaved_best

SCORES_BYTES = 32 << 20
KEPT_BYTES_PER_SCORE = 6  # the backward keeps the fp32 softmax and the probabilities in q's dtype
ROUNDS = 5


def scores_bytes(q_shape, k_shape) -> int:
    B, H, T, _ = q_shape
    return B * H * T * k_shape[2] * KEPT_BYTES_PER_SCORE


def candidates(q_shape, k_shape, dtype: torch.dtype, device: torch.device, dropout_p: float = 0.0) -> bool:
    """Whether the scores kernel is worth timing for this attention (module docstring)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) and dropout_p == 0
            and scores_bytes(q_shape, k_shape) <= SCORES_BYTES)


def _measure(q_shape, k_shape, dtype, device) -> str:
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(q_shape, generator=gen, device=device).to(dtype)
    k, v = (torch.randn(k_shape, generator=gen, device=device).to(dtype) for _ in range(2))
    grad = torch.randn(q_shape, generator=gen, device=device).to(dtype)

    def forward_backward(kernel):  # vjp: a training step's backward runs inside torch.func's too
        return lambda: vjp(kernel, q, k, v)[1](grad)
    sdpa = forward_backward(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]))
    best = interleaved_best({"sdpa": sdpa, "scores": forward_backward(scores_causal_attention)}, ROUNDS + 1,
                            device=device)
    return min(best, key=best.get)


def choose(q_shape, k_shape, dtype: torch.dtype, device: torch.device, dropout_p: float = 0.0) -> str:
    """The faster kernel here for attention of these shapes: "scores" or "sdpa"."""
    if not candidates(q_shape, k_shape, dtype, device, dropout_p):
        return "sdpa"
    key = f"causal attention {dtype} q {tuple(q_shape)} k {tuple(k_shape)} on {torch.get_num_threads()} threads"
    return measured_once("causal attention kernels", key, lambda: _measure(q_shape, k_shape, dtype, device),
                         ("sdpa", "scores"))


def use_fastest(config: GPTConfig, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device | str,
                agree: Callable[[str], str] = lambda kernel: kernel) -> str:
    """Choose the kernel of `config`'s full causal layers for micro-batches of `batch`
    sequences of `seq_len` tokens, and have fgpt.attention use it from now on. `agree`: how
    the ranks of a parallel run settle on one kernel (all must run the same maths)."""
    if all(w is not None and w < seq_len for w in config.layer_windows):
        return "sdpa"  # no full causal layer
    kernel = agree(choose(*step_shapes(config, batch, seq_len), dtype, device, config.dropout))
    use(config, batch, seq_len, dtype, device, kernel)
    return kernel


def step_shapes(config: GPTConfig, batch: int, seq_len: int) -> tuple[tuple, tuple]:
    """The shapes of q and of k (and v) in the full causal layers of such a step."""
    return ((batch, config.n_head, seq_len, config.head_dim), (batch, config.kv_heads, seq_len, config.head_dim))


def use(config: GPTConfig, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device | str,
        kernel: str) -> None:
    """Run such a step's full causal layers with `kernel` from now on."""
    use_causal_kernel(causal_key(*step_shapes(config, batch, seq_len), dtype, torch.device(device).type), kernel)
