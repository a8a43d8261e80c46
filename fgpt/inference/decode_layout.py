"""The memory layout of each weight that makes one-token decode steps fastest on this machine.

A decode step multiplies one row vector by every weight W [in, out] (the head: W = wte.T).
The same W can be stored row-major as [in, out] or as [out, in] (its transpose's rows), and
the product can run as one matrix-vector kernel; or SPLIT: stored [out, in], as SPLIT_PARTS
blocks of rows in one torch.bmm, which spreads the blocks over torch's threads (on the
2-core EPYCs measured here, torch's fp32 product of one row ran on one core, MKL's choice
for a matrix this small, and at half the rate of the split one: docs/performance.md); or
PACKED: oneDNN's product over a copy of W reordered into its blocked layout for one row
(there, bf16 products read 1.5x as fast as torch's; the copy doubles W's memory).
Which is faster depends on the dtype, the shape and the machine: MKL's fp32 product and
torch's bf16 one disagree, and an AVX-512 CPU is not an AVX2 one. So the choice is
measured, once per (dtype, shape, thread count) per CPU machine (cached in $FGPT_CACHE/measured.json,
default ~/.cache/fgpt; `fgpt.machine_cache.measured_once`, which says so on stderr the first time), on enough
copies of a matrix of that shape that they outgrow the caches as the model does.
Shapes and values stay: a plain layout changes only strides, a split or packed one wraps the
weight in a `SplitMatrix` (a split one's products of several rows stay plain), so `forward` runs on the result
unchanged, up to the float rounding of another summation order.
`just bench generate` shows the decode rates the chosen layouts reach. fgpt/inference/int8.py picks
its kernel per shape with the same measurement (`fastest`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import optree
import torch
import torch.nn.functional as F

from fgpt import tree
from fgpt.errors import FgptError
from fgpt.machine_cache import measured_once
from fgpt.measure import interleaved_best

IN_OUT, OUT_IN, SPLIT, PACKED = "in_out", "out_in", "out_in_split", "onednn_packed"
LAYOUTS = (IN_OUT, OUT_IN, SPLIT, PACKED)
_MEASURE_BYTES = 64 << 20  # per layout: past a 32 MiB L3, as a model's weights are
_MAX_COPIES = 64
_chosen: dict[tuple, str] = {}  # (device, dtype, (in, out), threads) -> one of LAYOUTS


def stored_as(w: torch.Tensor, layout: str) -> torch.Tensor:
    """W [in, out] with the same values, its memory rows along `layout` (IN_OUT or OUT_IN)."""
    return w.contiguous() if layout == IN_OUT else w.T.contiguous().T


SPLIT_PARTS = 16  # blocks per split product: one per thread of a 16-core CPU (2 to 64 ran alike on 2 cores)


def split_product(blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, in] @ W (+ bias) -> [1, parts * rows], W given as `blocks` of its transpose's
    rows, [parts, rows, in]: parts matrix-vector products in one torch.bmm."""
    parts, _, n_in = blocks.shape
    column = x.T.expand(parts, n_in, 1)  # no copy; strides (0, 1, in): bmm ran 5x slower on (0, 1, 1)
    y = torch.bmm(blocks, column) if bias is None else torch.baddbmm(bias.reshape(parts, -1, 1), blocks, column)
    return y.view(1, -1)


