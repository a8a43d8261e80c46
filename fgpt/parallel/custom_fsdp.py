"""custom-fsdp: ZeRO-3 by hand, on the same pure functions as single-device training.

The model is cut into units: the root (wte, wpe, ln_f: embedding and tied head) and one
unit per block. Each unit is one flat padded buffer (fgpt/parallel/flat.py); rank r keeps
only its shard: fp32 master weights, fp32 gradients and AdamW's two moments. Every byte
that crosses ranks moves in this file:

  forward   all_gather_into_tensor(block i+1) is in flight while block i computes; after
            block i the gathered buffer's storage is freed (resized to 0 bytes).
  backward  the same buffer is gathered again (block i-1 prefetched while block i runs
            backward) and autograd runs over that one block; its gradient is
            reduce_scatter_tensor'ed (sum, then / world size = mean) into the local shard,
            asynchronously, overlapping the next block's backward.
  clip      one all_reduce of the shards' squared norms (padding excluded).
  step      AdamW on local shards only: no communication.
  save      each rank writes its shard's AdamW moments (flat buffers in the unit's layout)
            cut per parameter, so any strategy resumes it on any world size.

By default backward keeps the forward's activations and re-gathers only the parameters (as
FSDP2 does); `--recompute attention|full` frees them and computes each block again inside
its backward, from the re-gathered parameters (fgpt/recompute.py). Autograd's saved tensors are views of the gathered buffer, so refilling the same storage in
backward makes them valid again; the gather writes through an alias with its own version
counter, so autograd does not mistake the refill for an in-place edit.

Collectives stay outside differentiated code: each segment (embed, block i, head) is a
plain autograd graph from a detached input, walked in reverse with torch.autograd.grad.
Micro-steps with sync=False keep each unit's unsharded fp32 gradient locally (no
communication; costs 4 bytes/parameter until the synced micro-step reduce-scatters it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fgpt import tree
from fgpt.model import block, embed, head_loss
from fgpt.parallel.base import parse_reduce_dtype
from fgpt.parallel.optimizer_state import MOMENTS, SavedOptimizer, adamw_step, optimizer_pieces
from fgpt.parallel.process_group import DistributedStrategy, all_gather_into_tensor, reduce_scatter_tensor
from fgpt.parallel.flat import FlatLayout, Segment
from fgpt.tree import COMPUTE_DTYPES


class Unit:
    """One all-gather unit: its layout, this rank's shards, and the gathered buffer."""

    def __init__(self, params: dict, world_size: int, rank: int, device: torch.device,
                 compute_dtype: torch.dtype):
        self.layout = FlatLayout(params, world_size)
        self.shard = self.layout.shard(self.layout.pack(params).to(device), rank).clone()  # fp32 master
        # AdamW's parameters: the shard's decayed / undecayed runs (views, padding excluded)
        self.segments = segment_params(self.layout, self.shard, rank)
        # AdamW's moments as flat shards in the same layout (padding zero): the optimizer
        # updates views of them in place, and a checkpoint saves them as they are
        self.moments = {key: torch.zeros_like(self.shard) for key in MOMENTS}
        # fp32 gradient shard, mean over ranks; None between step() and the next reduce, so
        # it costs no memory through the forward (as FSDP2's set_to_none)
        self.grad: torch.Tensor | None = None
        self.unsharded_grad: torch.Tensor | None = None  # accumulation across sync=False steps
        # The gathered parameters; its storage is empty except between a gather and a free.
        self.full = torch.empty(self.layout.padded_numel, dtype=compute_dtype, device=device)
        self._bytes = self.full.untyped_storage().nbytes()
        self.free()
        self._gather = None

    def start_gather(self) -> None:
        storage = self.full.untyped_storage()
        storage.resize_(self._bytes)
        target = torch.empty(0, dtype=self.full.dtype, device=self.full.device).set_(
            storage, 0, self.full.shape)  # same bytes, own version counter
        local = self.shard.to(self.full.dtype)  # [shard_numel]: bf16 gathers cast here
        self._gather = (all_gather_into_tensor(target, local, async_op=True), local)

    def wait_gather(self) -> list[torch.Tensor]:
        """Finish the gather; the unit's leaves (slot order) as views of the gathered buffer,
        each an autograd leaf so a segment's backward yields exactly their gradients."""
        self._gather[0].wait()
        self._gather = None
        leaves = self.layout.leaf_views(self.full)
        if torch.is_grad_enabled():
            for leaf in leaves:
                leaf.requires_grad_()
        return leaves

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)


