"""What this CPU machine has measured about itself, kept across processes in
$FGPT_CACHE/measured.json (default ~/.cache/fgpt), one entry per machine (`machine`):

    layout = measured_once("decode layouts", key, measure, LAYOUTS)   # a choice, measured once
    rate = fastest_seen("matmul bf16 1024^3 on 2 threads", measured)  # a rate, the best seen yet

A choice (the decode layouts, the int8 kernels, the batched products) is measured once and
then read back. A rate (the MFU yardstick) is measured by every process and the fastest
seen so far is kept: on shared cores a measurement can only come out slower than the
machine is, never faster. A cache that cannot be read is measured over; one that cannot be
written is left alone (the next process measures again).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from fgpt.atomic import atomic_write_text
from fgpt.measure import cpu_name

_announced: set[str] = set()


def cache_path() -> Path:
    return Path(os.environ.get("FGPT_CACHE", Path.home() / ".cache" / "fgpt")) / "measured.json"


def machine() -> str:
    """What a measurement depends on: the CPU, its core count, torch and its kernels."""
    return f"{cpu_name()} | {os.cpu_count()} cpus | torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _entries(path: Path) -> dict:
    entries = _read(path).get(machine())
    return entries if isinstance(entries, dict) else {}


def _store(key: str, value) -> None:
    path = cache_path()
    cache = _read(path)  # read again: another process may have added to it meanwhile
    cache[machine()] = {**_entries(path), key: value}
    try:
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only home
        pass


def measured_once(what: str, key: str, measure: Callable[[], str], choices: tuple[str, ...]) -> str:
    """This machine's choice for `key`: from the cache, or `measure()`d now (saying so on
    stderr, once per process and `what`) and kept. A cached value that is not one of
    `choices` is measured over."""
    choice = _entries(cache_path()).get(key)
    if choice in choices:
        return choice
    if what not in _announced:
        _announced.add(what)
        logging.getLogger("fgpt").warning(
            "measuring the fastest %s on this machine: once per machine and shape, a few seconds; "
            "cached in %s", what, cache_path())
    choice = measure()
    _store(key, choice)
    return choice


def fastest_seen(key: str, rate: float) -> float:
    """The larger of `rate`, just measured, and the fastest rate kept for `key` on this
    machine; the larger is kept."""
    kept = _entries(cache_path()).get(key)
    if isinstance(kept, (int, float)) and kept >= rate:
        return float(kept)
    _store(key, rate)
    return rate
