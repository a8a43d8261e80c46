"""Attention kernels: full causal, sliding window at O(T·W), and a dense masked reference.

All take q [B, H, T, hd] and k, v [B, H_kv, S, hd] with H a multiple of H_kv
(grouped-query attention: query head h reads kv head h // (H // H_kv)).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fgpt.errors import FgptError

# Kernels for windowed layers: "band" (plain PyTorch, O(T·W), below), "flex" (compiled
# flex_attention, fgpt/flex_window.py) or "dense" (the window as a mask over all T² scores:
# more work, but one SDPA call, which is faster for short sequences on CPU — see
# `just bench attention`). They compute the same maths, so the choice says how, not what:
# an argument of each call (`window_kernel=` from forward / loss_fn down), never part of
# the config that is saved with checkpoints.
WINDOW_KERNELS = ("band", "flex", "dense")


def _sdpa(q, k, v, *, mask=None, causal=False, dropout_p=0.0):
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa
    )


def causal_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """Full causal attention: query i sees keys 0..i. O(T²) time; the kernel chosen for the
    shape (`use_causal_kernel`), SDPA where none was."""
    key = causal_key(q.shape, k.shape, q.dtype, q.device.type)
    if dropout_p == 0 and _causal_kernels.get(key) == "scores":
        return scores_causal_attention(q, k, v)
    return sdpa_causal_attention(q, k, v, dropout_p)


def sdpa_causal_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    return _sdpa(q, k, v, causal=True, dropout_p=dropout_p)


def scores_causal_attention(q, k, v) -> torch.Tensor:
    """Full causal attention through its explicit scores, as transformers' eager attention
    computes it: one baddbmm (q @ k.T scaled, plus a causal bias of 0 / -inf: query i sees
    keys 0..i, as SDPA's is_causal), the softmax in fp32 (or wider), the probabilities back
    in q's dtype @ v. Its backward keeps the softmax and the probabilities: 6 bytes a score
    in bf16. Grouped heads: each kv head's group of query heads is stacked along the query
    axis, so kv heads are never repeated."""
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    bias = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(bias.repeat(group, 1), q.reshape(B * Hkv, group * T, hd),
                           k.reshape(B * Hkv, S, hd).transpose(1, 2), alpha=hd ** -0.5)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.bmm(probs, v.reshape(B * Hkv, S, hd)).view(B, H, T, hd)


# Full causal attention has two kernels: SDPA (on a CPU a flash kernel, O(T) memory) and the
# explicit scores (O(T²) memory; in bf16 on a CPU it can be much the faster for short
# sequences: docs/performance.md, "Causal attention kernels"). Which one runs a shape is
# chosen by the training loop (fgpt/training/attention_kernel.py: measured, or
# --attention-kernel) for the length of a run (`using_causal_kernel`); others run SDPA.
CAUSAL_KERNELS = {"sdpa": sdpa_causal_attention, "scores": scores_causal_attention}
_causal_kernels: dict[tuple, str] = {}


def causal_key(q_shape, k_shape, dtype: torch.dtype, device_type: str) -> tuple:
    return tuple(q_shape), tuple(k_shape), dtype, device_type


def use_causal_kernel(key: tuple, kernel: str | None) -> None:
    """Compute full causal attention of `key`'s shapes (`causal_key`) with `kernel` from now
    on; None: with SDPA, as if never chosen."""
    if kernel is not None and kernel not in CAUSAL_KERNELS:
        raise FgptError(f"unknown causal attention kernel {kernel!r}: one of {', '.join(CAUSAL_KERNELS)}")
    if kernel is None:
        _causal_kernels.pop(key, None)
    else:
        _causal_kernels[key] = kernel


@contextlib.contextmanager
def using_causal_kernel(key: tuple, kernel: str):
    """`use_causal_kernel` for the length of a with block, then the choice before it."""
    before = _causal_kernels.get(key)
    use_causal_kernel(key, kernel)
    try:
        yield
    finally:
        use_causal_kernel(key, before)


def masked_attention(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Dense attention under a boolean mask broadcastable to [B, H, T, S] (True = attend)."""
    return _sdpa(q, k, v, mask=mask, dropout_p=dropout_p)


def visible(i: torch.Tensor, j: torch.Tensor, window: int | None) -> torch.Tensor:
    """The attention rule, elementwise (broadcasting): key position j is visible from query
    position i iff i - window < j <= i (window None: causal, j <= i). Every mask is built from it."""
    ok = j <= i
    return ok if window is None else ok & (i - j < window)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk] bool: `visible` for every query and key position."""
    return visible(q_pos[:, None], k_pos[None, :], window)


def dense_window_attention(q, k, v, window: int | None, dropout_p: float = 0.0) -> torch.Tensor:
    """The O(T²) reference: sliding window as a mask over full attention."""
    pos = torch.arange(q.shape[-2], device=q.device)
    return masked_attention(q, k, v, window_mask(pos, pos, window), dropout_p)


def _band_mask(n_blocks: int, block: int, window: int, device) -> torch.Tensor:
    """[n_blocks, 1, block, block + window - 1]: which keys of each block's span a query sees."""
    r = torch.arange(block, device=device)[:, None]
    c = torch.arange(block + window - 1, device=device)[None, :]
    in_band = (c >= r) & (c <= r + window - 1)
    first_key = (window - 1) - torch.arange(n_blocks, device=device) * block  # left padding
    return (in_band[None] & (c[None] >= first_key[:, None, None]))[:, None]


