"""MHA -> GQA conversion by mean-pooling K/V heads (Ainslie et al. 2023, "GQA", §2).

Query head h reads kv head h // (n_head // n_kv_head), so the new kv head g is the mean of
the old kv heads that served the query heads of group g. Pooling works on the `c_attn`
columns `[q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]`, weight and bias alike;
queries and every other tensor are untouched. An already-GQA model can be pooled further
as long as its kv heads split evenly into the new groups.
"""

from __future__ import annotations

import torch
from einops import reduce

from fgpt.config import GPTConfig
from fgpt.errors import FgptError


def check_gqa_target(config: GPTConfig, n_kv_head: int) -> None:
    if not isinstance(n_kv_head, int) or n_kv_head < 1:
        raise FgptError(f"--to-gqa must be a positive integer, got {n_kv_head!r}")
    if config.n_head % n_kv_head:
        raise FgptError(f"--to-gqa {n_kv_head} does not divide n_head={config.n_head}")
    if n_kv_head > config.kv_heads:
        raise FgptError(f"--to-gqa {n_kv_head}: the model has only {config.kv_heads} kv heads "
                        "already; pooling can only reduce them")
    if config.kv_heads % n_kv_head:
        raise FgptError(f"--to-gqa {n_kv_head}: the model's {config.kv_heads} kv heads do not "
                        "split evenly into that many groups")


def pool_kv_columns(w, config: GPTConfig, n_kv_head: int):
    """c_attn weight [d, (H + 2*Hkv)*hd] or bias [(H + 2*Hkv)*hd] -> the same with n_kv_head."""
    H, Hkv, hd = config.n_head, config.kv_heads, config.head_dim
    q, k, v = w.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    # kv heads are grouped contiguously: new head g pools old heads g*m .. g*m + m-1
    pool = lambda t: reduce(t, "... (g m d) -> ... (g d)", "mean", g=n_kv_head, d=hd)  # noqa: E731
    return torch.cat([q, pool(k), pool(v)], dim=-1)


def to_gqa(config: GPTConfig, params: dict, n_kv_head: int) -> tuple[GPTConfig, dict]:
    """(config, params) with each group's K/V heads mean-pooled into one; a new tree,
    the input is not modified."""
    check_gqa_target(config, n_kv_head)
    blocks = []
    for b in params["h"]:
        c_attn = {name: pool_kv_columns(t, config, n_kv_head) for name, t in b["attn"]["c_attn"].items()}
        blocks.append({**b, "attn": {**b["attn"], "c_attn": c_attn}})
    new_config = config.replace(n_kv_head=None if n_kv_head == config.n_head else n_kv_head)
    return new_config, {**params, "h": blocks}
