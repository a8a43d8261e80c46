"""A long-range probe: recall the token that sits a known distance back.

Each sequence is `n_content` random content tokens followed by one query token q_D; the
target after q_D is the content token D positions before the query. One attention layer
with window W reaches keys at distance <= W - 1, so L layers can relay information at
most L·(W - 1) positions (the `n_layer × W` receptive field of Longformer / Mistral).
Accuracy by distance, for models trained with and without a window, shows where recall
really collapses against that prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgpt.config import GPTConfig
from fgpt.model import forward, init_params
from fgpt.parallel import make_strategy


@dataclass(frozen=True)
class RecallTask:
    n_symbols: int = 32  # content alphabet: chance accuracy is 1 / n_symbols
    max_distance: int = 40  # queries ask for distances 1..max_distance

    @property
    def n_content(self) -> int:
        return self.max_distance  # every distance points at a content token

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + self.max_distance  # content symbols, then one query token per distance

    @property
    def seq_len(self) -> int:
        return self.n_content + 1

    def batch(self, batch_size: int, gen: torch.Generator):
        """(tokens [B, T], targets [B, T] with -1 except at the query, distances [B])."""
        content = torch.randint(0, self.n_symbols, (batch_size, self.n_content), generator=gen)
        distance = torch.randint(1, self.max_distance + 1, (batch_size,), generator=gen)  # [B]
        query = self.n_symbols + distance - 1  # [B]
        tokens = torch.cat([content, query[:, None]], dim=1)  # [B, T]
        targets = torch.full_like(tokens, -1)
        targets[:, -1] = content[torch.arange(batch_size), self.n_content - distance]
        return tokens, targets, distance


def receptive_field(n_layer: int, window: int | None, seq_len: int) -> int:
    """The farthest distance information can travel through n_layer windowed layers."""
    return seq_len - 1 if window is None else min(seq_len - 1, n_layer * (window - 1))


def train_recall(task: RecallTask, config: GPTConfig, *, steps: int, batch_size: int, lr: float,
                 seed: int) -> dict:
    """Train with the single-device strategy on fresh random batches; return final params."""
    strategy = make_strategy("single", device="cpu")
    strategy.setup(init_params(config, seed=seed), config, lr=lr, weight_decay=0.0,
                   betas=(0.9, 0.98), precision="fp32")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens, targets, _ = task.batch(batch_size, gen)
        strategy.forward_backward(tokens, targets, scale=1.0, sync=True)
        strategy.clip_grad_norm(1.0)
        strategy.step()
    return strategy.full_params()


@torch.no_grad()
def accuracy_by_distance(task: RecallTask, params: dict, config: GPTConfig, *, n_per_distance: int,
                         seed: int) -> list[float]:
    """Accuracy of the query's argmax prediction for each distance 1..max_distance."""
    gen = torch.Generator().manual_seed(seed)
    acc = []
    for d in range(1, task.max_distance + 1):
        tokens, targets, _ = task.batch(n_per_distance, gen)
        tokens[:, -1] = task.n_symbols + d - 1  # ask every row for distance d
        answer = tokens[:, task.n_content - d]  # [n]
        guess = forward(params, tokens, config)[:, -1, :task.n_symbols].argmax(-1)  # [n]
        acc.append(float((guess == answer).float().mean()))
    return acc


def measured_edge(accuracy: list[float], threshold: float) -> int:
    """The largest distance d with accuracy >= threshold at every distance 1..d (0: none)."""
    edge = 0
    for d, acc in enumerate(accuracy, start=1):
        if acc < threshold:
            break
        edge = d
    return edge
