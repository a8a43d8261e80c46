"""GPT-2 as pure functions over a parameter tree.

    params = init_params(config, seed=0)
    logits = forward(params, tokens, config)          # [B, T] -> [B, T, V]

The tree's dotted paths are the HF GPT-2 safetensors keys (see DESIGN.md). Nothing here
mutates `params` or touches global state, so torch.func.grad / vmap / jacrev apply.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange

from fgpt.attention import attention
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.kv_cache import KVCache
from fgpt.layers import dropout, embedding, layer_norm, linear, mlp, unembed
from fgpt.rope import apply_rope, rope_angles
from fgpt import tree


# --- parameters ----------------------------------------------------------------------

def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter (the HF GPT-2 key layout)."""
    d, hd = config.n_embd, config.head_dim
    qkv = (config.n_head + 2 * config.kv_heads) * hd
    shapes = {"wte.weight": (config.vocab_size, d)}
    if config.pos_emb == "learned":
        shapes["wpe.weight"] = (config.n_ctx, d)
    for i in range(config.n_layer):
        shapes |= {
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, qkv), f"h.{i}.attn.c_attn.bias": (qkv,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
            f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,),
        }
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,)}


def count_params(config: GPTConfig) -> int:
    """Closed form (tied head counted once): 124,439,808 for the gpt2 preset."""
    d, L = config.n_embd, config.n_layer
    qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
    per_block = 4 * d + (d * qkv + qkv) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    wpe = config.n_ctx * d if config.pos_emb == "learned" else 0
    return config.vocab_size * d + wpe + L * per_block + 2 * d


def leaf_seed(seed: int, path: str) -> int:
    """The random stream of one leaf: a function of (seed, dotted path) alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") >> 1


def init_params(config: GPTConfig, seed: int = 0, *, dtype=torch.float32, device="cpu") -> dict:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)),
    zero biases, unit layer-norm gains.

    Each leaf draws from its own generator seeded by (seed, path), so two configs that share
    a leaf's path and shape get the same tensor: a RoPE model (no wpe) or a GQA model (other
    c_attn width) starts from exactly the baseline's other weights."""
    resid_std = 0.02 / math.sqrt(2 * config.n_layer)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path.endswith("bias"):
            value = torch.zeros(shape)
        elif ".ln_" in path or path.startswith("ln_"):
            value = torch.ones(shape)
        else:
            std = resid_std if path.endswith("c_proj.weight") else 0.02
            gen = torch.Generator(device="cpu").manual_seed(leaf_seed(seed, path))
            value = torch.randn(shape, generator=gen) * std
        flat[path] = value.to(dtype=dtype, device=device)
    return tree.unflatten(flat)


# --- the network -----------------------------------------------------------------------

def attention_block(p: dict, x: torch.Tensor, config: GPTConfig, *, layer: int, rope=None,
                    cache: KVCache | None = None, train: bool = False) -> torch.Tensor:
    """Causal self-attention: [B, T, d] -> [B, T, d]; q, k, v come from one c_attn matmul."""
    hd, H, Hkv = config.head_dim, config.n_head, config.kv_heads
    qkv = linear(p["c_attn"], x)  # [B, T, (H + 2*Hkv)*hd]
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    q = rearrange(q, "b t (h d) -> b h t d", h=H)
    k = rearrange(k, "b t (h d) -> b h t d", h=Hkv)
    v = rearrange(v, "b t (h d) -> b h t d", h=Hkv)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    window = config.layer_windows[layer]
    if cache is not None:
        y = cache.attend(layer, q, k, v, window)
    else:
        y = attention(q, k, v, window, dropout_p=config.dropout if train else 0.0)
    y = rearrange(y, "b h t d -> b t (h d)")
    return dropout(linear(p["c_proj"], y), config.dropout, train)


def block(p: dict, x: torch.Tensor, config: GPTConfig, *, layer: int, rope=None,
          cache: KVCache | None = None, train: bool = False) -> torch.Tensor:
    """One pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    eps = config.layer_norm_epsilon
    x = x + attention_block(p["attn"], layer_norm(p["ln_1"], x, eps), config,
                            layer=layer, rope=rope, cache=cache, train=train)
    return x + dropout(mlp(p["mlp"], layer_norm(p["ln_2"], x, eps)), config.dropout, train)


def positions_for(tokens: torch.Tensor, config: GPTConfig, cache: KVCache | None) -> tuple:
    """(positions [T] or [B, T], one past the largest position) for the incoming tokens."""
    T = tokens.shape[1]
    end = T if cache is None else cache.length + T
    if config.pos_emb == "learned" and end > config.n_ctx:
        raise FgptError(f"sequence of {end} tokens exceeds n_ctx={config.n_ctx} (learned positions)")
    if cache is None:
        return torch.arange(T, device=tokens.device), end
    return cache.positions(T), end


def embed(params: dict, tokens: torch.Tensor, config: GPTConfig, positions, train=False):
    x = embedding(params["wte"], tokens)  # [B, T, d]
    if config.pos_emb == "learned":
        x = x + embedding(params["wpe"], positions)
    return dropout(x, config.dropout, train)


def rope_for(positions, end: int, config: GPTConfig, dtype):
    if config.pos_emb != "rope":
        return None
    return rope_angles(positions, end, config.head_dim, config.rope_base, dtype)


def head(params: dict, x: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Final layer norm and the LM head, tied to the token embedding: [B, T, d] -> [B, T, V]."""
    x = layer_norm(params["ln_f"], x, config.layer_norm_epsilon)
    return unembed(params["wte"], x)


def forward(params: dict, tokens: torch.Tensor, config: GPTConfig, *,
            cache: KVCache | None = None, train: bool = False, last_only: bool = False) -> torch.Tensor:
    """tokens [B, T] int64 -> logits [B, T, V]. With `cache`, tokens continue the cached
    sequence and their keys/values are appended to it. `last_only`: logits [B, 1, V] of the
    last position alone (what sampling needs; spares the head's T x V matmul)."""
    positions, end = positions_for(tokens, config, cache)
    x = embed(params, tokens, config, positions, train)
    rope = rope_for(positions, end, config, x.dtype)
    for i, p in enumerate(params["h"]):
        x = block(p, x, config, layer=i, rope=rope, cache=cache, train=train)
    if cache is not None:
        cache.length = end
    return head(params, x[:, -1:] if last_only else x, config)


def loss_fn(params: dict, tokens: torch.Tensor, targets: torch.Tensor, config: GPTConfig,
            *, train: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy; targets of -1 are ignored."""
    return token_loss(forward(params, tokens, config, train=train), targets)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T]; -1 is ignored.
    Shared with the parallel strategies, which run embed / blocks / head piece by piece."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
