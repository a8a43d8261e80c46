"""The interface between the training loop and a parallel strategy.

The loop (fgpt/training/train.py) owns the schedule, data, logging and checkpoint files; a strategy
owns where parameters, gradients and optimizer state live and how bytes move between
ranks. The loop only ever calls the methods below, so single / ddp / fsdp / custom-fsdp
are interchangeable.

Per optimizer step the loop does:

    for i, (x, y) in enumerate(micro_batches):          # this rank's slice of the global batch
        loss_i = strategy.forward_backward(x, y, scale=1/K, sync=(i == K-1))
    norm = strategy.clip_grad_norm(max_norm)            # global norm over all ranks/shards
    strategy.set_lr(lr); strategy.step()                # optimizer step, then zero grads
    loss = strategy.mean_across_ranks(sum(loss_i)/K)    # logged: mean over the global batch

and, to evaluate, `strategy.eval_loss(x, y)` per batch. Also here: what every strategy shares
(the --reduce-dtype names, AdamW's weight-decay groups). The saved optimizer state's format,
common to all strategies, is fgpt/parallel/optimizer_state.py.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import torch

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.parallel.optimizer_state import SavedOptimizer
from fgpt.tree import COMPUTE_DTYPES

# name -> "module:Class"; modules are imported on demand so single-device runs never
# import torch.distributed machinery.
STRATEGIES = {
    "single": "fgpt.parallel.single:SingleDevice",
    "ddp": "fgpt.parallel.ddp:DDP",
    "fsdp": "fgpt.parallel.fsdp:FSDP2",
    "custom-fsdp": "fgpt.parallel.custom_fsdp:CustomFSDP",
}


def parse_reduce_dtype(name: str) -> torch.dtype:
    """--reduce-dtype: the dtype gradients cross ranks in (accumulation stays fp32)."""
    if name not in COMPUTE_DTYPES:
        raise FgptError(f"--reduce-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def adamw_param_groups(named: dict[str, torch.Tensor], weight_decay: float) -> list[dict]:
    """AdamW's two groups over whole leaves: decay matrices and embeddings (>= 2-D), not
    biases or layer-norm gains (1-D)."""
    decay = [p for p in named.values() if tree.weight_decayed(p.shape)]
    no_decay = [p for p in named.values() if not tree.weight_decayed(p.shape)]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Strategy(abc.ABC):
    """One process's view of a (possibly distributed) training run."""

    name: str = "?"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def setup(self, params: dict, config: GPTConfig, *, lr: float, weight_decay: float,
              betas: tuple[float, float], precision: str) -> None:
        """Take the full fp32 parameter tree (identical on every rank: a fresh one, or on
        --resume the checkpoint's, followed by `load_optimizer_state`) and build the optimizer
        (torch.optim.AdamW; weight decay only on >=2-D leaves, see `adamw_param_groups`)."""

    @abc.abstractmethod
    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor, *, scale: float,
                         sync: bool) -> torch.Tensor:
        """Accumulate gradients of `scale * loss` for this rank's micro-batch; return the
        unscaled local loss (detached). `sync=False` lets a strategy skip gradient
        communication on accumulation micro-steps."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to `max_norm` by the global L2 norm over all parameters; return the norm
        before clipping (identical on every rank). max_norm <= 0: only measure."""

    def set_lr(self, lr: float) -> None:
        """Every strategy keeps a torch.optim optimizer in `self.optimizer`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abc.abstractmethod
    def step(self) -> None:
        """Optimizer step, then zero the gradients."""

    @abc.abstractmethod
    def full_params(self) -> dict:
        """The whole fp32 parameter tree on CPU (a collective: every rank must call it)."""

    @abc.abstractmethod
    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state, saveable with torch.save (tensors and plain data)."""

    @abc.abstractmethod
    def load_optimizer_state(self, saved: SavedOptimizer) -> None:
        """Restore the optimizer from a checkpoint of any strategy and world size."""

    @abc.abstractmethod
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of this rank's batch with dropout off and no gradients (the sharded
        strategies gather parameters for it: every rank calls it)."""

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank; every rank gets the same answer, so all of them
        take the same branch (stop, or raise the error rank 0 met)."""
        return bool(self.mean_across_ranks(torch.tensor(float(flag), device=self.device)) > 0)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_strategy(name: str, **kwargs) -> Strategy:
    if name not in STRATEGIES:
        raise FgptError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise FgptError(f"strategy {name!r} is not implemented yet") from None
        raise
    return getattr(mod, cls)(**kwargs)
