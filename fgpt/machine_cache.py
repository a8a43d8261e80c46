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

import contextlib
import fcntl
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


def _entries(cache: dict) -> dict:
    entries = cache.get(machine())
    return entries if isinstance(entries, dict) else {}


@contextlib.contextmanager
def _locked():
    """The cache to read and change, alone: other processes wait at the lock file beside it,
    so that two measuring at once cannot drop each other's entries."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:  # a read-only home: read what there is, unlocked
        yield _read(path)
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _read(path)


def _store(cache: dict, key: str, value) -> None:
    cache[machine()] = {**_entries(cache), key: value}
    try:
        atomic_write_text(cache_path(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only home
        pass


def measured_once(what: str, key: str, measure: Callable[[], str], choices: tuple[str, ...]) -> str:
    """This machine's choice for `key`: from the cache, or `measure()`d now (saying so on
    stderr, once per process and `what`) and kept. A cached value that is not one of
    `choices` is measured over."""
    choice = _entries(_read(cache_path())).get(key)
    if choice in choices:
        return choice
    if what not in _announced:
        _announced.add(what)
        logging.getLogger("fgpt").warning(
            "measuring the fastest %s on this machine: once per machine and shape, a few seconds; "
            "cached in %s", what, cache_path())
    choice = measure()
    with _locked() as cache:
        _store(cache, key, choice)
    return choice


def fastest_seen(key: str, rate: float) -> float:
    """The larger of `rate`, just measured, and the fastest rate kept for `key` on this
    machine; the larger is kept. Deleting the cache file forgets it."""
    with _locked() as cache:
        kept = _entries(cache).get(key)
        if isinstance(kept, (int, float)) and kept >= rate:
            return float(kept)
        _store(cache, key, rate)
    return rate
