"""Packing one sharding unit (a block, or the embeddings + final layer norm) into a flat,
padded 1-D buffer, and viewing such a buffer as the unit's tree again.

Layout of a unit's buffer, for world size W:

    [ >=2-D leaves (weight-decayed) | 1-D leaves (not decayed) | zero padding ]
    |<------------------------ padded = W * shard_numel -------------------->|

Rank r owns `padded[r*shard_numel : (r+1)*shard_numel]`. Putting the decayed leaves first
means each shard splits into at most one decayed and one undecayed segment, which become
AdamW's two parameter groups; padding belongs to no segment, so the optimizer never
touches it and no view of the tree ever covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgpt import tree


@dataclass(frozen=True)
class Slot:
    path: str  # dotted path inside the unit
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class Segment:
    """A run of this rank's shard [lo, hi) holding real parameters, all decayed or not."""
    lo: int
    hi: int
    decay: bool


class FlatLayout:
    """Where every leaf of one unit lives in its flat buffer (see the module docstring)."""

    def __init__(self, unit: dict, world_size: int):
        leaves = tree.flatten(unit)
        # stable sort: >=2-D leaves first, each group in the tree's own (sorted) order
        ordered = sorted(leaves, key=lambda path: not tree.weight_decayed(leaves[path].shape))
        self.slots, offset = [], 0
        for path in ordered:
            self.slots.append(Slot(path, tuple(leaves[path].shape), offset))
            offset += self.slots[-1].numel
        self.numel = offset
        self.decay_numel = sum(s.numel for s in self.slots if tree.weight_decayed(s.shape))
        self.world_size = world_size
        self.shard_numel = -(-self.numel // world_size)  # ceil: every rank gets the same size
        self.padded_numel = self.shard_numel * world_size

    def pack(self, unit: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The unit's leaves -> one zero-padded buffer [padded_numel]."""
        leaves = tree.flatten(unit)
        return self.pack_leaves([leaves[s.path] for s in self.slots], dtype)

    def pack_leaves(self, leaves: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Leaves in slot order (e.g. their gradients) -> one zero-padded buffer [padded_numel]."""
        flat = torch.empty(self.padded_numel, dtype=dtype, device=leaves[0].device)
        for s, leaf in zip(self.slots, leaves):
            flat[s.offset:s.offset + s.numel].copy_(leaf.reshape(-1))
        flat[self.numel:].zero_()
        return flat

    def leaf_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A buffer [padded_numel] -> its leaves in slot order, each a view (no copy)."""
        return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in self.slots]

    def as_tree(self, leaves: list[torch.Tensor]) -> dict:
        return tree.unflatten({s.path: leaf for s, leaf in zip(self.slots, leaves)})

    def views(self, flat: torch.Tensor) -> dict:
        """A buffer [padded_numel] -> the unit's tree, every leaf a view (no copy)."""
        return self.as_tree(self.leaf_views(flat))

    def shard(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s piece of a full buffer (a view)."""
        return flat[rank * self.shard_numel:(rank + 1) * self.shard_numel]

    def segments(self, rank: int) -> list[Segment]:
        """The decayed / undecayed parameter runs inside rank `rank`'s shard, padding excluded."""
        start = rank * self.shard_numel
        runs = [(0, self.decay_numel, True), (self.decay_numel, self.numel, False)]
        out = []
        for lo, hi, decay in runs:
            lo, hi = max(lo, start), min(hi, start + self.shard_numel)
            if lo < hi:
                out.append(Segment(lo - start, hi - start, decay))
        return out
