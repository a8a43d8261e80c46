"""What glibc's malloc does with large freed blocks: keep them for the next step (training)
or hand them back to the OS at once (memory measurements). No-ops where libc is not glibc.

By default glibc serves a block over its mmap threshold (at most 32 MiB) with a fresh mmap
and unmaps it when freed, so the kernel zero-fills every page of it again on first touch. A
training step of GPT-2 124M allocates and frees gigabytes that way: 416,000 minor page
faults per eager bf16 step, and the step ran 14% faster without them (docs/performance.md,
"The heap"). `keep_freed_memory` serves every block from the heap and never trims it, so
each step reuses the pages the last one freed. The price: the process holds a step's peak
between steps, and the heap's fragmentation raised that peak, by 15% for 124M in bf16 at
4 x 256 (3,418 against 2,962 MiB resident, flat from the 9th step to the 45th). `run.train
--heap glibc` trades the speed back for it. The setting lasts for the process: `train()`
called in-process (the study, the tests) leaves it on; `release_freed_memory` turns it off.
"""

from __future__ import annotations

import ctypes

from fgpt.errors import FgptError

HEAPS = ("kept", "glibc")  # run.train --heap
_kept = False  # whether this process keeps freed memory now
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
GLIBC_TRIM_DEFAULT, GLIBC_MMAP_MAX_DEFAULT = 128 * 2 ** 10, 65536


def check(value: str) -> str:
    if value not in HEAPS:
        raise FgptError(f"--heap must be one of {', '.join(HEAPS)}, got {value!r}")
    return value


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):  # not glibc
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap (no mmap at all: glibc takes that on every
    version, where a threshold over 32 MiB is refused by some) and never trim it (-1), so
    freed memory stays for reuse: the training loop's setting. Returns whether it took
    effect (False where libc is not glibc)."""
    global _kept
    _kept = _mallopt(M_MMAP_MAX, 0) and _mallopt(M_TRIM_THRESHOLD, -1)
    return _kept


def current() -> str:
    """The heap this process runs on now: "kept" or "glibc" (what a timing depends on)."""
    return "kept" if _kept else "glibc"


def release_freed_memory() -> None:
    """Hand large freed blocks straight back to the OS (mmap threshold 64 KiB, the default
    trim) and trim what is held now, so the resident set tracks live tensors: the setting of
    every memory measurement (fgpt.measure.peak_rss_growth)."""
    global _kept
    _kept = False
    _mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX_DEFAULT)
    _mallopt(M_MMAP_THRESHOLD, 1 << 16)
    _mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_DEFAULT)
    _trim()