@dataclass(frozen=True, eq=False)
class SplitMatrix:
    """W [in, out] kept as the rows of W.T [out, in], zero rows appended up to a multiple
    of `parts`, whose products of one row run as `split_product` over `parts` equal blocks
    (the padding's outputs dropped) and of several rows as the plain product. Used as the
    float weight it wraps is: `linear`; as the tied embedding table (then W = wte.T), `rows`
    and `unembed`. `parts` 1: the plain product always (the stored rows then need not be
    contiguous). A tree function (a cast, a move to another device) gives a SplitMatrix
    back, whose layout was measured for the old dtype and device: cast the plain parameters
    before `decode_layout` to have it measured for the new ones."""
    stored: torch.Tensor  # [out + padding, in]
    n_out: int
    parts: int

    @classmethod
    def of(cls, w: torch.Tensor, parts: int = SPLIT_PARTS) -> "SplitMatrix":
        """W [in, out] split in `parts` blocks (GPT-2's 50,257-row head gets 15 zero rows)."""
        n_in, n_out = w.shape
        stored = w.new_zeros(-(-n_out // parts) * parts, n_in)
        stored[:n_out] = w.T
        return cls(stored, n_out, parts)

    @property
    def weight(self) -> torch.Tensor:
        """W [in, out], a view."""
        return self.stored[:self.n_out].T

    @functools.cached_property
    def blocks(self) -> torch.Tensor:
        """The stored rows in `parts` blocks, [parts, rows, in]: a view, made once."""
        return self.stored.view(self.parts, -1, self.stored.shape[1])

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in] @ W (+ bias) -> [M, out]."""
        if x.shape[0] == 1 and self.parts > 1:
            if self.stored.shape[0] == self.n_out:
                return split_product(self.blocks, x, bias)
            y = split_product(self.blocks, x)[:, :self.n_out]
            return y if bias is None else y + bias
        return x @ self.weight if bias is None else torch.addmm(bias, x, self.weight)

    def linear(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight.T)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def rebuilt_rows(stored, shape: torch.Size, n_out: int):
    """A tree function's result for a wrapped matrix's stored rows: None where it is a
    tensor of their shape (rebuild the wrapper around it), else the result itself (not a
    tensor: a tree of shapes, say). A tensor of another shape is refused: it has no one
    meaning as W [in, out] or as the tied table."""
    if not isinstance(stored, torch.Tensor):
        return stored
    if stored.shape != shape:
        raise FgptError(f"a tree function changed a decode matrix's rows from {tuple(shape)} to "
                        f"{tuple(stored.shape)} ({n_out} rows are the matrix's)")
    return None


def _unflatten_split(aux, children):
    n_out, parts, shape = aux
    (stored,) = children
    other = rebuilt_rows(stored, shape, n_out)
    return other if other is not None else SplitMatrix(stored, n_out, parts)


def _flatten_split(m: SplitMatrix):
    return (m.stored,), (m.n_out, m.parts, m.stored.shape), ("stored",)


optree.register_pytree_node(SplitMatrix, _flatten_split, _unflatten_split, namespace=tree.NAMESPACE)


def fastest_layout(shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str = "cpu",
                   repeats: int = 4) -> str:
    """One of LAYOUTS: whichever computes x [1, in] @ W [in, out] fastest here, on torch's
    present number of threads (a SPLIT product's gain is in spreading its blocks over them,
    so the count is part of the question, and of the cache key). Each candidate counts by its
    fastest single call, which a call that waited at a barrier for a descheduled thread
    does not decide."""
    threads = torch.get_num_threads()
    key = (str(device), dtype, tuple(shape), threads)
    if key not in _chosen:
        measure = lambda: _measure(tuple(shape), dtype, torch.device(device), repeats)  # noqa: E731
        among = "/".join(LAYOUTS)  # a new candidate layout is measured again, not read from an older cache
        _chosen[key] = (measured_once("weight layouts", f"decode product {dtype} {tuple(shape)} on {threads} threads"
                                      f" among {among}", measure, LAYOUTS)
                        if torch.device(device).type == "cpu" else measure())
    return _chosen[key]


def decode_matrix(w: torch.Tensor, layout: str) -> torch.Tensor | SplitMatrix:
    """W [in, out] stored in `layout`: a tensor, for SPLIT a SplitMatrix, for PACKED a
    BatchedMatrix that multiplies every row count by oneDNN's product over its reordered
    copy (kept beside W, which the tied table's rows and tree functions still read)."""
    if layout == PACKED:
        from fgpt.inference.batched import BatchedMatrix  # a SplitMatrix with oneDNN's copy
        m = BatchedMatrix(w.T, w.shape[1], 1, min_rows=1, max_rows=1)
        _ = m.reordered  # made now, not in the first decode step
        return m
    return SplitMatrix.of(w) if layout == SPLIT else stored_as(w, layout)


def one_row_product(w: torch.Tensor | SplitMatrix, x: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ W, W as `decode_matrix` gives it."""
    return x @ w if isinstance(w, torch.Tensor) else w.matmul(x)


# --- measuring layouts: one thread, copies past the caches ---------------------------------------

def on_one_thread(fn: Callable[[], str]) -> str:
    """fn() with torch on one thread, then as before: where the question is which kernel
    reads a layout faster, one thread answers it, and never waits at a barrier for a thread
    that other work descheduled (on 2 threads at load 5 such waits once chose a bf16 layout
    20x slower than the other: docs/performance.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def measured() -> dict[tuple, str]:
    """What this process has measured so far: (device, dtype, (in, out), threads) -> layout."""
    return dict(_chosen)


def copies_past_the_caches(nbytes: int) -> int:
    """How many copies of an nbytes matrix to measure on: together they outgrow a 32 MiB L3."""
    return max(1, min(_MAX_COPIES, _MEASURE_BYTES // nbytes))


def fastest(candidates: dict[str, list[Callable[[], object]]], repeats: int = 4,
            device: torch.device | str = "cpu") -> str:
    """The candidate whose fastest single call is fastest (fgpt.measure.interleaved_best).
    Each call of a candidate reads another copy, as a decode step reads another weight; on
    cores shared with other work some calls wait for a descheduled thread, and a whole pass
    rarely escapes that. The first round warms up."""
    best = interleaved_best(candidates, repeats + 1, device=device)
    return min(best, key=best.get)


def _measure(shape, dtype, device, repeats) -> str:
    K, N = shape
    copies = copies_past_the_caches(K * N * torch.empty((), dtype=dtype).element_size())
    x = torch.full((1, K), 0.5, dtype=dtype, device=device)
    candidates = {}
    for layout in LAYOUTS:
        if layout == PACKED and not onednn_packs(dtype, device):
            continue
        candidates[layout] = [lambda w=decode_matrix(torch.full(shape, 0.01, dtype=dtype, device=device), layout):
                              one_row_product(w, x) for _ in range(copies)]
    return fastest(candidates, repeats, device)


# --- oneDNN's product over a weight reordered into its own blocked layout ----------------------

def onednn_available() -> bool:
    """oneDNN's reorder and linear ops are in this torch build (x86 and most ARM CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def reorder_for_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """W [in, out] as oneDNN's opaque blocked [out, in] weight, laid out for `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), rows)


def onednn_linear(x: torch.Tensor, reordered: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, reordered, bias, "none", [], "")


@functools.cache
def onednn_packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's reordered product runs here for `dtype` (its ops are in this torch
    build, the device is a CPU, and the CPU takes the dtype: bf16 is refused on some)."""
    if device.type != "cpu" or not onednn_available():
        return False
    try:
        onednn_linear(torch.ones(1, 8, dtype=dtype), reorder_for_rows(torch.ones(8, 8, dtype=dtype), 1), None)
    except RuntimeError:
        return False
    return True


def decode_layout(params: dict) -> dict:
    """The same parameters with every float matrix of a decode step (block linears and the
    tied head) in its measured fastest layout (`decode_matrix`). int8 matrices keep the
    layout their kernel reads (fgpt/inference/int8.py)."""

    def relayout(w):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            return w
        return decode_matrix(w, fastest_layout(tuple(w.shape), w.dtype, w.device))
    return map_step_matrices(params, relayout)


def map_step_matrices(params: dict, fn: Callable) -> dict:
    """params with fn(W) in place of every matrix W a decode step multiplies by as x @ W
    [in, out]: the block linears, and the tied head (W = wte.T; a result that is still a
    tensor goes back transposed, as wte). A weight that is not a tensor (a SplitMatrix, an
    int8 matrix) is given to fn as it is."""

    def block(b: dict) -> dict:
        return {**b, **{part: {k: {**v, "weight": fn(v["weight"])} for k, v in b[part].items()}
                        for part in ("attn", "mlp")}}

    wte = params["wte"]["weight"]
    head = fn(wte.T) if isinstance(wte, torch.Tensor) else fn(wte)
    head = head.T if isinstance(head, torch.Tensor) else head
    return {**params, "h": [block(b) for b in params["h"]], "wte": {**params["wte"], "weight": head}}
