"""`--attention-kernel auto|sdpa|scores`: which kernel computes a training run's full causal
attention (fgpt/attention.py's CAUSAL_KERNELS), for the run's micro-batch shape:

    kernel = fastest(config, batch=4, seq_len=256, dtype=torch.bfloat16, device="cpu")   # auto
    with using_causal_kernel(step_key(config, 4, 256, torch.bfloat16, "cpu"), kernel):
        ...                                                           # the run's steps

SDPA's CPU flash kernel keeps O(T) memory; the explicit scores keep O(T²) for the backward
and, in bf16, ran forward + backward 1.85x as fast at 4 x 12 x 256 x 64 on an AVX-512 EPYC,
but slower at 1024 tokens (docs/performance.md, "Causal attention kernels"). So `auto` times
the two against each other (forward + backward through torch.func.vjp, on q, k, v laid out
as the model's c_attn split leaves them, interleaved rounds, the run's threads and heap) and
caches the pick per machine (fgpt.machine_cache) like the decode layouts. The scores must
win by MARGIN, since they cost memory; and only candidates that can win are timed:
- CPUs in bf16: on a GPU SDPA's fused kernels stay; in fp32 the scores were no faster on
  that CPU (0.72-1.05x), and fp32 runs keep one kernel everywhere;
- at most SCORES_BYTES of kept scores per layer, so that the O(T²) memory stays small
  beside a step's other activations (4 x 12 x 256² in bf16: 19 MB);
- no attention dropout (the scores path has none).
`sdpa` and `scores` skip the measurement (`scores` then also past those limits, except dropout).
"""

from __future__ import annotations

import torch
from torch.func import vjp

from fgpt import heap
from fgpt.attention import CAUSAL_KERNELS, causal_key
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.machine_cache import measured_once
from fgpt.measure import interleaved_best

CHOICES = ("auto", *CAUSAL_KERNELS)  # --attention-kernel
SCORES_BYTES = 32 << 20
KEPT_BYTES_PER_SCORE = 6  # the backward keeps the fp32 softmax and the bf16 probabilities
MARGIN = 1.1  # the scores must be this much faster: they cost memory
ROUNDS = 5


def check(name: str) -> str:
    if name not in CHOICES:
        raise FgptError(f"--attention-kernel must be one of {', '.join(CHOICES)}, got {name!r}")
    return name


def step_shapes(config: GPTConfig, batch: int, seq_len: int) -> tuple[tuple, tuple]:
    """The shapes of q and of k (and v) in the full causal layers of such a step."""
    return ((batch, config.n_head, seq_len, config.head_dim), (batch, config.kv_heads, seq_len, config.head_dim))


def step_key(config: GPTConfig, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device | str) -> tuple:
    """fgpt.attention's key for the full causal layers of such a step."""
    return causal_key(*step_shapes(config, batch, seq_len), dtype, torch.device(device).type)


def is_candidate(q_shape, k_shape, dtype: torch.dtype, device: torch.device | str, dropout_p: float = 0.0) -> bool:
    """Whether the scores kernel is worth timing for this attention (module docstring)."""
    B, H, T, _ = q_shape
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and dropout_p == 0
            and B * H * T * k_shape[2] * KEPT_BYTES_PER_SCORE <= SCORES_BYTES)


def timings(q_shape, k_shape, dtype: torch.dtype, device: torch.device | str) -> dict[str, float]:
    """Each kernel's fastest forward + backward, in seconds, on q, k, v as the model makes
    them: views of one [B, T, (H + 2 H_kv) hd] projection, the output merged back to [B, T, H hd]."""
    B, H, T, hd = q_shape
    Hkv = k_shape[1]
    gen = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, generator=gen, device=device).to(dtype)
    grad = torch.randn(B, T, H * hd, generator=gen, device=device).to(dtype)

    def layer(kernel):
        def attend(qkv):
            q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            q, k, v = (x.view(B, T, -1, hd).transpose(1, 2) for x in (q, k, v))
            return kernel(q, k, v).transpose(1, 2).reshape(B, T, H * hd)
        # vjp: the single-device step's backward runs inside torch.func's
        return lambda: vjp(attend, qkv)[1](grad)
    return interleaved_best({name: layer(kernel) for name, kernel in CAUSAL_KERNELS.items()}, ROUNDS + 1,
                            device=device)


def pick(seconds: dict[str, float]) -> str:
    return "scores" if seconds["scores"] * MARGIN < seconds["sdpa"] else "sdpa"


def choose(q_shape, k_shape, dtype: torch.dtype, device: torch.device | str, dropout_p: float = 0.0) -> str:
    """The faster kernel here for attention of these shapes: "scores" or "sdpa"."""
    if not is_candidate(q_shape, k_shape, dtype, device, dropout_p):
        return "sdpa"
    key = (f"causal attention {dtype} q {tuple(q_shape)} k {tuple(k_shape)} on {torch.get_num_threads()} "
           f"threads, {heap.current()} heap")
    return measured_once("causal attention kernels", key,
                         lambda: pick(timings(q_shape, k_shape, dtype, device)), tuple(CAUSAL_KERNELS))


def fastest(config: GPTConfig, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device | str) -> str:
    """`choose` for the full causal layers of a step of `batch` sequences of `seq_len` tokens
    ("sdpa" where the model has none)."""
    if all(w is not None and w < seq_len for w in config.layer_windows):
        return "sdpa"
    return choose(*step_shapes(config, batch, seq_len), dtype, device, config.dropout)