def leaf_parts(layout: FlatLayout, rank: int):
    """Per leaf that rank `rank`'s shard touches: (its path in the unit, [lo, hi) in the
    flattened leaf, [a, b) in the shard). Padding is in no leaf."""
    start = rank * layout.shard_numel
    for slot in layout.slots:
        a = max(slot.offset, start)
        b = min(slot.offset + slot.numel, start + layout.shard_numel)
        if a < b:
            yield slot.path, (a - slot.offset, b - slot.offset), (a - start, b - start)


def segment_params(layout: FlatLayout, shard: torch.Tensor, rank: int) -> list[tuple[Segment, torch.Tensor]]:
    """The runs of real parameters in a master shard, each a view AdamW optimizes in place;
    padding is in no run, so the optimizer never touches it."""
    return [(seg, shard[seg.lo:seg.hi]) for seg in layout.segments(rank)]


def attach_grads(segments: list[tuple[Segment, torch.Tensor]], grad: torch.Tensor | None) -> None:
    """Point each run's .grad at the same run of the gradient shard (or None)."""
    for seg, p in segments:
        p.grad = None if grad is None else grad[seg.lo:seg.hi]


def adamw_groups(segments: list[tuple[Segment, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Weight decay only on runs made of >=2-D leaves (FlatLayout puts them first)."""
    return [{"params": [p for seg, p in segments if seg.decay], "weight_decay": weight_decay},
            {"params": [p for seg, p in segments if not seg.decay], "weight_decay": 0.0}]


class CustomFSDP(DistributedStrategy):
    name = "custom-fsdp"

    def __init__(self, device="auto", reduce_dtype: str = "fp32", **kwargs):
        super().__init__(device, **kwargs)
        self.reduce_dtype = parse_reduce_dtype(reduce_dtype)  # what reduce-scatter sends

    def setup(self, params, config, *, lr, weight_decay, betas, precision):
        self.config = config
        self.compute_dtype = COMPUTE_DTYPES[precision]
        units = [{k: v for k, v in params.items() if k != "h"}] + list(params["h"])
        self.units = [Unit(u, self.world_size, self.rank, self.device, self.compute_dtype) for u in units]
        self.root, self.blocks = self.units[0], self.units[1:]
        groups = adamw_groups([sp for u in self.units for sp in u.segments], weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
        for u in self.units:  # AdamW finds its state present and uses these views in place
            for seg, p in u.segments:
                self.optimizer.state[p] = {"step": torch.tensor(0.0),
                                           **{k: m[seg.lo:seg.hi] for k, m in u.moments.items()}}
        self._reductions: list = []

    # --- forward / backward ------------------------------------------------------------

    def _forward(self, tokens, targets, train: bool = True):
        """Loss, plus what the backward walk needs: each segment's leaves, input and output."""
        self.root.start_gather()
        if self.blocks:
            self.blocks[0].start_gather()
        root_leaves = self.root.wait_gather()
        root = self.root.layout.as_tree(root_leaves)
        x0, pos = embed(root, tokens, self.config, train=train)  # [B, T, d]
        x, saved = x0, []
        for i, unit in enumerate(self.blocks):
            leaves = unit.wait_gather()
            if i + 1 < len(self.blocks):
                self.blocks[i + 1].start_gather()  # overlaps this block's compute
            x_in = x.detach().requires_grad_(x.requires_grad)
            x = block(unit.layout.as_tree(leaves), x_in, self.config, layer=i, pos=pos, train=train,
                      recompute=self.recompute, window_kernel=self.window_kernel)
            saved.append((leaves, x_in, x))  # x: [B, T, d]
            unit.free()
        x_last = x.detach().requires_grad_(x.requires_grad)
        loss = head_loss(root, x_last, targets, self.config)
        return loss, (root_leaves, x0, saved, x_last)

    def forward_backward(self, tokens, targets, *, scale, sync):
        loss, (root_leaves, x0, saved, x_last) = self._forward(tokens.to(self.device), targets.to(self.device))
        if self.blocks:
            self.blocks[-1].start_gather()  # overlaps the head's backward
        *g_root, g = torch.autograd.grad(loss * scale, root_leaves + [x_last], materialize_grads=True)
        for i in reversed(range(len(self.blocks))):
            unit = self.blocks[i]
            unit.wait_gather()  # refills the storage the saved views point at
            if i > 0:
                self.blocks[i - 1].start_gather()
            leaves, x_in, x_out = saved[i]
            *g_leaves, g = torch.autograd.grad(x_out, leaves + [x_in], g)
            unit.free()
            self._reduce(unit, unit.layout.pack_leaves(g_leaves), sync)
        g_embed = torch.autograd.grad(x0, root_leaves, g, materialize_grads=True)
        self.root.free()
        for g_head, g_emb in zip(g_root, g_embed):  # wte is used twice: embedding and tied head
            g_head.add_(g_emb)
        del g_embed  # packed only now, after the activations are gone: lower peak memory
        self._reduce(self.root, self.root.layout.pack_leaves(g_root), sync)
        self._finish_reductions()
        return loss.detach()

    def _reduce(self, unit: Unit, g_full: torch.Tensor, sync: bool) -> None:
        """Add a unit's fp32 gradient [padded] to its accumulator; on a synced micro-step
        reduce-scatter the total into the shard (async: waits for the previous one only)."""
        if unit.unsharded_grad is not None:
            g_full = unit.unsharded_grad.add_(g_full)
            unit.unsharded_grad = None
        if not sync:
            unit.unsharded_grad = g_full
            return
        self._finish_reductions()  # at most one reduce-scatter in flight: bounded memory
        send = g_full.to(self.reduce_dtype)  # [padded]
        out = torch.empty(unit.layout.shard_numel, dtype=self.reduce_dtype, device=self.device)
        work = reduce_scatter_tensor(out, send, op=dist.ReduceOp.SUM, async_op=True)
        self._reductions.append((work, out, send, unit))

    def _finish_reductions(self) -> None:
        for work, out, _send, unit in self._reductions:
            work.wait()
            mean = out.to(torch.float32).div_(self.world_size)  # sum -> mean
            if unit.grad is None:
                unit.grad = mean
                attach_grads(unit.segments, unit.grad)
            else:
                unit.grad.add_(mean)
        self._reductions.clear()

    def eval_loss(self, tokens, targets):
        with torch.no_grad():
            loss = self._forward(tokens.to(self.device), targets.to(self.device), train=False)[0]
        self.root.free()
        return loss

    # --- optimizer ---------------------------------------------------------------------

    def clip_grad_norm(self, max_norm):
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for u in self.units:
            for _seg, p in u.segments:  # padding excluded
                if p.grad is not None:
                    squares += p.grad.square().sum()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        norm = squares.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for u in self.units:
                if u.grad is not None:
                    u.grad.mul_(coef)
        return float(norm)

    def step(self):
        self.optimizer.step()
        for u in self.units:
            u.grad = None
            attach_grads(u.segments, None)

    # --- whole trees (collectives) -----------------------------------------------------

    def _gather_tree(self, shard_of) -> dict:
        """All-gather fp32 shards unit by unit into one CPU tree in the HF layout."""
        trees = []
        for u in self.units:
            full = torch.empty(u.layout.padded_numel, dtype=torch.float32, device=self.device)
            all_gather_into_tensor(full, shard_of(u))
            trees.append(tree.tree_map(lambda x: x.to("cpu", copy=True), u.layout.views(full)))
        return {**trees[0], "h": trees[1:]}

    def full_params(self):
        return self._gather_tree(lambda u: u.shard)

    def full_grads(self) -> dict:
        """The whole fp32 gradient tree on CPU (a collective; for tests and debugging)."""
        return self._gather_tree(lambda u: torch.zeros_like(u.shard) if u.grad is None else u.grad)

    def _leaf_parts(self):
        """(unit, dotted path, leaf range, shard range) for every parameter this rank's shards touch."""
        for i, u in enumerate(self.units):
            for path, leaf_range, shard_range in leaf_parts(u.layout, self.rank):
                yield u, ("" if i == 0 else f"h.{i - 1}.") + path, leaf_range, shard_range

    def optimizer_state(self):
        """Views of the flat moment shards, cut per parameter (no copies); the learning rate
        is set by the schedule each step, the other hyperparameters come from the run config."""
        return optimizer_pieces(adamw_step(self.optimizer), {path: (lo, {k: u.moments[k][a:b] for k in MOMENTS})
                                       for u, path, (lo, _), (a, b) in self._leaf_parts()})

    def load_optimizer_state(self, saved: SavedOptimizer):
        """Any strategy's checkpoint on any world size: each run of this shard is read from
        the saved pieces of its parameter (only the files holding it are opened)."""
        for u, path, (lo, hi), (a, b) in self._leaf_parts():
            for k in MOMENTS:
                u.moments[k][a:b] = saved.moment(path, k, lo, hi, self.rank)
        step = saved.step(self.rank)
        for state in self.optimizer.state.values():
            state["step"].fill_(step)
