"""`just gpu-check`: what fgpt can only check on a GPU, in one command, ending in one table.
It starts no check once its time budget (`--budget-s`, 480 s by default) is spent.

1. the suite's CUDA tests (tests/test_cuda.py: transformers parity of logits, gradients and
   greedy text on CUDA, int8 and bf16 decoding, training against the CPU run, the flex
   window kernel's backward);
2. every strategy on NCCL over all the GPUs here, against the single-device run (fp32
   losses step for step);
3. GPT-2 124M bf16 training tokens/s and MFU, fgpt and transformers, eager and compiled,
   and a windowed 124M with the band and the flex kernels;
4. greedy decode tokens/s per dtype against transformers (`just bench generate`'s rows).

On a machine without CUDA it says so in one line and exits 0. A check that fails is a
FAIL row (the script then exits 1); a check the time budget no longer allows is "skipped".
`--rehearse` runs the same code on this machine's CPU at toy sizes (tiny model, fp32, gloo
over 2 processes; the flex kernel, which trains on CUDA only, is skipped), so a broken
check shows up here and not in the first minutes of a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from run._cli import summary

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ("ddp", "fsdp", "custom-fsdp")
TEXT = "".join(f"def add_{i % 7}(x):\n    return x + {i % 7}\n\n" for i in range(3000))


@dataclass(frozen=True)
class Scale:
    """What the checks run on, and how big."""
    device: str
    model: str  # a GPTConfig preset
    batch: int  # training rows of seq_len tokens
    seq_len: int
    window: int  # the windowed model's W
    precision: str  # training precision: "bf16" or "fp32"
    timed_steps: int  # after 3 warm-up steps (allocator, autotuning, compilation)
    decode_tokens: int

    @property
    def nproc(self) -> int:
        return torch.cuda.device_count() if self.device == "cuda" else 2

    @property
    def backend(self) -> str:
        return "NCCL" if self.device == "cuda" else "gloo"

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


GPU = Scale("cuda", "gpt2", batch=8, seq_len=1024, window=256, precision="bf16", timed_steps=10, decode_tokens=128)
REHEARSAL = Scale("cpu", "tiny", batch=2, seq_len=64, window=16, precision="fp32", timed_steps=1, decode_tokens=8)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: a timeout kills torchrun's workers too, not
    only the agent, so no orphan keeps holding a GPU."""
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_tests(budget: Budget, scale: Scale) -> list[tuple[str, str, str]]:
    out = run_group([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                    cwd=ROOT, timeout=max(30, min(240, budget.left() - 300)))
    last = (out.stdout.strip().splitlines() or ["no output"])[-1]
    if out.returncode != 0:
        status = "FAIL"
    elif " passed" in last:
        status = "ok"
    else:  # all skipped: expected without CUDA (the rehearsal); on a GPU a failure, not "ok"
        status = "FAIL" if torch.cuda.is_available() else "skipped"
    return [("CUDA tests (tests/test_cuda.py)", status, last)]


def train_losses(out: Path, data: Path, strategy: str, nproc: int, batch: int, timeout: float,
                 device: str) -> list[float]:
    args = ["-m", "run.train", "--model", "tiny", "--n-ctx", "64", "--steps", "6", "--batch-size", str(batch),
            "--lr", "3e-3", "--precision", "fp32", "--eval-interval", "0", "--data", str(data),
            "--out", str(out), "--no-progress", "--device", device]
    if strategy == "single":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *args, "--strategy", strategy]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FGPT_CACHE": str(out.parent / "cache")}
    done = run_group(cmd, timeout, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1])
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_strategies(budget: Budget, scale: Scale) -> list[tuple[str, str, str]]:
    n, on = scale.nproc, f"on {scale.backend} x{scale.nproc}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "code.txt"
        data.write_text(TEXT)
        batch = 4 * n  # the single-device reference trains the same global batch
        ref = train_losses(Path(tmp) / "single", data, "single", 1, batch, 120, scale.device)
        for strategy in STRATEGIES:
            if budget.left() < 240:
                rows.append((f"{strategy} {on}", "skipped", "time budget"))
                continue
            try:
                losses = train_losses(Path(tmp) / strategy, data, strategy, n, batch, 120, scale.device)
                diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
                ok = len(losses) == len(ref) and diff < 1e-3  # TF32 may be on: 1e-3, not fp32's 1e-6
                rows.append((f"{strategy} {on} vs single", "ok" if ok else "FAIL",
                             f"{len(losses)} steps, largest relative loss difference {diff:.1e}"))
            except Exception as e:  # noqa: BLE001 -- a row, not a crash
                rows.append((f"{strategy} {on}", "FAIL", str(e)[:120]))
    return rows


