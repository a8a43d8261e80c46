"""TrainConfig: one training run's settings, and every check of them that needs no data,
no weights and no process group, so a launcher can refuse a bad flag before any rank starts.

    run = TrainConfig(model=GPTConfig.preset("tiny"), steps=100, out="out/run")
    validate(run, world_size=2)   # FgptError: one line naming the flag
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from fgpt import heap, recompute, tree
from fgpt.attention import check_window_kernel
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.parallel import STRATEGIES
from fgpt.parallel.process_group import resolve_device
from fgpt.training import attention_kernel, autocompile, precision

SCHEDULES = ("cosine", "wsd")
# Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"steps", "stop_after", "eval_interval", "eval_iters", "checkpoint_interval", "out",
                     "resume", "device", "compile", "progress", "window_kernel", "strategy", "reduce_dtype",
                     "recompute", "heap", "attention_kernel"}


@dataclass
class TrainConfig:
    """One run's settings. The defaults are `just train`'s embedded run: the tiny preset on
    the built-in corpus, 120 steps of 8 x 256 tokens."""
    model: GPTConfig | None = None  # None: the --init-from checkpoint's, else the tiny preset
    data: str | None = None  # text file / directory / glob; None = the built-in corpus
    text_field: str = "text"  # the JSONL field / Parquet column of --data holding the text
    steps: int = 120
    batch_size: int = 8  # global sequences per optimizer step (over micro-batches and ranks)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; None = lr / 10
    warmup: int | None = None  # warmup steps; None = min(100, steps // 10)
    schedule: str = "cosine"  # cosine | wsd (constant, then a linear cooldown; see lr_at)
    cooldown: float = 0.2  # wsd: the final fraction of the steps that decays to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # <= 0: no clipping
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where measurably faster: fgpt/training/precision.py)
    reduce_dtype: str = "fp32"  # fp32 | bf16: the dtype gradients cross ranks in
    eval_interval: int = 50  # 0: no evaluation
    eval_iters: int = 4  # validation batches per evaluation
    checkpoint_interval: int = 50  # 0: only the final checkpoint
    out: str | None = None  # None: nothing written (in-process use)
    resume: bool = False
    stop_after: int | None = None  # end this session after that step, checkpointed, as Ctrl-C would
    init_from: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "off"  # auto | on | off (run.train's default is auto: fgpt/training/autocompile.py)
    recompute: str = "none"  # none | attention | full: activations computed again in backward
    heap: str = "kept"  # kept | glibc: freed memory kept for the next step, or glibc's default (fgpt/heap.py)
    window_kernel: str = "band"  # kernel of windowed layers: band | flex | dense (fgpt.attention)
    attention_kernel: str = "auto"  # full causal layers: auto | sdpa | scores (fgpt/training/attention_kernel.py)
    strategy: str = "single"
    progress: bool = True

    @property
    def lr_floor(self) -> float:
        """min_lr, or its default."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup_steps(self) -> int:
        """warmup, or its default."""
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: what train_state.pt records (torch.load's weights_only reads it)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_hf_dict() if self.model else None
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d["model"] is not None:  # None: the run used the default (tiny or --init-from's) model
            d["model"] = GPTConfig.from_hf_dict(d["model"])
        d["betas"] = tuple(d["betas"])
        if isinstance(d.get("compile"), bool):  # recorded before --compile auto
            d["compile"] = "on" if d["compile"] else "off"
        return cls(**d)


def validate(run: TrainConfig, *, world_size: int = 1) -> None:
    """Raise FgptError for the first setting that cannot run on `world_size` ranks."""
    if run.strategy not in STRATEGIES:
        raise FgptError(f"unknown strategy {run.strategy!r}; choose from {', '.join(STRATEGIES)}")
    if run.steps < 1:
        raise FgptError(f"--steps must be at least 1, got {run.steps}")
    if run.batch_size < 1 or run.grad_accum < 1:
        raise FgptError("--batch-size and --grad-accum must be at least 1")
    check_batch_split(run, world_size)
    precision.check(run.precision)
    if run.reduce_dtype not in tree.COMPUTE_DTYPES:
        raise FgptError(f"--reduce-dtype must be fp32 or bf16, got {run.reduce_dtype!r}")
    if run.schedule not in SCHEDULES:
        raise FgptError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {run.schedule!r}")
    if not 0 < run.cooldown <= 1:
        raise FgptError(f"--cooldown must be in (0, 1], got {run.cooldown}")
    if not 0 < run.lr < math.inf:
        raise FgptError(f"--lr must be positive and finite, got {run.lr}")
    if run.min_lr is not None and not 0 <= run.min_lr <= run.lr:
        raise FgptError(f"--min-lr must be in [0, --lr {run.lr}], got {run.min_lr}")
    if run.warmup is not None and run.warmup < 0:
        raise FgptError(f"--warmup must be at least 0, got {run.warmup}")
    if not 0 <= run.weight_decay < math.inf:
        raise FgptError(f"--weight-decay must be at least 0 and finite, got {run.weight_decay}")
    if not run.grad_clip >= 0:
        raise FgptError(f"--grad-clip must be at least 0 (0: no clipping), got {run.grad_clip}")
    if not 0 <= run.seed < 2 ** 63:
        raise FgptError(f"--seed must be in [0, 2**63), got {run.seed}")
    if min(run.eval_interval, run.checkpoint_interval) < 0:
        raise FgptError("--eval-interval and --checkpoint-interval must be >= 0")
    if run.eval_interval and run.eval_iters < 1:
        raise FgptError("--eval-iters must be at least 1 when evaluating")
    if run.stop_after is not None and run.stop_after < 1:
        raise FgptError(f"--stop-after must be at least 1, got {run.stop_after}")
    if run.resume and not run.out:
        raise FgptError("--resume needs --out DIR: the run directory to continue")
    recompute.check(run.recompute)
    heap.check(run.heap)
    autocompile.check(run.compile)
    check_window_kernel(run.window_kernel)
    attention_kernel.check(run.attention_kernel)
    device = resolve_device(run.device)
    if run.strategy == "ddp" and run.reduce_dtype == "bf16":  # here, not in each rank
        from fgpt.parallel.ddp import check_bf16_reduction
        check_bf16_reduction("nccl" if device == "cuda" else "gloo")
    if run.window_kernel == "flex":  # fail before any work: no backward on CPU
        from fgpt.flex_window import check_trainable
        check_trainable(device)


def check_batch_split(run: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly into micro-batches on every rank."""
    if run.batch_size % (run.grad_accum * world_size):
        ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
        raise FgptError(f"--batch-size {run.batch_size} does not split into --grad-accum {run.grad_accum} "
                        f"micro-batches{ranks}")


def absolute_data(spec: str | None) -> str | None:
    """--data as an absolute path (a glob stays a glob): what a run records, so that it
    resumes from any directory."""
    return None if spec is None else os.path.abspath(os.path.expanduser(spec))


def resumed(run: TrainConfig, saved: TrainConfig, saved_model: GPTConfig) -> TrainConfig:
    """The settings a resume runs with: the saved run's, with `run`'s resumable changes.
    Any other difference is an error; `saved_model` is the checkpoint's model (a run
    recorded with no model config used the tiny preset or its --init-from's)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES or f.name == "init_from":
            continue
        mine, theirs = getattr(run, f.name), getattr(saved, f.name)
        if f.name == "precision" and mine == "auto":
            continue  # auto resumes with what it chose the first time
        if f.name == "model" and mine is not None:
            for m in dataclasses.fields(GPTConfig):
                if getattr(mine, m.name) != getattr(saved_model, m.name):
                    raise FgptError(f"--resume: {m.name} = {getattr(mine, m.name)!r} contradicts "
                                    f"the checkpoint's {getattr(saved_model, m.name)!r}")
        elif f.name == "data" and absolute_data(mine) == absolute_data(theirs):
            continue
        elif f.name != "model" and mine != theirs:
            raise FgptError(f"--resume: {f.name} = {mine!r} contradicts the checkpoint's {theirs!r}")
    return dataclasses.replace(saved, **{k: getattr(run, k) for k in RESUMABLE_CHANGES})
