"""`--precision auto`: train in bf16 only where this device's bf16 matmul is measurably
faster than its fp32 one.

A CPU's bf16 matmul runs from several times fp32's speed (AMX) to a small fraction of it
(AVX2 without avx512_bf16, where torch has no vectorised bf16 kernel; `just bench train`
prints both ceilings), and CPU flags do not say which kernels torch will use, so the
choice is measured: a square matmul in each dtype, best of a few. GPUs with bf16 are
measured the same way (their tensor cores win by far). `just bench train` shows the
training rates the choice leads to.
"""

from __future__ import annotations

import functools

import torch

from fgpt.errors import FgptError
from fgpt.measure import interleaved_best
from fgpt.tree import COMPUTE_DTYPES

PRECISIONS = ("auto", *COMPUTE_DTYPES)
FASTER = 1.2  # bf16 must beat fp32 by this factor: below it the casts and the fp32 loss eat the gain
_PROBE = {"cuda": 4096, "cpu": 512}  # matmul size: large enough to reach the fast kernels
_ROUNDS = 5


def _matmul(device: str, dtype: torch.dtype, n: int):
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return lambda: a @ b


@functools.cache
def measured_speedup(device: str) -> float:
    """bf16 matmul FLOP/s over fp32's on this device (0 where bf16 is unsupported): the best
    of interleaved rounds, so that load on shared cores hits both alike; it stops early once
    bf16 is plainly slower, where one call can take a second."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    n = _PROBE.get(torch.device(device).type, 512)
    products = {dtype: _matmul(device, dtype, n) for dtype in (torch.float32, torch.bfloat16)}
    for product in products.values():
        product()  # warm-up: allocator, kernel selection, thread pool
    best = interleaved_best(products, _ROUNDS, device=device,
                            give_up=lambda best: best[torch.bfloat16] > 3 * best[torch.float32])
    return best[torch.float32] / best[torch.bfloat16]


def choose(device: str) -> str:
    """'bf16' where its matmul is measurably faster here (FASTER), else 'fp32'."""
    return "bf16" if measured_speedup(device) >= FASTER else "fp32"


def check(name: str) -> None:
    if name not in PRECISIONS:
        raise FgptError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