def run_training_speed(budget: Budget, scale: Scale, compile: bool) -> list[tuple[str, str, str]]:
    from fgpt import GPTConfig
    from fgpt.training.metrics import flops_per_token, peak_flops
    from run.bench.train import fgpt_step, hf_model, hf_step

    config, B, T = GPTConfig.preset(scale.model), scale.batch, scale.seq_len
    device, precision = scale.device, scale.precision
    autocast = precision == "bf16"
    peak = peak_flops(device, torch.bfloat16 if autocast else torch.float32)
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, config.vocab_size, (B, T), generator=gen).to(device) for _ in range(2)]
    hf = hf_model(config, device)
    hf_name = "transformers bf16 autocast" if autocast else "transformers fp32"
    contenders = {hf_name: lambda: hf_step(hf, autocast=autocast, fused=True),
                  f"fgpt {precision}": lambda: fgpt_step(config, precision, device)}
    if compile:
        contenders[f"{hf_name}, compiled"] = lambda: hf_step(hf, autocast=autocast, fused=True, compile=True)
        contenders[f"fgpt {precision}, compiled"] = lambda: fgpt_step(config, precision, device, compile=True)
    windowed = config.replace(window=scale.window)
    band = f"fgpt {precision}, window {scale.window}, band kernel"
    for kernel in ("band", "flex"):
        contenders[f"fgpt {precision}, window {scale.window}, {kernel} kernel"] = (
            lambda kernel=kernel: fgpt_step(windowed, precision, device, window_kernel=kernel))
    rows, rate = [], {}
    for name, build in contenders.items():
        label = f"train {scale.model} {precision} {B}x{T}: {name}"
        if budget.left() < 90:
            rows.append((label, "skipped", "time budget"))
            continue
        if "flex" in name and device != "cuda":
            rows.append((label, "skipped", "torch's flex attention trains on CUDA only"))
            continue
        try:
            step = build()
            for _ in range(3):  # warm-up: allocator, autotuning, compilation
                step(*batch)
            scale.sync()
            start, n = time.perf_counter(), scale.timed_steps
            for _ in range(n):
                step(*batch)
            scale.sync()
            rate[name] = tok_s = n * B * T / (time.perf_counter() - start)
            if "window" in name:  # fewer attention FLOPs than the full model: no MFU
                detail = f"{tok_s:,.0f} tokens/s"
                if "flex" in name and band in rate:
                    detail += f", {tok_s / rate[band]:.2f}x the band kernel"
            else:
                mfu = flops_per_token(config, T) * tok_s / peak
                tflops = f"{peak / 1e12:.0f}" if peak >= 1e13 else f"{peak / 1e12:.2g}"  # a GPU's, a CPU's
                detail = (f"{tok_s:,.0f} tokens/s, MFU {mfu:.1%} of the measured {precision} matmul peak "
                          f"{tflops} TFLOP/s")
                if hf_name in rate:  # its row may have failed
                    detail += f", {tok_s / rate[hf_name]:.2f}x transformers eager"
            rows.append((label, "ok", detail))
        except Exception as e:  # noqa: BLE001
            rows.append((label, "FAIL", str(e)[:120]))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_decode(budget: Budget, scale: Scale) -> list[tuple[str, str, str]]:
    from run.bench import generate as bench_generate
    if budget.left() < 60:
        return [(f"decode {scale.model}", "skipped", "time budget")]
    result = bench_generate.measure(scale.model, new_tokens=scale.decode_tokens, repeats=2, device=scale.device)
    ref = result["rate"]["transformers", "float32"]
    return [(f"decode {scale.model} batch 1: {engine} {dtype}", "ok",
             f"{r:.0f} tokens/s, {r / ref:.2f}x transformers fp32")
            for (engine, dtype), r in result["rate"].items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="just gpu-check", description=summary(__doc__))
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting checks after this long")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument("--rehearse", action="store_true",
                    help="run every check on this machine's CPU at toy sizes, to see that the script works")
    args = ap.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check "
              "(--rehearse runs the checks on the CPU at toy sizes)")
        return 0
    from fgpt.measure import machine_line
    scale = REHEARSAL if args.rehearse else GPU
    budget = Budget(args.budget_s)
    rows: list[tuple[str, str, str]] = []
    checks = (run_tests, run_strategies, lambda b, s: run_training_speed(b, s, not args.no_compile), run_decode)
    for check in checks:
        try:
            rows += check(budget, scale)
        except Exception as e:  # noqa: BLE001 -- one table whatever breaks
            rows.append((getattr(check, "__name__", "check"), "FAIL", str(e)[:120]))
    machines = f"{torch.cuda.device_count()} GPU(s)" if scale.device == "cuda" else "a rehearsal on the CPU"
    print(f"gpu-check {time.strftime('%Y-%m-%d')}: {machine_line()}, {machines}")
    print("| check | result | detail |\n|---|---|---|")
    for name, status, detail in rows:
        print(f"| {name} | {status} | {detail} |")
    return 1 if any(status == "FAIL" for _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
