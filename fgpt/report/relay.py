"""The relay probe: can L windowed layers carry one token L·(W−1) positions?

Each sequence holds one *value* token (from its own alphabet of `n_values`) near its start,
then noise tokens (another alphabet) and *read* tokens. The target at every read is the
value; nowhere else is there a target, and the value never appears again in the input, so
a read d positions after the value must fetch it across d positions. One layer with window
W sees keys at distance <= W - 1; L layers can relay it through intermediate positions at
most L·(W - 1) (the `n_layer × W` receptive field of Longformer / Mistral). That is only an
upper bound: the layers must learn to relay. Accuracy against distance, for models with and
without windows, shows where recall really stops; a full-attention model of the same size
shows the task is learnable at every distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fgpt.config import GPTConfig
from fgpt.model import forward, init_params
from fgpt.parallel import make_strategy
from fgpt.training.train import lr_at, optimizer_step


EDGE_ACCURACY = 0.5  # the measured edge: accuracy stays at least this up to it


@dataclass(frozen=True)
class RelayTask:
    seq_len: int
    n_values: int = 8  # chance accuracy 1 / n_values
    n_noise: int = 16
    read_prob: float = 0.25
    max_value_pos: int = 8  # the value sits at a random position below this

    @property
    def read(self) -> int:
        return self.n_values + self.n_noise

    @property
    def vocab_size(self) -> int:
        return self.read + 1

    @property
    def chance(self) -> float:
        return 1 / self.n_values

    def batch(self, size: int, gen: torch.Generator, max_distance: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [B, T], targets [B, T] (-1 except at reads, and at reads farther than
        `max_distance` from the value), distance of each position from its row's value [B, T])."""
        T = self.seq_len
        tokens = self.n_values + torch.randint(0, self.n_noise, (size, T), generator=gen)
        reads = torch.rand(size, T, generator=gen) < self.read_prob
        value_pos = torch.randint(0, self.max_value_pos, (size,), generator=gen)
        value = torch.randint(0, self.n_values, (size,), generator=gen)
        distance = torch.arange(T)[None, :] - value_pos[:, None]  # [B, T]
        reads &= distance > 0
        tokens[reads] = self.read
        tokens[torch.arange(size), value_pos] = value
        scored = reads if max_distance is None else reads & (distance <= max_distance)
        targets = torch.where(scored, value[:, None].expand(size, T), torch.full_like(tokens, -1))
        return tokens, targets, distance


def receptive_field(n_layer: int, window: int | None, seq_len: int) -> int:
    """The farthest distance information can travel through n_layer windowed layers."""
    return seq_len - 1 if window is None else min(seq_len - 1, n_layer * (window - 1))


def relay_config(task: RelayTask, n_layer: int, window: int | None) -> GPTConfig:
    return GPTConfig(vocab_size=task.vocab_size, n_ctx=task.seq_len, n_layer=n_layer, n_head=4, n_embd=64,
                     pos_emb="rope", window=window)


def training_distance(task: RelayTask, config: GPTConfig) -> int:
    """Reads farther than twice the predicted edge carry no training target: the task is
    learnable from the rest, and a read the masks cannot serve only adds noise to the
    gradient. Reads up to twice the edge still train, so a mask that leaked past the edge
    would be learned (and show in the evaluation, which scores every distance)."""
    edge = receptive_field(config.n_layer, config.layer_windows[0], task.seq_len)
    return min(task.seq_len - 1, 2 * edge)


KERNEL = "dense"  # the window as a mask: the same maths as the band, faster at these lengths


def train_relay(task: RelayTask, config: GPTConfig, *, steps: int, batch_size: int, seed: int,
                lr: float = 3e-3) -> dict:
    """The single-device strategy on fresh random batches (warmup, then cosine); final params.
    The probe asks what the masks let through, so it runs the dense-mask kernel (KERNEL)."""
    strategy = make_strategy("single", device="cpu", window_kernel=KERNEL)
    strategy.setup(init_params(config, seed=seed), config, lr=lr, weight_decay=0.0,
                   betas=(0.9, 0.98), precision="fp32")
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    cap = training_distance(task, config)
    for step in range(steps):
        tokens, targets, _ = task.batch(batch_size, gen, max_distance=cap)
        optimizer_step(strategy, [(tokens, targets)], lr=lr_at(step, lr=lr, min_lr=lr / 10, warmup=warmup,
                                                                total=steps), grad_clip=1.0, step=step)
    return strategy.full_params()


@torch.no_grad()
def accuracy_by_distance(task: RelayTask, params: dict, config: GPTConfig, *, n_seqs: int,
                         seed: int) -> tuple[list[float | None], list[int]]:
    """Accuracy of the argmax over the value alphabet at reads, for distances
    1..seq_len-1, and how many reads each distance had."""
    gen = torch.Generator().manual_seed(seed)
    tokens, targets, distance = task.batch(n_seqs, gen)
    guess = forward(params, tokens, config, window_kernel=KERNEL)[..., :task.n_values].argmax(-1)  # [B, T]
    reads = targets >= 0
    hit = (guess == targets) & reads
    D = task.seq_len
    counts = np.bincount(distance[reads].numpy(), minlength=D)[1:D]
    hits = np.bincount(distance[hit].numpy(), minlength=D)[1:D]
    return [float(h / c) if c else None for h, c in zip(hits, counts)], counts.tolist()


def mean_over(acc: list[float | None], lo: int, hi: int) -> float | None:
    """Mean accuracy over distances lo..hi (1-based, inclusive); None when empty."""
    vals = [a for a in acc[max(lo, 1) - 1:hi] if a is not None]
    return float(np.mean(vals)) if vals else None


def measured_edge(accuracy: list[float | None], threshold: float = EDGE_ACCURACY) -> int:
    """The largest distance d with accuracy >= threshold at every distance 1..d (0: none)."""
    edge = 0
    for d, acc in enumerate(accuracy, start=1):
        if acc is not None and acc < threshold:
            break
        edge = d
    return edge
