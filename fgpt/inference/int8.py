"""Weight-only int8 for decoding: int8 weights with one scale per output channel.

    params8 = quantize(params)                       # block linears and the tied wte as int8
    logits = forward(params8, tokens, config)        # unchanged: the layers dispatch on the type

A quantized weight is a leaf type of its own, `Int8Matrix(q, scale, kernel)`: q int8
[out, in], one scale per output channel, and the kernel its products run in, chosen when it
is quantized. It stands where the float weight stood (`{"weight": Int8Matrix, "bias": b}`;
the tied embedding `{"weight": Int8Matrix}`), computes its own products (`linear`, `rows`,
`unembed`), and is a pytree node of the project's trees (children q and scale), so tree_map
moves and casts it. The model's layers only ask whether a weight is a plain tensor.
Activations, biases, layer norms and scales stay in the float dtype of the tree given to
`quantize` (fp32 unless cast first), so only the bytes a decode step must read shrink:
a step reads every weight once, and int8 reads a quarter of fp32's bytes.

Three kernels compute the products; on x86 CPUs `quantize` gives each weight shape the
faster of the first two, measured once per machine (`fastest_kernel`; cached as decode_layout caches):
- fbgemm's int8 x int8 kernel (the one behind torch's quantized linear), fed the
  activations as 21-bit fixed point: each row x becomes the integer
  v = round(x * SPAN / max|x|), |v| <= SPAN = 1,040,319, written exactly as three base-128
  digits; all digits of all rows go through the kernel as one matrix, so the weights are
  read once, and the three products are summed with their places' weights (128**2, 128,
  1). The kernel's integer sums are exact (digits below 128 keep even the int16 pair sums
  of its AVX2 path from saturating: tested), so the activations' only rounding is v's,
  under 0.6 of a step max|x| / SPAN per element: 6e-7 of the row's largest (rows of
  max|x| >= 1e-30), where bf16 rounds each element to 2**-9 of itself. What is stored is
  int8; what is multiplied is those weights by near-fp32 activations.
- torch's `_weight_int8pack_mm` (also the kernel on other CPUs), with the activations cast
  to bf16: the only inputs it vectorises. Its small ops are fewer, so small matrices favour it.
- the dequantised product, on GPUs and for float64.
`just bench generate --kernels` times the kernels, `just bench generate` the whole decode.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import optree
import torch
import torch.nn.functional as F

from fgpt import tree
from fgpt.errors import FgptError
from fgpt.inference.decode_layout import SplitMatrix, copies_past_the_caches, fastest, on_one_thread
from fgpt.machine_cache import measured_once
from fgpt.measure import cpu_flags

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


@dataclass(frozen=True, eq=False)
class Int8Matrix:
    """W = q * scale[:, None], computed by `kernel` (one of KERNELS). Used as the float
    weights it replaces are: `linear` as x @ W.T (a block linear stored [in, out] becomes
    [out, in] rows here), `rows` / `unembed` as the tied embedding table."""
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out], the activations' float dtype
    kernel: str

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in] @ W.T (+ bias) -> [M, out] in x's dtype."""
        if self.kernel != "dequantised" and x.device.type != "cpu":
            raise FgptError(f"an int8 weight quantized for the {self.kernel} kernel cannot multiply on "
                            f"{x.device}: quantize the tree on the device it runs on")
        return _MATMULS[self.kernel](x, self, bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """A quantized `layers.linear`: [..., in] -> [..., out]."""
        return self.matmul(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the quantized table: tokens [...] -> [..., d] in the scales' dtype."""
        return F.embedding(tokens, self.q).to(self.scale.dtype) * self.scale[tokens].unsqueeze(-1)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head over the quantized table: [..., d] -> [..., V]."""
        return self.matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    @functools.cached_property
    def fbgemm_pack(self):
        """fbgemm's reordered copy of (q, scale), made on first use and kept with the matrix
        (while both live, the int8 weights take twice their bytes). q is never written in
        place; a tree_map makes new matrices, which pack anew."""
        with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao
            warnings.simplefilter("ignore")
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"  # "x86" may pack for oneDNN instead
            try:
                w = torch._make_per_channel_quantized_tensor(
                    self.q, self.scale.double(), torch.zeros(len(self.scale), dtype=torch.long), 0)
                return torch.ops.quantized.linear_prepack(w, None)  # no bias: added once, not per digit
            finally:
                torch.backends.quantized.engine = engine


optree.register_pytree_node(Int8Matrix, lambda m: ((m.q, m.scale), m.kernel, ("q", "scale")),
                            lambda kernel, children: Int8Matrix(*children, kernel), namespace=tree.NAMESPACE)


def quantize(params: dict, *, embedding: bool = True, kernel: str = "auto") -> dict:
    """Every block linear (c_attn, c_proj, c_fc) as an Int8Matrix with per-output-channel
    scales; with `embedding`, the tied wte too (its rows are the head's output channels).
    Other leaves (layer norms, biases, wpe) are kept as they are. `kernel`: one of KERNELS
    for every product, or "auto" (`choose_kernel`, measured once per shape)."""
    if is_quantized(params):
        raise FgptError("parameters are already quantized to int8")
    if any(isinstance(x, SplitMatrix) for x in tree.leaves(params, is_leaf=lambda x: isinstance(x, SplitMatrix))):
        raise FgptError("quantize the plain parameters, before decode_layout / batched_layout (these hold weights "
                        "wrapped for decoding)")
    dtype = params["wte"]["weight"].dtype
    if not dtype.is_floating_point:
        raise FgptError(f"cannot quantize {dtype} parameters")
    chosen: dict[tuple, str] = {}

    def matrix(w: torch.Tensor) -> Int8Matrix:  # w [out, in]
        q, scale = quantize_rows(w)
        key = (*q.shape, w.device)
        if key not in chosen:
            chosen[key] = choose_kernel(*q.shape, dtype, w.device, kernel)
        return Int8Matrix(q, scale.to(dtype), chosen[key])

    def linear(p: dict) -> dict:
        return {**p, "weight": matrix(p["weight"].T)}  # stored [in, out]: output channels are columns

    h = [{**b, "attn": {k: linear(v) for k, v in b["attn"].items()},
          "mlp": {k: linear(v) for k, v in b["mlp"].items()}} for b in params["h"]]
    out = {**params, "h": h}
    if embedding:
        out["wte"] = {**params["wte"], "weight": matrix(params["wte"]["weight"])}
    return out


def is_quantized(params: dict) -> bool:
    return any(isinstance(x, Int8Matrix) for x in tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Matrix)))


def matrices(params: dict) -> list[Int8Matrix]:
    """The tree's int8 matrices, in tree order."""
    return [x for x in tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Matrix)) if isinstance(x, Int8Matrix)]


# --- the products -------------------------------------------------------------------------

FBGEMM_AVAILABLE = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
    torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")  # x86 with AVX2 or better
# fbgemm's instruction sets that multiply u8 x s8 with VNNI (vpdpbusd: int32 sums); below
# them it uses AVX2's vpmaddubsw, whose int16 pair sums saturate. FBGEMM_ENABLE_INSTRUCTIONS
# caps the set fbgemm uses (AVX2, AVX512, AVX512_E1 = with VNNI, AVX512_VNNI, ...).
_FBGEMM_VNNI_SETS = ("AVX512_E1", "AVX512_VNNI", "AVX512_VNNI_BF16")


def fbgemm_sums_in_int16() -> bool:
    """Whether fbgemm's u8 x s8 kernel adds products in saturating int16 pairs on this
    machine: yes unless the CPU has AVX-512 VNNI and FBGEMM_ENABLE_INSTRUCTIONS allows it.
    The digits stay below 128 so that the answer does not matter for fgpt's products."""
    cap = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    vnni_allowed = not cap or cap in _FBGEMM_VNNI_SETS
    return not ({"avx512_vnni", "avx512bw"} <= cpu_flags() and vnni_allowed)


def choose_kernel(n_out: int, n_in: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                  kernel: str = "auto") -> str:
    """The kernel for an [n_out, n_in] int8 weight whose activations are `dtype` on `device`.
    "auto": on x86 CPUs fbgemm's or `_weight_int8pack_mm`, whichever `fastest_kernel`
    measures faster (where n_in fits the latter's loop); on other CPUs torch's; else the
    dequantised product (GPUs, float64). A kernel named that cannot run there is an error,
    not a fallback."""
    on_cpu = torch.device(device).type == "cpu" and dtype != torch.float64
    int8pack_fits = on_cpu and n_in % _KERNEL_K_MULTIPLE == 0
    runs = {"fbgemm": on_cpu and FBGEMM_AVAILABLE, "int8pack": int8pack_fits, "dequantised": True}
    if kernel != "auto":
        if kernel not in runs:
            raise FgptError(f"unknown int8 kernel {kernel!r}: choose from auto, {', '.join(KERNELS)}")
        if not runs[kernel]:
            raise FgptError(f"the int8 kernel {kernel} cannot run a {dtype} product on {device} "
                            f"with {n_in} inputs")
        return kernel
    if not on_cpu:
        return "dequantised"
    if FBGEMM_AVAILABLE and int8pack_fits:
        return fastest_kernel(n_out, n_in, dtype)
    return "fbgemm" if FBGEMM_AVAILABLE else "int8pack" if int8pack_fits else "dequantised"


def fastest_kernel(n_out: int, n_in: int, dtype: torch.dtype = torch.float32) -> str:
    """fbgemm's or `_weight_int8pack_mm`, whichever runs x [1, in] @ W.T faster on this
    machine for activations of `dtype`, measured once per shape per machine on one thread
    (`on_one_thread`) over copies that outgrow the caches; the pick then serves
    any number of rows. The digits cost a few small ops per product, so small matrices can
    favour torch's kernel and large ones fbgemm's."""
    def measure() -> str:
        x = torch.full((1, n_in), 0.5, dtype=dtype)
        q = [torch.ones(n_out, n_in, dtype=torch.int8) for _ in range(copies_past_the_caches(n_out * n_in))]
        candidates = {name: [lambda m=Int8Matrix(w, torch.full((n_out,), 0.01, dtype=dtype), name): m.matmul(x)
                             for w in q] for name in ("fbgemm", "int8pack")}
        return on_one_thread(lambda: fastest(candidates))
    return measured_once("int8 kernels", f"int8 {dtype} {n_out}x{n_in}", measure, ("fbgemm", "int8pack"))


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


def _fbgemm_matmul(x, m: Int8Matrix, bias):
    e, step = digits(x)
    M, K = x.shape
    # scale 1, zero point 64: the kernel's uint8 input is e + 64, the digit in [0, 127]
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        e.view(M * 3, K), 1.0, _ZERO, m.fbgemm_pack).view(M, 3, -1)
    places = (step * _PLACES)[:, None]  # [M, 1, 3]: each row's step times each digit's place
    y = torch.bmm(places, out) if bias is None else torch.baddbmm(bias.float(), places, out)
    return y.view(M, -1).to(x.dtype)


def _int8pack_matmul(x, m: Int8Matrix, bias):
    # a fresh bf16 copy: the kernel's aligned vector loads need an aligned start
    xk = x.to(KERNEL_DTYPE, copy=True, memory_format=torch.contiguous_format)
    y = torch._weight_int8pack_mm(xk, m.q, m.scale.to(KERNEL_DTYPE)).to(x.dtype)
    return y if bias is None else y + bias


def _dequantised_matmul(x, m: Int8Matrix, bias):
    y = x @ (m.q.to(x.dtype) * m.scale.to(x.dtype)[:, None]).T
    return y if bias is None else y + bias


_MATMULS = {"fbgemm": _fbgemm_matmul, "int8pack": _int8pack_matmul, "dequantised": _dequantised_matmul}
KERNELS = tuple(_MATMULS)
