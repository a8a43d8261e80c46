"""The interface between the training loop and a parallel strategy.

The loop (fgpt/train.py) owns the schedule, data, logging and checkpoint files; a strategy
owns where parameters, gradients and optimizer state live and how bytes move between
ranks. The loop only ever calls the methods below, so single / ddp / fsdp / custom-fsdp
are interchangeable.

Per optimizer step the loop does:

    for i, (x, y) in enumerate(micro_batches):          # this rank's slice of the global batch
        loss_i = strategy.forward_backward(x, y, scale=1/K, sync=(i == K-1))
    norm = strategy.clip_grad_norm(max_norm)            # global norm over all ranks/shards
    strategy.set_lr(lr); strategy.step()                # optimizer step, then zero grads
    loss = strategy.mean_across_ranks(sum(loss_i)/K)    # logged: mean over the global batch
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fgpt.config import GPTConfig
from fgpt.errors import FgptError

# name -> "module:Class"; modules are imported on demand so single-device runs never
# import torch.distributed machinery.
STRATEGIES = {
    "single": "fgpt.parallel.single:SingleDevice",
    "ddp": "fgpt.parallel.ddp:DDP",
    "fsdp": "fgpt.parallel.fsdp:FSDP2",
    "custom-fsdp": "fgpt.parallel.custom_fsdp:CustomFSDP",
}


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_reduce_dtype(name: str) -> torch.dtype:
    """--reduce-dtype: the dtype gradients cross ranks in (accumulation stays fp32)."""
    if name not in REDUCE_DTYPES:
        raise FgptError(f"--reduce-dtype must be fp32 or bf16, got {name!r}")
    return REDUCE_DTYPES[name]


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state tensors, as torch.optim names them


def optimizer_pieces(step: float, pieces: dict[str, tuple[int, dict[str, torch.Tensor]]]) -> dict:
    """What every strategy's `optimizer_state()` returns, whatever it holds: the AdamW step and,
    per parameter (dotted path), the piece of its flattened moments this rank keeps, as
    (flat offset, {moment: 1-D tensor}). Whole leaves (single, ddp), row shards (fsdp) and
    flat-buffer shards (custom-fsdp) all fit, so any strategy resumes any other's checkpoint
    on any world size."""
    return {"step": step, "pieces": pieces}


def adamw_step(optimizer: torch.optim.Optimizer) -> float:
    """AdamW's step count (the same for every parameter once one step was taken)."""
    return max((float(s["step"]) for s in optimizer.state.values()), default=0.0)


Part = Callable[[torch.Tensor], tuple[int, int, torch.Size]]  # param -> (lo, hi, local shape)


def save_per_parameter(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor], part: Part,
                       local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """optimizer_state() of an optimizer over (possibly sharded) parameters: `part(p)` is the
    flat range of `p` this rank holds, `local` unwraps a sharded state tensor to that part."""
    return optimizer_pieces(adamw_step(optimizer), {
        path: (part(p)[0], {k: local(optimizer.state[p][k]).reshape(-1) for k in MOMENTS})
        for path, p in named.items() if p in optimizer.state})


def load_per_parameter(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor], saved: SavedOptimizer,
                       rank: int, part: Part, place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The inverse, from any saved layout: `place(p, values)` puts this rank's part where `p`
    lives (fresh tensors: nothing stays on the memory-mapped files)."""
    step = saved.step(rank)
    fused = bool(optimizer.defaults.get("fused"))  # fused AdamW keeps `step` on the device
    for path, p in named.items():
        lo, hi, shape = part(p)
        optimizer.state[p] = {"step": torch.tensor(step, device=p.device if fused else "cpu"),
                              **{k: place(p, saved.moment(path, k, lo, hi, rank).view(shape)) for k in MOMENTS}}


@dataclass(frozen=True)
class SavedOptimizer:
    """The optimizer states a run of `world_size` ranks saved, one per rank. `read(q)` returns
    what rank q's `optimizer_state()` returned, loaded lazily (memory-mapped), so a rank
    reads only the old ranks' files that hold what it needs."""
    world_size: int
    read: Callable[[int], dict[str, Any]]

    def step(self, rank: int) -> float:
        """The AdamW step count (every rank saved the same): from rank `rank`'s own file."""
        return float(self.read(rank if rank < self.world_size else 0)["step"])

    def moment(self, path: str, key: str, lo: int, hi: int, rank: int) -> torch.Tensor:
        """Flat elements [lo, hi) of parameter `path`'s moment `key`, put together from the
        saved pieces. Rank `rank`'s own file is read first: resuming on the same world size
        (or from replicated state) then never opens another."""
        out = torch.empty(hi - lo, dtype=torch.float32)
        missing = [(lo, hi)] if lo < hi else []  # an empty shard (fsdp: more ranks than rows)
        order = sorted(range(self.world_size), key=lambda q: q != rank)
        for q in order:
            if not missing:
                break
            piece = self.read(q)["pieces"].get(path)
            if piece is None:
                continue
            offset, values = piece[0], piece[1][key]
            still = []
            for a, b in missing:
                s, e = max(a, offset), min(b, offset + values.numel())
                if s < e:
                    out[s - lo:e - lo] = values[s - offset:e - offset]
                    still += [r for r in ((a, s), (e, b)) if r[0] < r[1]]
                else:
                    still.append((a, b))
            missing = still
        if missing:
            a, b = missing[0]
            raise FgptError(f"--resume: the saved optimizer state lacks {key} of {path}, flat elements [{a}, {b})")
        return out


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
        """Take the full fp32 parameter tree (identical on every rank) and build the
        optimizer (torch.optim.AdamW; weight decay only on >=2-D leaves)."""

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
    def load_params(self, params: dict) -> None:
        """Replace the parameters by a full tree (used by --resume)."""

    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor, config: GPTConfig) -> torch.Tensor:
        """Mean loss of this rank's batch, no gradients. This fallback gathers the full tree
        on CPU (a collective: every rank calls it); strategies override it to avoid that."""
        from fgpt.model import loss_fn
        with torch.no_grad():
            return loss_fn(self.full_params(), tokens.cpu(), targets.cpu(), config)

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value

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
