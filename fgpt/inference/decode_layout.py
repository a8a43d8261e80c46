"""The memory layout of each weight that makes one-token decode steps fastest on this machine.

A decode step multiplies one row vector by every weight W [in, out] (the head: W = wte.T).
The same W can be stored row-major as [in, out] or as [out, in] (its transpose's rows), and
which of the two the matrix-vector kernels read faster depends on the dtype, the shape and
the machine: MKL's fp32 product and torch's bf16 one disagree, and an AVX-512 CPU is not an
AVX2 one. So the choice is measured, once per (dtype, shape) per CPU machine (cached in
$FGPT_CACHE/measured.json, default ~/.cache/fgpt; `measured_once`, which says so on stderr
the first time), on enough copies of a matrix of that shape that they outgrow the caches
as the model does.
Only strides change: shapes and values stay, so `forward` runs on the result unchanged.
`just bench generate` shows the decode rates the chosen layouts reach. fgpt/inference/int8.py picks
its kernel per shape with the same measurement (`fastest`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from fgpt.atomic import atomic_write_text
from fgpt.measure import cpu_name, interleaved_best

IN_OUT, OUT_IN = "in_out", "out_in"
_MEASURE_BYTES = 64 << 20  # per layout: past a 32 MiB L3, as a model's weights are
_MAX_COPIES = 64
_chosen: dict[tuple, str] = {}  # (device, dtype, (in, out)) -> IN_OUT | OUT_IN


def stored_as(w: torch.Tensor, layout: str) -> torch.Tensor:
    """W [in, out] with the same values, its memory rows along `layout`."""
    return w.contiguous() if layout == IN_OUT else w.T.contiguous().T


def fastest_layout(shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str = "cpu",
                   repeats: int = 4) -> str:
    """IN_OUT or OUT_IN: whichever computes x [1, in] @ W [in, out] faster here. Measured on
    one CPU thread: which layout a kernel reads fast is a property of the kernel, and with
    one thread no product waits at a barrier for a thread that other work descheduled."""
    key = (str(device), dtype, tuple(shape))
    if key not in _chosen:
        measure = lambda: on_one_thread(lambda: _measure(tuple(shape), dtype, torch.device(device), repeats))  # noqa: E731
        _chosen[key] = (measured_once("weight layouts", f"layout {dtype} {tuple(shape)}", measure, (IN_OUT, OUT_IN))
                        if torch.device(device).type == "cpu" else measure())
    return _chosen[key]


# --- the per-machine cache of measured choices -------------------------------------------------

_announced: set[str] = set()


def measured_cache() -> Path:
    """Where measured choices are kept: $FGPT_CACHE/measured.json (default ~/.cache/fgpt)."""
    return Path(os.environ.get("FGPT_CACHE", Path.home() / ".cache" / "fgpt")) / "measured.json"


def _machine() -> str:
    """What a measured choice depends on: the CPU, its core count, torch and its kernels."""
    return f"{cpu_name()} | {os.cpu_count()} cpus | torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def measured_once(what: str, key: str, measure: Callable[[], str], choices: tuple[str, ...]) -> str:
    """This CPU machine's choice for `key`: from the cache file, or `measure()`d now (saying
    so on stderr, once per process and `what`) and added to it. A cache that is unreadable
    or names an unknown choice is measured over."""
    path, machine = measured_cache(), _machine()
    choice = _read_cache(path).get(machine, {}).get(key)
    if choice in choices:
        return choice
    if what not in _announced:
        _announced.add(what)
        logging.getLogger("fgpt").warning(
            "measuring the fastest %s for each weight shape on this machine: once per machine, a few "
            "seconds; cached in %s", what, path)
    choice = measure()
    cache = _read_cache(path)  # again: another process may have added to it meanwhile
    entries = cache.get(machine) if isinstance(cache.get(machine), dict) else {}
    cache[machine] = {**entries, key: choice}
    try:
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only home: measure again next time
        pass
    return choice


def on_one_thread(fn: Callable[[], str]) -> str:
    """fn() with torch on one thread (the reason is fastest_layout's), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def measured() -> dict[tuple, str]:
    """What this process has measured so far: (device, dtype, (in, out)) -> layout."""
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
    candidates = {layout: [lambda w=stored_as(torch.full(shape, 0.01, dtype=dtype, device=device), layout): x @ w
                           for _ in range(copies)] for layout in (IN_OUT, OUT_IN)}
    return fastest(candidates, repeats, device)


def decode_layout(params: dict) -> dict:
    """The same parameters with every float matrix of a decode step (block linears and the
    tied head) stored in its measured fastest layout. int8 matrices keep the layout their
    kernel reads (fgpt/inference/int8.py)."""

    def relayout(w):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            return w
        return stored_as(w, fastest_layout(tuple(w.shape), w.dtype, w.device))
    return map_step_matrices(params, relayout)


def map_step_matrices(params: dict, fn: Callable) -> dict:
    """params with fn(W) in place of every matrix W a decode step multiplies by as x @ W
    [in, out]: the block linears, and the tied head (W = wte.T; a result that is still a
    tensor goes back transposed, as wte)."""

    def block(b: dict) -> dict:
        return {**b, **{part: {k: {**v, "weight": fn(v["weight"])} for k, v in b[part].items()}
                        for part in ("attn", "mlp")}}

    wte = params["wte"]["weight"]
    head = fn(wte.T) if isinstance(wte, torch.Tensor) else wte
    head = head.T if isinstance(head, torch.Tensor) else head
    return {**params, "h": [block(b) for b in params["h"]], "wte": {**params["wte"], "weight": head}}
