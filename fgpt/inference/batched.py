"""Weights for decode steps over several rows at once (a continuous batch, fgpt/serving).

A step over one row is a matrix-vector product per weight, bound by reading the weight once;
`decode_layout` stores each weight for that. A step over M rows could read each weight once
for all M rows, but torch's default float GEMM is not built for a handful of rows: it can
cost several times one row (docs/serve.md has the numbers). oneDNN's linear over a weight
reordered once into its own blocked layout comes much closer to reading it once per step.

`BatchedMatrix` keeps both: the weight in its decode layout for steps of few rows (a
SplitMatrix's split product for one row), the reordered copy (so the weight takes twice its
bytes) from `min_rows` rows up. Where the switch pays, if anywhere, is measured once per
(dtype, shape, batch size) per machine, on one thread (`on_one_thread`, cached by
`measured_once`). Shapes, values and results stay those of the plain
product, up to the float rounding of another summation order. Inference only: the reordered
product has no gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import optree
import torch

from fgpt import tree
from fgpt.errors import FgptError
from fgpt.inference.decode_layout import (IN_OUT, OUT_IN, SplitMatrix, copies_past_the_caches, map_step_matrices,
                                          on_one_thread, onednn_linear, onednn_packs, rebuilt_rows,
                                          reorder_for_rows, stored_as)
from fgpt.machine_cache import measured_once
from fgpt.measure import interleaved_best

NEVER = "never"


@dataclass(frozen=True, eq=False)
class BatchedMatrix(SplitMatrix):
    """W [in, out] (x @ W), multiplied as its decode layout has it (SplitMatrix; `parts` 1:
    the plain product) below `min_rows` rows and by oneDNN's over its copy reordered for
    `max_rows` rows from there up. Used as the float weight it wraps is: `linear`; as the
    tied embedding table (then W = wte.T), `rows` and `unembed`."""
    min_rows: int
    max_rows: int

    @functools.cached_property
    def reordered(self) -> torch.Tensor:
        return reorder_for_rows(self.weight, self.max_rows)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in] @ W (+ bias) -> [M, out]."""
        if x.shape[0] >= self.min_rows:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                raise FgptError("batched weights (fgpt.inference.batched) are for inference: they have no gradient")
            return onednn_linear(x, self.reordered, bias)
        return super().matmul(x, bias)


def _flatten(m: BatchedMatrix):
    aux = (m.n_out, m.parts, m.min_rows, m.max_rows, m.stored.shape, m.stored.dtype, m.stored.device)
    return (m.stored,), aux, ("stored",)


def _unflatten(aux, children):
    """A tree function's result: batched again where the rows kept the dtype and device the
    switch was measured for; else (a cast, a move to a GPU) a SplitMatrix, without oneDNN."""
    n_out, parts, min_rows, max_rows, shape, dtype, device = aux
    (stored,) = children
    other = rebuilt_rows(stored, shape, n_out)
    if other is not None:
        return other
    if (stored.dtype, stored.device) != (dtype, device):
        return SplitMatrix(stored, n_out, parts)
    return BatchedMatrix(stored, n_out, parts, min_rows, max_rows)


optree.register_pytree_node(BatchedMatrix, _flatten, _unflatten, namespace=tree.NAMESPACE)


def _row_counts(max_rows: int) -> list[int]:
    """The batch sizes measured: 2, 4, 8, ... up to max_rows (and max_rows itself)."""
    counts = [m for m in (2 ** k for k in range(1, 12)) if m < max_rows]
    return counts + [max_rows] if max_rows >= 2 else []


def _measure(shape: tuple[int, int], dtype: torch.dtype, max_rows: int, layout: str) -> str:
    """Plain (stored as `layout`, IN_OUT or OUT_IN) against reordered at each row count up
    to max_rows: `first_winning_rows`."""
    K, N = shape
    plain = [stored_as(torch.full(shape, 0.01, dtype=dtype), layout)
             for _ in range(copies_past_the_caches(K * N * dtype.itemsize))]
    packed = [reorder_for_rows(w, max_rows) for w in plain]
    faster = {}
    for M in _row_counts(max_rows):
        x = torch.full((M, K), 0.5, dtype=dtype)
        best = interleaved_best({"plain": [lambda w=w: x @ w for w in plain],
                                 "reordered": [lambda p=p: onednn_linear(x, p, None) for p in packed]}, 5)
        faster[M] = best["reordered"] < best["plain"]
    return first_winning_rows(faster)


def first_winning_rows(faster: dict[int, bool]) -> str:
    """The smallest row count from which the reordered product won at every measured count
    (faster[M]: it won at M rows), or NEVER."""
    winners = [M for M in faster if all(won for m, won in faster.items() if m >= M)]
    return str(min(winners)) if winners else NEVER


@functools.cache
def switch_rows(shape: tuple[int, int], dtype: torch.dtype, max_rows: int, layout: str = IN_OUT) -> int | None:
    """From how many rows BatchedMatrix should use the reordered product over a weight
    stored as `layout` (IN_OUT or OUT_IN: what the plain product reads), for steps of up to
    max_rows rows; None where it never pays (or oneDNN is missing, or refuses the dtype
    here: bf16 on some CPUs). Measured once per machine, on one thread (`on_one_thread`)."""
    if max_rows < 2 or not onednn_packs(dtype, torch.device("cpu")):
        return None
    choices = (*map(str, _row_counts(max_rows)), NEVER)
    choice = measured_once("batched products", f"batched {dtype} {shape} {layout} up to {max_rows} rows",
                           lambda: on_one_thread(lambda: _measure(shape, dtype, max_rows, layout)), choices)
    return None if choice == NEVER else int(choice)


def batched_layout(params: dict, max_rows: int) -> dict:
    """The same (decode-layout) parameters with each float matrix of a decode step, block
    linears and the tied head, a BatchedMatrix where the reordered product pays for steps of
    up to max_rows rows on this machine. CPU float trees only; others come back unchanged."""

    def wrap(w):
        if isinstance(w, BatchedMatrix):  # decode_layout's PACKED: oneDNN's product at every row count already,
            return w  # reordered for one row (for bf16 the hint made no difference up to 16 rows here)
        plain = w.weight if type(w) is SplitMatrix else w
        if not isinstance(plain, torch.Tensor) or not plain.is_floating_point() or plain.device.type != "cpu":
            return w
        layout = IN_OUT if plain.stride(1) == 1 else OUT_IN  # what its products of several rows read
        rows = switch_rows(tuple(plain.shape), plain.dtype, max_rows, layout)
        if rows is None:
            return w
        split = (w.stored, w.n_out, w.parts) if type(w) is SplitMatrix else (w.T, w.shape[1], 1)
        m = BatchedMatrix(*split, rows, max_rows)
        _ = m.reordered  # made now, not in the first batched step a user waits for
        return m
    return map_step_matrices(params, wrap)
