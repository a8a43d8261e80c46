"""Activation recomputation (checkpointing) in the functional style: memory for compute.

    y = recomputed(fn, *args)    # = fn(*args); backward runs fn again instead of keeping its insides

`fn` is a pure function of tensor trees (a block over its parameter dict and input). Its
forward runs without recording a graph, so only its inputs (`args`: a view of parameters the
caller holds anyway, and the block's input) stay alive until backward; the pullback runs `fn`
again under torch.func.vjp and pulls the output's gradient through that. One
`torch.autograd.Function` serves every strategy: plain autograd (ddp, fsdp, custom-fsdp) and
torch.func.vjp (single), which refuses the saved-tensor hooks `torch.utils.checkpoint` is
built on. The recomputation is the same kernels on the same inputs, so losses and gradients
equal those of keeping the activations; dropout replays the forward's random stream.

`--recompute` (RECOMPUTE) picks what a block recomputes: `none`; `attention`, the attention
half (ln_1, c_attn, attention, c_proj), keeping the MLP's activations; `full`, the whole block,
keeping one [B, T, d] input per block.
"""

from __future__ import annotations

from typing import Callable

import optree
import torch
from torch.func import vjp

from fgpt.errors import FgptError

RECOMPUTE = ("none", "attention", "full")


def check(mode: str) -> str:
    if mode not in RECOMPUTE:
        raise FgptError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {mode!r}")
    return mode


class _RNGState:
    """The random streams at a forward, in an object torch.func does not look into (it would
    wrap tensors passed to the Function as inputs)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


class _Recompute(torch.autograd.Function):
    """forward(fn, spec, rng, *leaves) = fn(*unflatten(spec, leaves)), nothing recorded;
    backward = vjp of fn at the saved leaves, run again (with the forward's RNG state)."""

    @staticmethod
    def forward(fn, spec, rng, *leaves):
        with torch.no_grad():
            return fn(*optree.tree_unflatten(spec, list(leaves)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, spec, rng, *leaves = inputs
        ctx.fn, ctx.spec, ctx.rng = fn, spec, rng
        ctx.save_for_backward(*leaves)

    @staticmethod
    def backward(ctx, grad):
        leaves = ctx.saved_tensors

        def again(*xs):
            return ctx.fn(*optree.tree_unflatten(ctx.spec, list(xs)))

        if ctx.rng is None:
            _, pullback = vjp(again, *leaves)
        else:  # dropout: the forward's draws again
            devices = [] if ctx.rng.cuda is None else [torch.cuda.current_device()]
            with torch.random.fork_rng(devices=devices):
                ctx.rng.restore()
                _, pullback = vjp(again, *leaves)
        return (None, None, None, *pullback(grad))


def recomputed(fn: Callable[..., torch.Tensor], *args, random: bool = False) -> torch.Tensor:
    """fn(*args), its activations recomputed in backward. `random`: fn draws random numbers
    (dropout), which backward must draw again alike. Without gradients, just fn(*args)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    leaves, spec = optree.tree_flatten(args)
    rng = _RNGState(leaves[0].device) if random else None
    return _Recompute.apply(fn, spec, rng, *leaves)
