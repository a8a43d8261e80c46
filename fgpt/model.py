"""GPT-2 as pure functions over a parameter tree.

    params = init_params(config, seed=0)
    logits = forward(params, tokens, config)              # [B, T] -> [B, T, V]
    loss = loss_fn(params, tokens, targets, config)       # mean next-token cross-entropy

The tree is nested dicts of tensors whose dotted paths are the HF GPT-2 safetensors keys
(`param_shapes` lists them all): `wte`, `wpe` (learned positions only), `h` (a list, one dict
per block: `ln_1`, `attn.c_attn` with columns [q | k | v], `attn.c_proj`, `ln_2`, `mlp.c_fc`,
`mlp.c_proj`) and `ln_f`. Linear weights are [in, out] (HF's Conv1D) and the LM head is the
token embedding `wte` (tied).

The network is four pieces, chained by `trunk` here and piece by piece by the training
strategies that shard parameters per block (fgpt/parallel/): `embed` (tokens -> x and their
`Positions`), `block` (x -> x, once per layer), then `head` (x -> logits) or `head_loss`
(x -> mean loss). A position scheme lives in `embed`, `Positions` and `attention_block` alone.

What "pure" means here, exactly: no function keeps state between calls or mutates `params`,
so torch.func.grad / vjp / jacrev apply. The exceptions, all of them:
- `cache=`: `forward` writes the new keys and values into the KV cache, then moves its cursor
  (`KVCache.advance`); the cache is the one argument that is mutated.
- dropout (`train=True` and `config.dropout > 0`) draws from torch's default generator of
  the device: `torch.manual_seed` seeds it, and torch.func.vmap needs `randomness=` then.
Rotary cos / sin tables are memoised per (length, head dim, base, dtype, device) in
fgpt/rope.py: a memo of values, which never changes a result. Which kernel computes a full
causal attention of a given shape is a per-process choice in fgpt/attention.py, set by the
training loop: the same maths, up to float rounding.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fgpt import tree
from fgpt.attention import attention, check_window_kernel
from fgpt.config import GPTConfig
from fgpt.cross_entropy import IGNORE, linear_cross_entropy
from fgpt.errors import FgptError
from fgpt.inference.kv_cache import KVCache
from fgpt.layers import dropout, embedding, layer_norm, linear, mlp, unembed
from fgpt.recompute import recomputed
from fgpt.rope import apply_rope, rope_angles


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

    Each leaf draws from its own generator seeded by (seed, path), so two configs of one
    depth that share a leaf's path and shape get the same tensor (across depths the c_proj
    weights are the same draw, scaled): a RoPE model (no wpe) or a GQA model (other c_attn
    width) starts from exactly the baseline's other weights."""
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

class Positions(NamedTuple):
    """What the blocks need of where the tokens sit, made once per pass by `embed`. Learned
    positions were added to the embeddings, so they need nothing here; rotary positions
    carry the (cos, sin) that rotate q and k."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def embed(params: dict, tokens: torch.Tensor, config: GPTConfig, *, cache: KVCache | None = None,
          train: bool = False) -> tuple[torch.Tensor, Positions]:
    """tokens [B, T] -> (x [B, T, d], their Positions). Positions count from 0, or continue
    the cached sequence (per row, after its left padding)."""
    T = tokens.shape[1]
    end = T if cache is None else cache.length + T  # one past the largest position
    if config.pos_emb == "learned" and end > config.n_ctx:
        raise FgptError(f"sequence of {end} tokens exceeds n_ctx={config.n_ctx} (learned positions)")
    ids = torch.arange(T, device=tokens.device) if cache is None else cache.positions(T)  # [T] or [B, T]
    x = embedding(params["wte"], tokens)  # [B, T, d]
    if config.pos_emb == "learned":
        x = x + embedding(params["wpe"], ids)
        pos = Positions()
    else:  # "rope"
        pos = Positions(rope=rope_angles(ids, end, config.head_dim, config.rope_base, x.dtype))
    return dropout(x, config.dropout, train), pos


def attention_block(p: dict, x: torch.Tensor, config: GPTConfig, *, layer: int, pos: Positions,
                    cache: KVCache | None = None, train: bool = False, window_kernel: str = "band") -> torch.Tensor:
    """Causal self-attention: [B, T, d] -> [B, T, d]; q, k, v come from one c_attn matmul.
    `window_kernel`: which of fgpt.attention.WINDOW_KERNELS computes windowed layers."""
    hd, H, Hkv = config.head_dim, config.n_head, config.kv_heads
    B, T = x.shape[:2]
    qkv = linear(p["c_attn"], x)  # [B, T, (H + 2*Hkv)*hd]
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    # "b t (h d) -> b h t d" as plain views: einops' rearrange costs ~10 us a call in Python,
    # which four calls per layer make a quarter of a 124M decode step's overhead
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, Hkv, hd).transpose(1, 2)
    v = v.view(B, T, Hkv, hd).transpose(1, 2)
    if pos.rope is not None:
        q, k = apply_rope(q, *pos.rope), apply_rope(k, *pos.rope)
    window = config.layer_windows[layer]
    if cache is not None:
        y = cache.attend(layer, q, k, v, window, kernel=window_kernel)
    else:
        y = attention(q, k, v, window, dropout_p=config.dropout if train else 0.0, kernel=window_kernel)
    y = y.transpose(1, 2).reshape(B, T, H * hd)  # "b h t d -> b t (h d)"
    return dropout(linear(p["c_proj"], y), config.dropout, train)


def block(p: dict, x: torch.Tensor, config: GPTConfig, *, layer: int, pos: Positions,
          cache: KVCache | None = None, train: bool = False, recompute: str = "none",
          window_kernel: str = "band") -> torch.Tensor:
    """One pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).
    `recompute` ("attention" or "full"): that part's activations are not kept for backward
    but computed again there (fgpt/recompute.py); the result is the same. `window_kernel`:
    see `attention_block`."""
    eps = config.layer_norm_epsilon
    random = train and config.dropout > 0
    if recompute == "full" and cache is None:
        return recomputed(lambda p, x: block(p, x, config, layer=layer, pos=pos, train=train,
                                             window_kernel=window_kernel), p, x, random=random)

    def attend(p: dict, x: torch.Tensor) -> torch.Tensor:
        return attention_block(p["attn"], layer_norm(p["ln_1"], x, eps), config,
                               layer=layer, pos=pos, cache=cache, train=train, window_kernel=window_kernel)
    if recompute == "attention" and cache is None:
        x = x + recomputed(attend, {"attn": p["attn"], "ln_1": p["ln_1"]}, x, random=random)
    else:
        x = x + attend(p, x)
    return x + dropout(mlp(p["mlp"], layer_norm(p["ln_2"], x, eps)), config.dropout, train)


def head(params: dict, x: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Final layer norm and the LM head, tied to the token embedding: [B, T, d] -> [B, T, V]."""
    x = layer_norm(params["ln_f"], x, config.layer_norm_epsilon)
    return unembed(params["wte"], x)


