"""Rotary position embedding (RoFormer, Su et al. 2021), rotate-half convention.

Dimension pairs are (i, i + hd/2) as in GPT-NeoX / Llama; pair i turns at frequency
base^(-2i/hd). Positions are absolute token indices from 0, so the score between a query
at m and a key at n depends only on m - n.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def _table(length: int, head_dim: int, base: float, dtype: torch.dtype, device: str):
    # Built once per (length, dtype, device), in float64 on the CPU: an fp32 angle at position
    # p is off by ~p * 6e-8 rad, which at long positions is larger than bf16's rounding.
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [length, hd]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rope_tables(length: int, head_dim: int, base: float, dtype: torch.dtype, device) -> tuple:
    """(cos, sin), each [length, head_dim], for positions 0..length-1."""
    # Tables come in power-of-two lengths, so decoding token by token reuses one table
    # instead of building a new one per step; a row's values do not depend on the length.
    size = max(64, 1 << (length - 1).bit_length())
    cos, sin = _table(size, head_dim, float(base), dtype, str(torch.device(device)))
    return cos[:length], sin[:length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_angles(positions: torch.Tensor, length: int, head_dim: int, base: float, dtype) -> tuple:
    """cos/sin for `positions` ([T] or [B, T], all < length), shaped to broadcast over heads."""
    cos, sin = rope_tables(length, head_dim, base, dtype, positions.device)
    cos, sin = cos[positions], sin[positions]  # [T, hd] or [B, T, hd]
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by precomputed angles (see `rope_angles`)."""
    return x * cos + rotate_half(x) * sin
