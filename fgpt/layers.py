"""The small pure layers GPT-2 is made of. Each takes its parameters first."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(p: dict, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"], eps)


def linear(p: dict, x: torch.Tensor) -> torch.Tensor:
    """HF Conv1D layout: weight is [in, out], so y = x @ w + b with no transpose. A weight
    that is not a tensor (an int8, split or batched matrix of fgpt/inference/) computes its
    own product."""
    if not isinstance(p["weight"], torch.Tensor):
        return p["weight"].linear(x, p["bias"])
    return torch.addmm(p["bias"], x.reshape(-1, x.shape[-1]), p["weight"]).view(*x.shape[:-1], -1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"


def mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    return linear(p["c_proj"], gelu(linear(p["c_fc"], x)))


def embedding(p: dict, tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(p["weight"], torch.Tensor):
        return p["weight"].rows(tokens)
    return F.embedding(tokens, p["weight"])


def unembed(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The LM head tied to the embedding table p: [..., d] -> [..., V]."""
    if not isinstance(p["weight"], torch.Tensor):
        return p["weight"].unembed(x)
    return x @ p["weight"].T


def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return F.dropout(x, p, training=True) if train and p > 0 else x
