"""Sliding-window attention through compiled `flex_attention`: an opt-in kernel for windowed
layers (`window_kernel="flex"` of forward / loss_fn), imported only when chosen, so the
plain band kernel never pays for torch.compile.

Limits of torch 2.13, found by trying them here: on CPU the compiled kernel is forward
only ("FlexAttention does not support backward on CPU", pytorch/pytorch#148752), takes
float32 / float16 / bfloat16 but not float64, and flex_attention has no dropout. Each is
a one-line FgptError here instead of an error from inside the compiler.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fgpt.attention import visible
from fgpt.errors import FgptError

MAX_SHAPES = 256  # compiled variants kept per process (each costs seconds to build)
BLOCK = 128  # flex_attention's default tile: the block mask says which tiles to visit
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NO_BACKWARD = ("the flex window kernel has no backward on {} in torch {} (pytorch/pytorch#148752); "
               "train with the band kernel")


def check_trainable(device: str | torch.device) -> None:
    """Raise unless flex_attention can be differentiated on `device` (CUDA only, today)."""
    device_type = torch.device(device).type
    if device_type != "cuda":
        raise FgptError(NO_BACKWARD.format(device_type.upper(), torch.__version__))


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per shape (a training run has one; a prefill one per
    prompt length). Past dynamo's recompile limit (8 shapes per function) torch falls back,
    with a log warning only, to eager flex_attention, which computes all T² scores: the cost
    the compiled kernel exists to avoid. So the limit is raised for these calls alone."""
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES):
            return compiled(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=32)
def window_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """The BlockMask of `i - window < j <= i` over T queries and keys, built once per
    (T, window, device). Tiles are classified from their index ranges: O((T/128)²) work,
    where `create_block_mask` evaluates the mask function on all T² pairs."""
    n = -(-T // BLOCK)
    lo = torch.arange(n, device=device) * BLOCK  # first index of each tile
    hi = torch.clamp(lo + BLOCK - 1, max=T - 1)  # last index that exists
    # i - j over a (query tile, key tile) pair spans [q_lo - k_hi, q_hi - k_lo]
    some = (hi[:, None] - lo[None, :] >= 0) & (lo[:, None] - hi[None, :] < window)  # [n, n]
    # a full tile skips mask_mod: every pair visible, and no ragged edge (create_block_mask
    # pads a ragged tile with masked pairs, so it is never full)
    whole = lo + BLOCK <= T
    full = (whole[:, None] & whole[None, :]
            & (lo[:, None] - hi[None, :] >= 0) & (hi[:, None] - lo[None, :] < window))
    partial = some & ~full

    def sparse(tiles: torch.Tensor):  # [n, n] bool -> counts [1, 1, n], indices [1, 1, n, n]
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def in_window(b, h, i, j):
        return visible(i, j, window)

    return BlockMask.from_kv_blocks(*sparse(partial), *sparse(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=in_window, seq_lengths=(T, T))


def flex_window_attention(q, k, v, window: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Sliding-window causal attention, q [B, H, T, hd], k, v [B, H_kv, T, hd] -> [B, H, T, hd],
    by compiled flex_attention over the tiles the window touches: O(T·W) like the band."""
    if dropout_p:
        raise FgptError("the flex window kernel has no attention dropout; use the band kernel")
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            check_trainable(q.device)
        if q.dtype not in CPU_DTYPES:
            raise FgptError(f"the flex window kernel takes float32/float16/bfloat16 on CPU, not {q.dtype}")
    mask = window_block_mask(q.shape[-2], window, q.device)
    return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
