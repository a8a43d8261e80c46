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

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        size = self.slot_pos[layer].numel()
        k, v, slots = k[:, :, -size:], v[:, :, -size:], slots[-size:]  # a rolling buffer keeps the last `size`
        idx = slots % size
        self.k[layer][:, :, idx] = k
        self.v[layer][:, :, idx] = v
        self.slot_pos[layer][idx] = slots

    def attend(self, layer: int, q, k, v, window: int | None) -> torch.Tensor:
        """Attention of the new queries over everything cached plus the new keys; stores k, v."""
        T = q.shape[2]
        if self.length + T > self.capacity:
            raise FgptError(f"KV cache overflow: {self.length + T} slots > capacity {self.capacity}")
        slots = torch.arange(self.length, self.length + T, device=q.device)
        size = self.slot_pos[layer].numel()
        if self.length == 0 and not self.has_padding:  # fresh prefill: the training kernels
            self._write(layer, k, v, slots)
            return attention(q, k, v, window)
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
