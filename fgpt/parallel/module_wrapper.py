"""An nn.Module face on the parameter tree, for torch's own wrappers (DDP, FSDP2).

`GPTModule` registers the tree's leaves as parameters under their HF dotted names
(`h.0.attn.c_attn.weight`) and runs the same pure functions from `fgpt.model`. Each block is
its own submodule whose `forward` is called, so FSDP2's per-module hooks gather it just
before use. `WrappedModuleStrategy` is what ddp and fsdp share: autograd on the wrapped
module, AdamW on its parameters.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.model import Positions, block, embed, head_loss
from fgpt.parallel.base import adamw_param_groups, parse_reduce_dtype
from fgpt.parallel.optimizer_state import SavedOptimizer, load_per_parameter, save_per_parameter, whole
from fgpt.parallel.process_group import DistributedStrategy


class ParamTree(nn.Module):
    """A nested dict of tensors as parameters / submodules; `tree()` reads them back."""

    def __init__(self, node: dict):
        super().__init__()
        # sorted, not the dict's insertion order: the same module for a fresh tree and for one
        # read back from safetensors (--resume), whose key order differs
        self._keys = sorted(node)
        for key in self._keys:
            value = node[key]
            if isinstance(value, torch.Tensor):
                self.register_parameter(key, nn.Parameter(value))
            else:
                self.add_module(key, ParamTree(value))

    def tree(self) -> dict:
        # Read the attributes on every call: FSDP2 swaps sharded and gathered parameters.
        return {k: (v.tree() if isinstance(v, ParamTree) else v)
                for k in self._keys for v in [getattr(self, k)]}


def cast_to(node: dict, dtype: torch.dtype | None) -> dict:
    """bf16 compute without an autocast: cast the (fp32) tree inside the differentiated call."""
    return node if dtype is None else tree.cast(node, dtype)


class Block(ParamTree):
    def __init__(self, node: dict, config: GPTConfig, layer: int, compute_dtype: torch.dtype | None,
                 recompute: str = "none", window_kernel: str = "band"):
        super().__init__(node)
        self.config, self.layer, self.compute_dtype = config, layer, compute_dtype
        self.recompute, self.window_kernel = recompute, window_kernel

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        p = cast_to(self.tree(), self.compute_dtype)
        return block(p, x, self.config, layer=self.layer, pos=pos, train=self.training,
                     recompute=self.recompute, window_kernel=self.window_kernel)


class GPTModule(nn.Module):
    """tokens, targets -> mean loss, through fgpt.model's embed / block / head_loss.
    `compute_dtype` casts the parameters for compute (ddp's bf16); fsdp leaves it None
    because its MixedPrecisionPolicy gathers in bf16 already. `recompute`: what each block
    computes again in backward (fgpt/recompute.py); `window_kernel`: how windowed layers compute."""

    def __init__(self, params: dict, config: GPTConfig, compute_dtype: torch.dtype | None = None,
                 recompute: str = "none", window_kernel: str = "band"):
        super().__init__()
        self.config, self.compute_dtype = config, compute_dtype
        self.root_keys = sorted(k for k in params if k != "h")  # ln_f, wpe, wte: one unit
        for key in self.root_keys:
            self.add_module(key, ParamTree(params[key]))
        self.h = nn.ModuleList(Block(p, config, i, compute_dtype, recompute, window_kernel)
                               for i, p in enumerate(params["h"]))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        root = cast_to({k: getattr(self, k).tree() for k in self.root_keys}, self.compute_dtype)
        x, pos = embed(root, tokens, self.config, train=self.training)  # [B, T, d]
        for blk in self.h:
            x = blk(x, pos)  # [B, T, d]
        return head_loss(root, x, targets, self.config)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class WrappedModuleStrategy(DistributedStrategy):
    """Autograd on a wrapped GPTModule; subclasses choose the wrapper and how to skip sync."""

    def __init__(self, device="auto", reduce_dtype: str = "fp32", **kwargs):
        super().__init__(device, **kwargs)
        self.reduce_dtype = parse_reduce_dtype(reduce_dtype)

    def wrap(self, params: dict, precision: str) -> nn.Module:
        """The GPTModule over `params` (of `self.config`), wrapped by torch."""
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def setup(self, params, config, *, lr, weight_decay, betas, precision):
        self.config = config
        params = tree.tree_map(lambda x: x.detach().to(self.device, torch.float32).clone(), params)
        self.model = self.wrap(params, precision)
        module = getattr(self.model, "module", self.model)  # DDP wraps; FSDP2 shards in place
        self.named = dict(module.named_parameters())  # HF dotted names
        self.optimizer = torch.optim.AdamW(adamw_param_groups(self.named, weight_decay), lr=lr,
                                           betas=betas, foreach=True)

    def forward_backward(self, tokens, targets, *, scale, sync):
        with contextlib.nullcontext() if sync else self.no_sync():
            loss = self.model(tokens.to(self.device), targets.to(self.device))
            (loss * scale).backward()
        return loss.detach()

    def eval_loss(self, tokens, targets):
        self.model.eval()  # dropout off
        try:
            with torch.no_grad():
                return self.model(tokens.to(self.device), targets.to(self.device)).float()
        finally:
            self.model.train()

    def clip_grad_norm(self, max_norm):
        params = [p for p in self.named.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(full_tensor(norm))

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_grads(self) -> dict:
        """The whole fp32 gradient tree on CPU (a collective; for tests and debugging)."""
        return tree.unflatten({k: full_tensor(p.grad).detach().cpu().clone() for k, p in self.named.items()})

    def full_params(self):
        return tree.unflatten({k: full_tensor(p).detach().cpu().clone() for k, p in self.named.items()})

    def _local_part(self, p: torch.Tensor) -> tuple[int, int, torch.Size]:
        """The flat range [lo, hi) of parameter `p` this rank holds, and its local shape: all
        of it (ddp), or the rows of its dim-0 shard (fsdp: torch.chunk's, the last ones short)."""
        if not isinstance(p, DTensor):
            return whole(p)
        return (*dim0_shard_range(tuple(p.shape), self.rank, self.world_size), p.to_local().shape)

    def optimizer_state(self):
        return save_per_parameter(self.optimizer, self.named, self._local_part,
                                  lambda t: t.to_local() if isinstance(t, DTensor) else t)

    def load_optimizer_state(self, saved: SavedOptimizer):
        """Any strategy's checkpoint on any world size: each rank takes its own part of every
        parameter's moments (`SavedOptimizer.moment` opens only the files holding it)."""
        load_per_parameter(self.optimizer, self.named, saved, self.rank, self._local_part, as_sharded_like)


def dim0_shard_range(shape: tuple[int, ...], rank: int, world_size: int) -> tuple[int, int]:
    """The flat range of rank `rank`'s dim-0 shard as FSDP2 cuts it (torch.chunk: rows of
    ceil(rows / world_size), the last shards short or empty)."""
    rows, row = shape[0], math.prod(shape[1:])
    size = -(-rows // world_size)
    start, end = min(rank * size, rows), min((rank + 1) * size, rows)
    return start * row, end * row


def as_sharded_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a state tensor, placed like `param` (a DTensor for fsdp)."""
    value = value.to(param.device)
    if isinstance(param, DTensor):
        return DTensor.from_local(value, param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())  # uneven shards
    return value
