"""What several test files share: random models that decode visibly, the references written
independently of fgpt (a dense masked softmax, greedy decoding by full recomputation, MHA with
repeated K/V heads), and an exact tree comparison. transformers' reference: hf_reference.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from einops import repeat

from fgpt import GPTConfig, forward, init_params, tree


def tiny_variant() -> tuple[GPTConfig, dict]:
    """A two-layer model with every variant (rotary, GQA, a window in one layer) and its params."""
    config = GPTConfig(vocab_size=96, n_ctx=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_emb="rope",
                       window=(8, None))
    return config, init_params(config, seed=4)


def wide_params(config: GPTConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """init_params plus seeded noise of std `scale`: weights far wider than GPT-2's init, so
    every position's logits depend visibly on its context and greedy decoding does not
    settle into one token."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda x: x + scale * torch.randn(x.shape, generator=gen, dtype=x.dtype)  # noqa: E731
    return tree.tree_map(noise, init_params(config, seed=seed))


def greedy_by_recomputation(params, config: GPTConfig, prompt, n_new: int, *,
                            vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for every cached decoding path: re-run the whole sequence for each new
    token, no KV cache. `prompt`: rows of token ids [B, P] (a tensor or nested lists); greedy
    over the first `vocab_limit` logits when given. Returns (tokens [B, P + n_new], the
    logits each new token was chosen from [B, n_new, V])."""
    tokens, steps = torch.as_tensor(prompt), []
    for _ in range(n_new):
        logits = forward(params, tokens, config)[:, -1]
        steps.append(logits)
        tokens = torch.cat([tokens, logits[:, :vocab_limit].argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(steps, dim=1)


def reference_attention(q, k, v, window=None):
    """softmax(q k^T / sqrt(hd) + band mask) v, query head h reading kv head h // group:
    grouped-query attention defined as MHA over repeated K/V heads."""
    H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
    kv_of_head = torch.arange(H) // (H // Hkv)
    k, v = k[:, kv_of_head], v[:, kv_of_head]  # [B, H, T, hd]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if window is not None:
        allowed &= ~torch.ones(T, T, dtype=torch.bool).tril(-window)  # drop keys j <= i - window
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, T]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def repeat_kv_heads(config: GPTConfig, params: dict) -> tuple[GPTConfig, dict]:
    """The same model as MHA: every K/V head's columns of c_attn repeated for each query head
    of its group (query head h reads kv head h // (n_head // n_kv_head))."""
    H, Hkv, hd = config.n_head, config.kv_heads, config.head_dim
    m = H // Hkv

    def widen(w):
        q, k, v = w.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        rep = lambda t: repeat(t, "... (g d) -> ... (g m d)", m=m, d=hd)  # noqa: E731
        return torch.cat([q, rep(k), rep(v)], dim=-1)

    h = [{**b, "attn": {**b["attn"], "c_attn": {n: widen(t) for n, t in b["attn"]["c_attn"].items()}}}
         for b in params["h"]]
    return config.replace(n_kv_head=None), {**params, "h": h}


def assert_same_tree(a: dict, b: dict) -> None:
    """The same dotted paths holding bit-identical tensors of the same dtype."""
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape and torch.equal(fa[k], fb[k]), k


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids
