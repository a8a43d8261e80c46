"""Weight-only int8 for decoding: int8 weights with one scale per output channel.

    params8 = quantize(params)                       # block linears and the tied wte as int8
    logits = forward(params8, tokens, config)        # unchanged: the layers see the "scale" leaf

A quantized linear is `{"weight": int8 [out, in], "scale": [out], "bias": [out]}` and
computes x @ (weight * scale[:, None]).T + bias; the tied embedding is
`{"weight": int8 [V, d], "scale": [V]}`, looked up row by row and used as the LM head.
Activations, biases, layer norms and scales stay in the float dtype of the tree given to
`quantize` (fp32 unless cast first), so only the bytes a decode step must read shrink:
a step reads every weight once, and int8 reads a quarter of fp32's bytes.

Three kernels compute the products; on x86 CPUs each weight shape uses the faster of the
first two, measured once per machine (`fastest_kernel`; cached as decode_layout caches):
- fbgemm's int8 x int8 kernel (the one behind torch's quantized linear), fed the
  activations as 21-bit fixed point: each row x becomes the integer
  v = round(x * SPAN / max|x|), |v| <= SPAN = 1,040,319, written exactly as three base-128
  digits; all digits of all rows go through the kernel as one matrix, so the weights are
  read once, and the three products are summed with their places' weights (128**2, 128,
  1). The kernel's integer sums are exact (digits below 128 keep its pairwise int16 sums
  from saturating: tested), so the activations' only rounding is v's, under 0.6 of a step
  max|x| / SPAN per element: 6e-7 of the row's largest (rows of max|x| >= 1e-30), where
  bf16 rounds each element to 2**-9 of itself. What is stored is int8; what is multiplied
  is those weights by near-fp32 activations.
- torch's `_weight_int8pack_mm` (also the kernel on other CPUs), with the activations cast
  to bf16: the only inputs it vectorises. Its small ops are fewer, so small matrices favour it.
- the dequantised product, on GPUs and for float64.
`just bench generate --kernels` times the kernels, `just bench generate` the whole decode.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fgpt import tree
from fgpt.decode_layout import copies_past_the_caches, fastest, measured_once, on_one_thread
from fgpt.errors import FgptError

QMAX = 127  # weights: symmetric -127..127, so the grid is the same on both sides of 0
# activations for fbgemm: three base-128 digits of a fixed-point integer (module docstring)
_SHIFTS = torch.tensor([[14], [7], [0]], dtype=torch.int32)  # the digits' places: 128**2, 128, 1
_PLACES = torch.tensor([128.0 ** 2, 128.0, 1.0], dtype=torch.float32)
_ZERO = 64  # digits in [0, 127] are stored less 64 (the kernel's input zero point), so the
_OFFSET = _ZERO * (128 ** 2 + 128 + 1)  # places sum to v: the kernel multiplies by digit - 64
_SPAN = 128 ** 3 - 1 - _OFFSET  # |v| <= _SPAN keeps v + _OFFSET a 21-bit integer: 1,040,319
KERNEL_DTYPE = torch.bfloat16  # the input dtype torch's `_weight_int8pack_mm` vectorises on x86
_KERNEL_K_MULTIPLE = 16  # that kernel's inner loop steps over K in 8 or 16 lanes, no tail


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


# --- the products -------------------------------------------------------------------------

FBGEMM_AVAILABLE = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
    torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")  # x86 with AVX2 or better
_forced: str | None = None


@contextmanager
def forced_kernel(name: str):
    """Run every int8 product in `name` (one of KERNELS) inside the block: for tests and
    benchmarks of a path this machine would not pick."""
    global _forced
    if name not in KERNELS:
        raise FgptError(f"unknown int8 kernel {name!r}: choose from {', '.join(KERNELS)}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def kernel_for(x: torch.Tensor, q: torch.Tensor) -> str:
    """On x86 CPUs fbgemm's kernel or torch's `_weight_int8pack_mm`, whichever is measured
    faster for the shape and dtype (where K fits the latter's loop); on other CPUs torch's;
    else the dequantised product (GPUs, float64). A forced kernel that cannot run here is
    an error, not a fallback."""
    on_cpu = x.device.type == "cpu" and x.dtype != torch.float64
    int8pack_fits = on_cpu and q.shape[1] % _KERNEL_K_MULTIPLE == 0
    if _forced is not None:
        runs = {"fbgemm": on_cpu and FBGEMM_AVAILABLE, "int8pack": int8pack_fits, "dequantised": True}
        if not runs[_forced]:
            raise FgptError(f"the int8 kernel {_forced} cannot run a {x.dtype} product on {x.device} "
                            f"with {q.shape[1]} inputs")
        return _forced
    if not on_cpu:
        return "dequantised"
    if FBGEMM_AVAILABLE and int8pack_fits:
        return fastest_kernel(*q.shape, x.dtype)
    if FBGEMM_AVAILABLE:
        return "fbgemm"
    return "int8pack" if int8pack_fits else "dequantised"


_chosen: dict[tuple[int, int, torch.dtype], str] = {}  # (out, in, dtype) -> fbgemm | int8pack


def fastest_kernel(n_out: int, n_in: int, dtype: torch.dtype = torch.float32) -> str:
    """fbgemm's or `_weight_int8pack_mm`, whichever runs x [1, in] @ W.T faster on this
    machine for activations of `dtype`, measured once per shape per machine as
    decode_layout measures float layouts (one thread; copies that outgrow the caches), and
    then used for any number of rows. The digits cost a few small ops per product, so small
    matrices can favour torch's kernel and large ones fbgemm's."""
    key = (n_out, n_in, dtype)
    if key not in _chosen:
        def measure() -> str:
            x = torch.full((1, n_in), 0.5, dtype=dtype)
            weights = [(torch.ones(n_out, n_in, dtype=torch.int8), torch.full((n_out,), 0.01, dtype=dtype))
                       for _ in range(copies_past_the_caches(n_out * n_in))]
            candidates = {name: [lambda q=q, s=s, f=_MATMULS[name]: f(x, q, s, None) for q, s in weights]
                          for name in ("fbgemm", "int8pack")}
            return on_one_thread(lambda: fastest(candidates))
        _chosen[key] = measured_once("int8 kernels", f"int8 {dtype} {n_out}x{n_in}", measure, ("fbgemm", "int8pack"))
    return _chosen[key]


def measured_kernels() -> dict[tuple[int, int, torch.dtype], str]:
    """What this process has measured so far: (out, in, activation dtype) -> kernel."""
    return dict(_chosen)


_packs: dict[int, tuple] = {}  # id(q) -> (weakref to q, weakref to scale, fbgemm's packed weight)


def _packed(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's reordered copy of (q, scale), made on first use of a weight tensor and
    dropped with it (while both live, the int8 weights take twice their bytes). The int8
    weights are treated as immutable: nothing writes them in place."""
    hit = _packs.get(id(q))
    if hit is not None and hit[0]() is q and hit[1]() is scale:
        return hit[2]
    with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao
        warnings.simplefilter("ignore")
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # "x86" may pack for oneDNN instead
        try:
            w = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(w, None)  # no bias: it is added once, not per digit
        finally:
            torch.backends.quantized.engine = engine
    _packs[id(q)] = (weakref.ref(q), weakref.ref(scale), packed)
    weakref.finalize(q, _packs.pop, id(q), None)
    return packed


def digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e [M, 3, K] integers in [-64, 63], step [M, 1]) with
    x = step * (128**2 e[:, 0] + 128 e[:, 1] + e[:, 2]) to within 0.6 step (fp32 rounding),
    for rows whose largest |x| is at least 1e-30 (below that the step stops shrinking)."""
    x = x.float()
    step = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).clamp_(min=1e-30).div_(_SPAN)
    # round(x / step) + OFFSET in [0, 2**21): truncation rounds, since the sum is positive
    v = x.div(step).add_(_OFFSET + 0.5).to(torch.int32)
    digit = torch.bitwise_right_shift(v[:, None], _SHIFTS).bitwise_and_(127)  # [M, 3, K]
    return torch.sub(digit, _ZERO, out=torch.empty(digit.shape, dtype=torch.float32)), step


def _fbgemm_matmul(x, q, scale, bias):
    e, step = digits(x)
    M, K = x.shape
    # scale 1, zero point 64: the kernel's uint8 input is e + 64, the digit in [0, 127]
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        e.view(M * 3, K), 1.0, _ZERO, _packed(q, scale)).view(M, 3, -1)
    places = (step * _PLACES)[:, None]  # [M, 1, 3]: each row's step times each digit's place
    y = torch.bmm(places, out) if bias is None else torch.baddbmm(bias.float(), places, out)
    return y.view(M, -1).to(x.dtype)


def _int8pack_matmul(x, q, scale, bias):
    # a fresh bf16 copy: the kernel's aligned vector loads need an aligned start
    xk = x.to(KERNEL_DTYPE, copy=True, memory_format=torch.contiguous_format)
    y = torch._weight_int8pack_mm(xk, q, scale.to(KERNEL_DTYPE)).to(x.dtype)
    return y if bias is None else y + bias


def _dequantised_matmul(x, q, scale, bias):
    y = x @ (q.to(x.dtype) * scale.to(x.dtype)[:, None]).T
    return y if bias is None else y + bias


_MATMULS = {"fbgemm": _fbgemm_matmul, "int8pack": _int8pack_matmul, "dequantised": _dequantised_matmul}
KERNELS = tuple(_MATMULS)


def matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * scale[:, None]).T (+ bias) -> [M, N] in x's dtype."""
    return _MATMULS[kernel_for(x, q)](x, q, scale, bias)


def linear(p: dict, x: torch.Tensor) -> torch.Tensor:
    """A quantized `layers.linear`: [..., in] -> [..., out]."""
    return matmul(x.reshape(-1, x.shape[-1]), p["weight"], p["scale"], p["bias"]).view(*x.shape[:-1], -1)


def embedding(p: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of the quantized table: tokens [...] -> [..., d] in the scales' dtype."""
    return F.embedding(tokens, p["weight"]).to(p["scale"].dtype) * p["scale"][tokens].unsqueeze(-1)


def unembed(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The tied head over the quantized table: [..., d] -> [..., V]."""
    return matmul(x.reshape(-1, x.shape[-1]), p["weight"], p["scale"]).view(*x.shape[:-1], -1)
