"""The saved form of AdamW's state, one format for every strategy and world size.

Each rank's `optimizer_state()` is the AdamW step and, per parameter (dotted path), the piece
of its flattened moments that rank keeps, as (flat offset, {moment: 1-D tensor}). Whole
leaves (single, ddp), dim-0 row shards (fsdp) and flat-buffer shards (custom-fsdp) all fit,
so any strategy resumes any other's checkpoint on any world size: `SavedOptimizer.moment`
puts a wanted range back together from whichever saved pieces hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fgpt.errors import FgptError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state tensors, as torch.optim names them


def optimizer_pieces(step: float, pieces: dict[str, tuple[int, dict[str, torch.Tensor]]]) -> dict:
    """What every strategy's `optimizer_state()` returns (see the module docstring)."""
    return {"step": step, "pieces": pieces}


def adamw_step(optimizer: torch.optim.Optimizer) -> float:
    """AdamW's step count (the same for every parameter once one step was taken)."""
    return max((float(s["step"]) for s in optimizer.state.values()), default=0.0)


Part = Callable[[torch.Tensor], tuple[int, int, torch.Size]]  # param -> (lo, hi, local shape)


def whole(p: torch.Tensor) -> tuple[int, int, torch.Size]:
    """The Part of a parameter this rank holds entirely (single, ddp)."""
    return 0, p.numel(), p.shape


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