def head_loss(params: dict, x: torch.Tensor, targets: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The head, then the mean cross-entropy against targets [B, T] (in fp32); -1 is ignored.
    Past one chunk of rows, a chunk at a time (fgpt.cross_entropy): the [B, T, V] logits
    never exist whole."""
    x = layer_norm(params["ln_f"], x, config.layer_norm_epsilon)
    if not isinstance(params["wte"]["weight"], torch.Tensor):  # a decode matrix (int8, split, batched): its own product
        logits = unembed(params["wte"], x)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return linear_cross_entropy(x.flatten(0, 1), params["wte"]["weight"], targets.flatten())


def trunk(params: dict, tokens: torch.Tensor, config: GPTConfig, *, cache: KVCache | None = None,
          train: bool = False, recompute: str = "none", window_kernel: str = "band") -> torch.Tensor:
    """embed, then every block: tokens [B, T] -> the residual stream [B, T, d] the head reads.
    With `cache`, the tokens continue the cached sequence and their keys / values join it."""
    check_window_kernel(window_kernel)  # also where no window hides anything on this input
    x, pos = embed(params, tokens, config, cache=cache, train=train)
    for i, p in enumerate(params["h"]):
        x = block(p, x, config, layer=i, pos=pos, cache=cache, train=train, recompute=recompute,
                  window_kernel=window_kernel)
    if cache is not None:
        cache.advance(tokens.shape[1])
    return x


def forward(params: dict, tokens: torch.Tensor, config: GPTConfig, *,
            cache: KVCache | None = None, train: bool = False, last_only: bool = False,
            logits_for: slice | None = None, window_kernel: str = "band") -> torch.Tensor:
    """tokens [B, T] int64 -> logits [B, T, V]. With `cache`, tokens continue the cached
    sequence and their keys/values are appended to it. `last_only`: logits [B, 1, V] of the
    last position alone (what sampling needs; spares the head's T x V matmul); `logits_for`:
    those of the positions in that slice alone (what scoring a few targets needs).
    `window_kernel`: which kernel computes windowed layers (fgpt.attention.WINDOW_KERNELS)."""
    x = trunk(params, tokens, config, cache=cache, train=train, window_kernel=window_kernel)
    keep = slice(-1, None) if last_only else logits_for or slice(None)
    return head(params, x[:, keep], config)


def loss_fn(params: dict, tokens: torch.Tensor, targets: torch.Tensor, config: GPTConfig,
            *, train: bool = False, recompute: str = "none", window_kernel: str = "band") -> torch.Tensor:
    """Mean next-token cross-entropy; targets of -1 are ignored. `recompute`, `window_kernel`:
    see `block`."""
    x = trunk(params, tokens, config, train=train, recompute=recompute, window_kernel=window_kernel)
    return head_loss(params, x, targets, config)
