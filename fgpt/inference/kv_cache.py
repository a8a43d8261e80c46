"""A preallocated per-layer KV cache, with rolling buffers for sliding-window layers.

Time runs in *slots*: slot s holds the s-th token of the (left-padded) batch. A layer with
window W keeps only min(W, capacity) slots and stores slot s at index s mod size — a
rolling buffer, so memory stays flat however long generation runs. Every buffer records
which slot each index holds (`slot_pos`, -1 = empty); masks are built from those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgpt.attention import attention, masked_attention, window_mask
from fgpt.config import GPTConfig
from fgpt.errors import FgptError


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, H_kv, size, hd]
    v: list[torch.Tensor]
    slot_pos: list[torch.Tensor]  # per layer [size] int64: slot held at each index, -1 = empty
    pad: torch.Tensor  # [B] left padding of each row, in slots
    capacity: int  # slots this cache may ever hold
    length: int = 0  # slots written so far: the cursor, moved by `advance`
    _has_padding: bool | None = None

    @classmethod
    def allocate(cls, config: GPTConfig, batch: int, capacity: int, *, dtype=torch.float32,
                 device="cpu", pad: torch.Tensor | None = None) -> "KVCache":
        shape = lambda size: (batch, config.kv_heads, size, config.head_dim)  # noqa: E731
        sizes = [capacity if w is None else min(w, capacity) for w in config.layer_windows]
        return cls(
            k=[torch.zeros(shape(s), dtype=dtype, device=device) for s in sizes],
            v=[torch.zeros(shape(s), dtype=dtype, device=device) for s in sizes],
            slot_pos=[torch.full((s,), -1, dtype=torch.long, device=device) for s in sizes],
            pad=torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device),
            capacity=capacity,
        )

    @property
    def has_padding(self) -> bool:
        if self._has_padding is None:  # read once: it costs a device sync
            self._has_padding = bool(self.pad.any())
        return self._has_padding

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def positions(self, n_new: int) -> torch.Tensor:
        """[B, n_new] token positions of the next n_new slots (pad slots clamp to 0)."""
        slots = torch.arange(self.length, self.length + n_new, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def advance(self, n: int) -> None:
        """Move the cursor past the n slots every layer has just written (`forward` calls it
        once per pass, after the last block: each layer's `attend` reads the same cursor)."""
        self.length += n

    # --- continuous batching (fgpt/serving/engine.py): rows join, leave and move -----------

    def first_rows(self, n: int) -> "KVCache":
        """A cache over rows [0, n) that shares this one's memory (a decode step over the live
        rows alone); its cursor moves on its own, so copy `length` back after a pass."""
        return KVCache(k=[t[:n] for t in self.k], v=[t[:n] for t in self.v], slot_pos=self.slot_pos,
                       pad=self.pad[:n], capacity=self.capacity, length=self.length)

    def shift(self, delta: int) -> None:
        """Move every row's slots by delta (the cursor too): left (< 0) drops slots no live
        row starts before, right (> 0) makes room in front for a longer prompt to join."""
        if not -self.length <= delta <= self.capacity - self.length:
            raise FgptError(f"cannot shift a cache at {self.length}/{self.capacity} slots by {delta}")
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].roll(delta, dims=2)  # slot s at s % size -> (s + delta) % size
            self.v[layer] = self.v[layer].roll(delta, dims=2)
        self.pad = (self.pad + delta).clamp(min=0)
        self.length += delta
        self._has_padding = None
        self._reset_slot_pos()

    def _reset_slot_pos(self) -> None:
        """Every slot below the cursor is held (rows mask what precedes their own start)."""
        for sp in self.slot_pos:
            size = sp.numel()
            idx = torch.arange(size, device=sp.device)
            last = self.length - 1 - (self.length - 1 - idx) % size  # the newest slot at each index
            sp.copy_(torch.where(last >= 0, last, -1))

    def put_row(self, row: int, other: "KVCache", other_row: int = 0) -> None:
        """Write the sequence `other` holds in `other_row` (from its slot 0, no padding) into
        `row`, ending at this cache's cursor; the row's padding covers the slots before it."""
        start = self.length - other.length
        if start < 0:
            raise FgptError(f"a {other.length}-slot sequence does not fit below the cursor {self.length}")
        for layer, sp in enumerate(other.slot_pos):
            held = sp >= 0
            src, slots = held.nonzero().squeeze(-1), sp[held] + start
            keep = slots >= self.length - self.slot_pos[layer].numel()  # a rolling buffer keeps the newest
            src, slots = src[keep], slots[keep]
            idx = slots % self.slot_pos[layer].numel()
            self.k[layer][row, :, idx] = other.k[layer][other_row, :, src]
            self.v[layer][row, :, idx] = other.v[layer][other_row, :, src]
        self.pad[row] = start
        self._has_padding = None

    def move_row(self, src: int, dst: int) -> None:
        """Row src's keys, values and padding into row dst (keeps live rows at the front)."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.pad[dst] = self.pad[src]
        self._has_padding = None

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [B, H, T, hd] at `slots`, the T slots from the cursor on (attend's)."""
        if k.dtype != self.k[layer].dtype:  # a slice assignment would cast silently, index_put refuse
            raise FgptError(f"keys of {k.dtype} into a {self.k[layer].dtype} KV cache: allocate it in the model's dtype")
        size, T = self.slot_pos[layer].numel(), k.shape[2]
        n = min(T, size)  # a rolling buffer keeps the last `size`
        k, v, slots = k[:, :, T - n:], v[:, :, T - n:], slots[T - n:]
        first = (self.length + T - n) % size  # where slots[0] goes
        if first + n <= size:  # no wrap: slices, cheaper than index_put in a decode step
            at = slice(first, first + n)
            self.k[layer][:, :, at] = k
            self.v[layer][:, :, at] = v
            self.slot_pos[layer][at] = slots
            return
        idx = slots % size
        self.k[layer][:, :, idx] = k
        self.v[layer][:, :, idx] = v
        self.slot_pos[layer][idx] = slots

    def attend(self, layer: int, q, k, v, window: int | None, kernel: str = "band") -> torch.Tensor:
        """Attention of the new queries over everything cached plus the new keys; stores k, v.
        `kernel`: the window kernel of a fresh prefill (fgpt.attention.attention's)."""
        T = q.shape[2]
        if self.length + T > self.capacity:
            raise FgptError(f"KV cache overflow: {self.length + T} slots > capacity {self.capacity}")
        slots = torch.arange(self.length, self.length + T, device=q.device)
        size = self.slot_pos[layer].numel()
        if self.length == 0 and not self.has_padding:  # fresh prefill: the training kernels
            self._write(layer, k, v, slots)
            return attention(q, k, v, window, kernel=kernel)
        if size == self.capacity or T == 1:  # nothing needed is overwritten: write, then read
            self._write(layer, k, v, slots)
            end = self.length + T if size == self.capacity else size
            keys, values, k_slots = self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.slot_pos[layer][:end]
        else:  # a multi-token chunk into a rolling buffer: read old + new, then write
            keys = torch.cat([self.k[layer], k], dim=2)
            values = torch.cat([self.v[layer], v], dim=2)
            k_slots = torch.cat([self.slot_pos[layer], slots])
            self._write(layer, k, v, slots)
        if T == 1 and window is None and not self.has_padding:
            return cached_attention(q, keys, values, None)  # one query, every key visible
        return cached_attention(q, keys, values, self._mask(slots, k_slots, window))

    def _mask(self, q_slots, k_slots, window) -> torch.Tensor:
        """[B, 1, T, S]: causal, in window, not empty, not padding (a pad query sees itself)."""
        ok = window_mask(q_slots, k_slots, window) & (k_slots[None, :] >= 0)
        ok = ok[None] & (k_slots[None, None, :] >= self.pad[:, None, None])
        ok |= (q_slots[:, None] == k_slots[None, :])[None]  # keeps rows of pad queries finite; their outputs are ignored
        return ok[:, None]


def cached_attention(q, keys, values, mask) -> torch.Tensor:
    """masked_attention, with two decode-step rewrites of the same maths:
    - grouped heads, one query: each KV head's group of query heads becomes its query axis,
      so SDPA runs plain MHA over the n_kv_head cached heads, which reads each cached head
      once (faster than SDPA's enable_gqa: `just bench attention`, docs/performance.md);
    - one bf16 query on CPU runs in fp32: torch 2.13's CPU SDPA has no fast bf16 path for a
      single query."""
    B, H, T, hd = q.shape
    Hkv = keys.shape[1]
    if T == 1 and Hkv != H:  # the mask ([B, 1, 1, S] or None) is the same for every query
        return cached_attention(q.view(B, Hkv, H // Hkv, hd), keys, values, mask).view(q.shape)
    if T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return masked_attention(q.float(), keys.float(), values.float(), mask).to(q.dtype)
    return masked_attention(q, keys, values, mask)
