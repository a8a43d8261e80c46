"""What a training run reports per step: its metrics row (throughput, MFU), the progress bar
and rank 0's metrics.jsonl (through fgpt.training.run_dir)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.machine_cache import fastest_seen
from fgpt.measure import matmul_flops
from fgpt.model import count_params
from fgpt.parallel import Strategy
from fgpt.training import run_dir
from fgpt.training.run_config import TrainConfig


def flops_per_token(model_config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the matmuls, plus attention scores."""
    return 6 * count_params(model_config) + 12 * model_config.n_layer * model_config.n_embd * seq_len


@functools.cache
def measured_flops(device: str, dtype: torch.dtype) -> float:
    """This device's matmul FLOP/s in `dtype` now (one measurement per process): what a step
    takes at this moment's speed, load included (`--compile auto`'s estimate)."""
    return matmul_flops(device, dtype, 4096 if device == "cuda" else 1024)


def peak_flops(device: str, dtype: torch.dtype) -> float:
    """The yardstick for the MFU estimate: on a CPU the fastest `measured_flops` this machine
    has had on this many threads, in this process or an earlier one (fgpt.machine_cache): a
    measurement taken while other work shares the cores comes out slow, and a slow yardstick
    makes every MFU above it read high (a default run's once read 82% at the speed that read
    50-55% in the run before it). So MFU errs low, never high; deleting the cache forgets it."""
    rate = measured_flops(device, dtype)
    if torch.device(device).type != "cpu":
        return rate
    return fastest_seen(f"matmul {dtype} 1024^3 on {torch.get_num_threads()} threads, FLOP/s", rate)


class StepLog:
    """Each step's metrics row (throughput, MFU), the progress bar and rank 0's metrics file."""

    def __init__(self, run: TrainConfig, strategy: Strategy, model_config: GPTConfig, *, first: int,
                 elapsed_s: float):
        out = Path(run.out) if run.out and strategy.is_main else None
        self.metrics = run_dir.MetricsLog(out, keep_until=first) if out else None
        self.tokens_per_step = run.batch_size * model_config.n_ctx
        self.flops_per_step = flops_per_token(model_config, model_config.n_ctx) * self.tokens_per_step
        peak = peak_flops(strategy.device.type, tree.COMPUTE_DTYPES[run.precision]) if strategy.is_main else 1.0
        self.peak_all_ranks = peak * strategy.world_size
        self.bar = tqdm(total=run.steps, initial=first, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (run.progress and strategy.is_main))
        self.t0 = time.perf_counter() - elapsed_s

    def elapsed_s(self) -> float:
        """Training time of the whole run, across resumes."""
        return time.perf_counter() - self.t0

    def row(self, n: int, *, loss: float, lr: float, grad_norm: float, step_s: float) -> dict:
        return {"step": n, "loss": loss, "lr": lr, "tokens": n * self.tokens_per_step,
                "elapsed_s": round(self.elapsed_s(), 4), "grad_norm": grad_norm,
                "tokens_per_s": self.tokens_per_step / step_s,
                "mfu": self.flops_per_step / step_s / self.peak_all_ranks}

    def write(self, row: dict) -> None:
        if self.metrics:
            self.metrics.append(row)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             mfu=f"{row['mfu']:.1%}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
