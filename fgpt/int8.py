"""Weight-only int8 for decoding: int8 weights with one scale per output channel.

    params8 = quantize(params)                       # block linears and the tied wte as int8
    logits = forward(params8, tokens, config)        # unchanged: the layers see the "scale" leaf

A quantized linear is `{"weight": int8 [out, in], "scale": [out], "bias": [out]}` and
computes x @ (weight * scale[:, None]).T + bias; the tied embedding is
`{"weight": int8 [V, d], "scale": [V]}`, looked up row by row and used as the LM head.
Activations, biases, layer norms and scales stay in the float dtype of the tree given to
`quantize` (fp32 unless cast first), so only the bytes a decode step must read shrink:
a step reads every weight once, and int8 reads a quarter of fp32's bytes.

The matrix products run in torch's `_weight_int8pack_mm`, which converts int8 to float
inside the kernel. On x86 it is vectorised for bf16 inputs only (fp32 inputs take a
scalar loop), so inputs are cast to bf16 for the kernel and its output back; `just bench
generate --kernels` compares the two, and `just bench generate` the whole decode against
fp32 and transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fgpt import tree
from fgpt.errors import FgptError

KERNEL_DTYPE = torch.bfloat16  # the input dtype torch's x86 int8 kernel vectorises
_KERNEL_K_MULTIPLE = 16  # its inner loop steps over K in 8 (AVX2) or 16 (AVX-512) lanes, no tail
QMAX = 127  # symmetric: -127..127, so the grid is the same on both sides of 0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], scale [N]) with w ~= q * scale[:, None]; each row's
    largest |w| maps to 127. Rounding errs by at most scale / 2 per element."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # [N]; an all-zero row stays zero
    q = (w / scale[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8).contiguous()
    return q, scale


def quantize(params: dict, *, embedding: bool = True) -> dict:
    """Every block linear (c_attn, c_proj, c_fc) as int8 [out, in] plus per-output-channel
    scales; with `embedding`, the tied wte too (its rows are the head's output channels).
    Other leaves (layer norms, biases, wpe) are kept as they are."""
    if is_quantized(params):
        raise FgptError("parameters are already quantized to int8")
    dtype = params["wte"]["weight"].dtype
    if not dtype.is_floating_point:
        raise FgptError(f"cannot quantize {dtype} parameters")

    def linear(p: dict) -> dict:
        q, scale = quantize_rows(p["weight"].T)  # stored [in, out]: output channels are columns
        return {"weight": q, "scale": scale.to(dtype), "bias": p["bias"]}

    h = [{**b, "attn": {k: linear(v) for k, v in b["attn"].items()},
          "mlp": {k: linear(v) for k, v in b["mlp"].items()}} for b in params["h"]]
    out = {**params, "h": h}
    if embedding:
        q, scale = quantize_rows(params["wte"]["weight"])
        out["wte"] = {"weight": q, "scale": scale.to(dtype)}
    return out


def is_quantized(params: dict) -> bool:
    return any(path.endswith(".scale") for path in tree.flatten(params))


def _kernel_fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    return x.device.type == "cpu" and q.shape[1] % _KERNEL_K_MULTIPLE == 0


def matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * scale[:, None]).T -> [M, N] in x's dtype."""
    if _kernel_fits(x, q):
        # a fresh bf16 copy: the kernel's aligned vector loads need an aligned start
        xk = x.to(KERNEL_DTYPE, copy=True, memory_format=torch.contiguous_format)
        return torch._weight_int8pack_mm(xk, q, scale.to(KERNEL_DTYPE)).to(x.dtype)
    return x @ (q.to(x.dtype) * scale.to(x.dtype)[:, None]).T  # dequantised: any device, any K


def linear(p: dict, x: torch.Tensor) -> torch.Tensor:
    """A quantized `layers.linear`: [..., in] -> [..., out]."""
    y = matmul(x.reshape(-1, x.shape[-1]), p["weight"], p["scale"]) + p["bias"]
    return y.view(*x.shape[:-1], -1)


def embedding(p: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of the quantized table: tokens [...] -> [..., d] in the scales' dtype."""
    return F.embedding(tokens, p["weight"]).to(p["scale"].dtype) * p["scale"][tokens].unsqueeze(-1)


def unembed(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The tied head over the quantized table: [..., d] -> [..., V]."""
    return matmul(x.reshape(-1, x.shape[-1]), p["weight"], p["scale"]).view(*x.shape[:-1], -1)