def default_block(window: int) -> int:
    """Queries per block. Each query pays for block + window - 1 keys, so smaller blocks
    waste less on masked keys, but very small blocks starve the matmuls. W/4 with a floor
    of 64 was fastest for forward+backward here (`just bench attention`, block sweep)."""
    return min(window, max(64, window // 4))


def sliding_window_attention(q, k, v, window: int, block: int | None = None,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Sliding-window causal attention in O(T·W) time and memory.

    Queries are cut into blocks of `block`; each block attends to the span of
    block + window - 1 keys that can reach it, gathered with `unfold` from keys padded
    on the left by window - 1. Cost per query: block + window - 1 keys instead of T.
    """
    B, H, T, hd = q.shape
    if window >= T:
        return causal_attention(q, k, v, dropout_p)
    block = min(block or default_block(window), T)
    n_blocks = -(-T // block)
    span = block + window - 1
    pad_right = n_blocks * block - T
    q = F.pad(q, (0, 0, 0, pad_right))
    k = F.pad(k, (0, 0, window - 1, pad_right))
    v = F.pad(v, (0, 0, window - 1, pad_right))
    Hkv = k.shape[1]
    # [B, H, nb*block, hd] -> [B*nb, H, block, hd]; keys -> [B*nb, Hkv, span, hd]
    qb = q.view(B, H, n_blocks, block, hd).transpose(1, 2).reshape(B * n_blocks, H, block, hd)
    kb = k.unfold(2, span, block).permute(0, 2, 1, 4, 3).reshape(B * n_blocks, Hkv, span, hd)
    vb = v.unfold(2, span, block).permute(0, 2, 1, 4, 3).reshape(B * n_blocks, Hkv, span, hd)
    mask = _band_mask(n_blocks, block, window, q.device).repeat(B, 1, 1, 1)
    out = _sdpa(qb, kb, vb, mask=mask, dropout_p=dropout_p)  # [B*nb, H, block, hd]
    out = out.view(B, n_blocks, H, block, hd).transpose(1, 2).reshape(B, H, n_blocks * block, hd)
    return out[:, :, :T]


def check_window_kernel(name: str) -> str:
    if name not in WINDOW_KERNELS:
        raise FgptError(f"--window-kernel must be one of {', '.join(WINDOW_KERNELS)}, got {name!r}")
    return name


def attention(q, k, v, window: int | None, dropout_p: float = 0.0, kernel: str = "band") -> torch.Tensor:
    """Causal self-attention over a whole sequence: the training / fresh-prefill path.
    Windowed layers run `kernel`, one of WINDOW_KERNELS."""
    if window is None or window >= q.shape[-2]:  # the window hides nothing
        return causal_attention(q, k, v, dropout_p)
    if kernel == "flex":
        from fgpt.flex_window import flex_window_attention  # imports torch.compile's machinery
        return flex_window_attention(q, k, v, window, dropout_p)
    if kernel == "dense":
        return dense_window_attention(q, k, v, window, dropout_p)
    check_window_kernel(kernel)  # "band", or a name that is none of them
    return sliding_window_attention(q, k, v, window, dropout_p=dropout_p)
