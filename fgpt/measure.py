"""Timing and memory measurement, shared by the benchmarks (`run/bench/`) and the study
(`fgpt/report`), so every table in the project is measured the same way.

    times = repeat_times(lambda: step(), repeats=5)       # seconds, one per run, after a warm-up
    stats = spread(times)                                 # {"median", "min", "max", "n"}
    grew = peak_rss_growth(lambda: step())                # bytes the resident set grew by, at most
    print(machine_line())                                 # CPU model, cores, threads, torch, load

Timings synchronise CUDA when a GPU is in use. Memory on CPU is the process's resident set
(Linux VmHWM), which sees every allocator; on CUDA it is torch's peak allocated bytes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def repeat_times(fn: Callable[..., object], repeats: int = 5, *, warmup: int = 1,
                 device: str | torch.device | None = None, setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of `repeats` calls of `fn`, after `warmup` untimed calls: wall-clock, or on a
    CUDA `device` CUDA events around the call (the GPU's own clock). With `setup`, each call
    is `fn(setup())` and only `fn` is timed (fresh state per run)."""
    call = fn if setup is None else (lambda: fn(state))
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            state = None  # the previous run's state goes before the next is made
            state = setup()
        _sync(device)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        else:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        if i >= warmup:
            times.append(seconds)
    return times


def best_time(fn: Callable[[], object], repeats: int = 3, **kwargs) -> float:
    """The fastest of `repeats` timed calls (the least disturbed by other work)."""
    return min(repeat_times(fn, repeats, **kwargs))


def interleaved_best(candidates: dict, rounds: int, *, device: str | torch.device | None = None,
                     give_up: Callable[[dict], bool] | None = None) -> dict:
    """Each candidate's fastest single call, in seconds: the one way the project times options
    to keep the fastest. A candidate is a callable or a list of them (say, the same product
    over several copies of a weight, as a decode step reads another weight each time).
    Round-robin over `rounds` rounds, so that load drifting on shared cores hits every
    candidate alike, and the minimum, the call least disturbed by other work. `give_up(best)`
    after a round ends the rounds early (a candidate already plainly slower)."""
    calls = {name: fns if isinstance(fns, (list, tuple)) else [fns] for name, fns in candidates.items()}
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fns in calls.items():
            for fn in fns:
                best[name] = min(best[name], best_time(fn, 1, warmup=0, device=device))
        if give_up is not None and give_up(best):
            break
    return best


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements, and how many there were."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def matmul_flops(device: str, dtype: torch.dtype, n: int = 1024) -> float:
    """FLOP/s of an n x n by n x n matmul in `dtype`: the best of three, or one call where a
    call takes seconds (bf16 on a CPU without bf16 units). The operands come from a private
    generator, so the global RNG (dropout's) is left alone."""
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2))
    slow = best_time(lambda: a[:64] @ b, 1, device=device) > 0.05
    return 2 * n ** 3 / best_time(lambda: a @ b, 1 if slow else 3, device=device)


# --- memory -----------------------------------------------------------------------------

def status_bytes(field: str, pid: int | str = "self") -> int:
    """A size field (VmRSS, VmHWM, ...) of /proc/<pid>/status in bytes; OSError where the
    process is gone or has no such field (an exited child's zombie has none)."""
    path = Path(f"/proc/{pid}/status")
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {field}")


def peak_rss_growth(fn: Callable[[], object], device: str | torch.device | None = None) -> int:
    """Bytes by which memory grew at its peak while `fn` ran: torch's peak allocation on
    CUDA; on CPU the resident set's high-water mark (Linux: VmHWM, reset through clear_refs)
    above its size at the start. Call `fgpt.heap.release_freed_memory()` once first so freed
    tensors leave the resident set."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    before = status_bytes("VmRSS")
    fn()
    return max(0, status_bytes("VmHWM") - before)


def in_child(module, function: str, *args):
    """`module.function(*args)` run in a fresh Python process (JSON arguments and result), for
    memory measurements: its glibc hands large frees back to the OS at once, so the resident
    set tracks live tensors, and no measurement inherits another's high-water mark."""
    code = ("import importlib, json, sys; f = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); "
            "print(json.dumps(f(*json.loads(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", code, module.__name__, function, json.dumps(args)],
                          capture_output=True, text=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
    if proc.returncode:
        raise RuntimeError(f"{function} failed in its child process: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the machine ------------------------------------------------------------------------

def copy_probe(nbytes: int = 256 << 20, device: str | torch.device = "cpu") -> tuple[Callable[[], object], int]:
    """A tensor copy over a buffer far larger than the caches, and the bytes it moves (read +
    written, as STREAM counts them): timed, the memory system's rate (`copy_bandwidth`)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes per second of `copy_probe`: the rate against which a step that must read N
    bytes has a floor of N / bandwidth seconds."""
    copy, moved = copy_probe(nbytes, device)
    return moved / best_time(copy, repeats, device=device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    """What a benchmark table must say about where it ran."""
    flags = cpu_flags()
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def machine_line() -> str:
    m = machine()
    isa = ", ".join(name for name in ("amx", "avx512_bf16") if m[name]) or "no AMX / avx512_bf16"
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    load = f", load average {m['load_average']}" if "load_average" in m else ""
    return (f"{m['cpu']} ({isa}), {m['cores']} cores, {m['threads']} torch threads{gpu}; "
            f"torch {m['torch']}, Python {m['python']}{load}")

