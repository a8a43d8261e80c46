"""The training run every strategy repeats in the parity tests: a tiny GPT, fixed global
batches, the loop of fgpt/parallel/base.py (accumulate, clip, set_lr, step, log); and the
whole-loop runs (fgpt.training.train) that checkpoint on one world size and resume on another."""

from __future__ import annotations

from pathlib import Path

import torch

from fgpt import GPTConfig, tree
from fgpt.training.train import TrainConfig
from train_case import TEXT

CONFIG = GPTConfig(vocab_size=96, n_ctx=16, n_layer=2, n_head=4, n_embd=32)
HYPER = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
STEPS = 6
GLOBAL_BATCH = 12  # divisible by world sizes 1, 2, 3 times accumulation 1, 2
SEQ = 8
MAX_NORM = 0.5  # small enough that clipping acts on this model
# (strategy, grad accumulation, precision, steps)
CASES = [(name, accum, "fp32", STEPS) for name in ("ddp", "fsdp", "custom-fsdp") for accum in (1, 2)]
CASES += [(name, 1, "bf16", 2) for name in ("ddp", "fsdp", "custom-fsdp")]


def lr_at(step: int) -> float:
    return HYPER["lr"] * (1 + step) / STEPS  # changes every step, so set_lr matters


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step` (same on every rank and in every run)."""
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def train_steps(strategy, accum: int, steps: int, *, rank: int, world: int, start: int = 0) -> dict:
    """Steps start..steps-1; returns per-step logged losses and norms, and step-1 gradients."""
    losses, norms, grads = [], [], None
    for step in range(start, steps):
        x, y = batch(step)
        micro = GLOBAL_BATCH // (accum * world)
        xs = x.view(accum, world, micro, SEQ)[:, rank]  # [K, micro, T]: this rank's slices
        ys = y.view(accum, world, micro, SEQ)[:, rank]
        total = sum(strategy.forward_backward(xs[i], ys[i], scale=1 / accum, sync=i == accum - 1)
                    for i in range(accum))
        if step == 0:
            grads = gradient_tree(strategy)
        norms.append(strategy.clip_grad_norm(MAX_NORM))
        strategy.set_lr(lr_at(step))
        strategy.step()
        losses.append(float(strategy.mean_across_ranks(total / accum)))
    return {"losses": losses, "norms": norms, "grads": grads}


def gradient_tree(strategy) -> dict:
    """The whole accumulated gradient (distributed strategies gather it: a collective)."""
    if hasattr(strategy, "full_grads"):
        return strategy.full_grads()
    return tree.unflatten({k: p.grad.detach().clone() for k, p in strategy.named.items()})


# --- whole runs through fgpt.training.train: checkpoint resharding and --reduce-dtype -------------

TRAIN_MODEL = GPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32)  # GPT-2 vocabulary: real text
TRAIN_TEXT = TEXT
TRAIN_STEPS, STOP_AFTER = 6, 3


def train_run(root: Path, **kw) -> TrainConfig:
    """A run on `root`/text.txt; its global batch of 6 splits over 1, 2 and 3 ranks."""
    base = dict(model=TRAIN_MODEL, data=str(root / "text.txt"), steps=TRAIN_STEPS, batch_size=6,
                lr=3e-3, warmup=2, seed=0, eval_interval=0, checkpoint_interval=0, progress=False,
                device="cpu")
    return TrainConfig(**{**base, **kw})
