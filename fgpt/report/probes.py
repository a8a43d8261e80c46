"""Forward-only probes of the trained language models, all on fixed validation text (the
same tokens for every arm and seed):

- `evaluation_loss`   mean next-token loss over a fixed set of evenly spaced windows;
- `context_losses`    the loss of fixed targets given exactly the previous k tokens, per k;
- `length_penalty`    per-position loss of one pass over length_mult x n_ctx tokens minus a
                      sliding-n_ctx evaluation of the same model on the same tokens;
- `copy_gain`         a random span repeated at distance D: loss on the second copy minus
                      the first;
- `continuations`     greedy and sampled text from the same prompts.

Per-token losses are float64 numpy arrays; targets that are UNK are NaN (not scored). The
forward passes run where the parameters are (a GPU where the study trained on one).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fgpt.config import GPTConfig
from fgpt.inference.generate import Sampling, generate
from fgpt.model import forward, loss_fn

CHUNK_TOKENS = 16384  # tokens per forward call: bounds the logits' memory


def evenly_spaced(n_tokens: int, length: int, count: int) -> np.ndarray:
    """`count` start offsets of windows of `length` spread evenly over a stream."""
    if n_tokens < length + 1:
        raise ValueError(f"a stream of {n_tokens} tokens is too short for windows of {length}")
    return np.linspace(0, n_tokens - length - 1, count).astype(np.int64)


def _device(params: dict) -> torch.device:
    return params["ln_f"]["weight"].device


def _rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


@torch.no_grad()
def token_losses(params: dict, config: GPTConfig, inputs: torch.Tensor, targets: torch.Tensor,
                 ignore_id: int | None) -> np.ndarray:
    """Per-position cross-entropy [N, T] (NaN where the target is `ignore_id`), in chunks."""
    per_call = max(1, CHUNK_TOKENS // inputs.shape[1])
    device = _device(params)
    out = []
    for x, y in zip(inputs.split(per_call), targets.split(per_call)):
        x, y = x.to(device), y.to(device)
        logits = forward(params, x, config).float()
        loss = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none").double()
        if ignore_id is not None:
            loss[y == ignore_id] = float("nan")
        out.append(loss.cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def batch_loss(params: dict, config: GPTConfig, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean loss of one batch whose ignored targets are -1: what the training loop's
    evaluation computes."""
    device = _device(params)
    return float(loss_fn(params, inputs.to(device), targets.to(device), config))


def evaluation_loss(params: dict, config: GPTConfig, val: np.ndarray, starts: np.ndarray,
                    ignore_id: int | None) -> float:
    """Mean loss over the scored targets of the fixed windows at `starts`."""
    rows = _rows(val, starts, config.n_ctx + 1)
    return float(np.nanmean(token_losses(params, config, rows[:, :-1], rows[:, 1:], ignore_id)))


# --- context use -------------------------------------------------------------------------

def context_targets(val: np.ndarray, longest: int, count: int, ignore_id: int | None) -> np.ndarray:
    """Positions of `count` scored targets spread over the stream, each with `longest`
    tokens of text before it."""
    candidates = evenly_spaced(len(val), longest, 4 * count) + longest
    if ignore_id is not None:
        candidates = candidates[val[candidates] != ignore_id]
    return candidates[np.linspace(0, len(candidates) - 1, count).astype(np.int64)]


@torch.no_grad()
def context_losses(params: dict, config: GPTConfig, val: np.ndarray, targets: np.ndarray,
                   cuts: tuple[int, ...]) -> dict[int, np.ndarray]:
    """For each k in `cuts`: the loss of every target given exactly the k tokens before it
    (one forward of length k per target; only the last position's logits are used)."""
    out = {}
    for k in cuts:
        rows = _rows(val, targets - k, k)  # [N, k]
        y = torch.from_numpy(val[targets].astype(np.int64))
        losses = []
        for x, t in zip(rows.split(max(1, CHUNK_TOKENS // k)), y.split(max(1, CHUNK_TOKENS // k))):
            logits = forward(params, x.to(_device(params)), config, last_only=True)[:, -1].float()
            losses.append(F.cross_entropy(logits, t.to(logits.device), reduction="none").double().cpu().numpy())
        out[k] = np.concatenate(losses)
    return out


# --- length -----------------------------------------------------------------------------

def sliding_losses(params: dict, config: GPTConfig, inputs: torch.Tensor, targets: torch.Tensor,
                   stride: int, ignore_id: int | None) -> np.ndarray:
    """HF's strided evaluation with windows of n_ctx: the first window scores all its
    positions, each later one (every `stride` tokens) only its last `stride` — so every
    position is scored once, with between n_ctx - stride and n_ctx tokens of context."""
    N, L = inputs.shape
    n = config.n_ctx
    out = np.full((N, L), np.nan)
    out[:, :n] = token_losses(params, config, inputs[:, :n], targets[:, :n], ignore_id)
    scored_to = n
    while scored_to < L:
        end = min(scored_to + stride, L)  # the last window may score fewer than `stride`
        losses = token_losses(params, config, inputs[:, end - n:end], targets[:, end - n:end], ignore_id)
        out[:, scored_to:end] = losses[:, n - (end - scored_to):]
        scored_to = end
    return out


def length_sequences(val: np.ndarray, n_ctx: int, mult: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(val, evenly_spaced(len(val), mult * n_ctx + 1, count), mult * n_ctx + 1)
    return rows[:, :-1], rows[:, 1:]


def length_penalty(params: dict, config: GPTConfig, inputs: torch.Tensor, targets: torch.Tensor,
                   stride: int, ignore_id: int | None, *, eval_config: GPTConfig | None = None) -> dict:
    """Per-position losses of one long pass (`eval_config`: e.g. the model with a window
    applied only at inference) and of the sliding-n_ctx reference, and their difference.
    Inside the first n_ctx positions both passes see the same context, so the penalty
    there is zero up to float rounding."""
    long = token_losses(params, eval_config or config, inputs, targets, ignore_id)
    sliding = sliding_losses(params, config, inputs, targets, stride, ignore_id)
    return {"long": long, "sliding": sliding, "penalty": long - sliding}


# --- copying ----------------------------------------------------------------------------

def copy_sequences(val: np.ndarray, distance: int, span: int, count: int, alphabet: int,
                   seed: int, prefix: int = 32, avoid: int | None = None) -> tuple[torch.Tensor, int, int]:
    """`count` rows of real text holding one random span (ids drawn from 0..alphabet-1, never
    `avoid`, e.g. end-of-text) at `prefix` and again `distance` tokens later: (tokens
    [count, L], first start, second start)."""
    length = prefix + distance + span + 1
    rows = _rows(val, evenly_spaced(len(val), length, count), length).clone()
    gen = torch.Generator().manual_seed(seed)
    spans = torch.randint(0, alphabet, (count, span), generator=gen)
    if avoid is not None:
        spans[spans == avoid] = (avoid + 1) % alphabet
    first, second = prefix, prefix + distance
    rows[:, first:first + span] = spans
    rows[:, second:second + span] = spans
    return rows, first, second


def copy_gain(params: dict, config: GPTConfig, rows: torch.Tensor, first: int, second: int,
              span: int) -> np.ndarray:
    """Per row: mean loss on the second copy minus the first, over the span's tokens after
    its first (which no copy can predict). Negative = the model copies."""
    losses = token_losses(params, config, rows[:, :-1], rows[:, 1:], None)
    a = losses[:, first:first + span - 1].mean(axis=1)  # targets first+1 .. first+span-1
    b = losses[:, second:second + span - 1].mean(axis=1)
    return b - a


# --- generation -------------------------------------------------------------------------

SAMPLED = Sampling(temperature=0.8, top_k=40)


def continuations(params: dict, config: GPTConfig, prompts: list[list[int]], new_tokens: int, *,
                  eos_id: int | None, vocab_limit: int) -> dict:
    """Greedy and sampled (SAMPLED, seed 0) continuations, new ids only."""
    greedy = generate(params, config, prompts, new_tokens, sampling=Sampling(temperature=0.0),
                      eos_id=eos_id, allow_past_ctx=True, vocab_limit=vocab_limit)
    sampled = generate(params, config, prompts, new_tokens, sampling=SAMPLED,
                       seed=0, eos_id=eos_id, allow_past_ctx=True, vocab_limit=vocab_limit)
    return {"greedy": [g[len(p):] for g, p in zip(greedy, prompts)],
            "sampled": [s[len(p):] for s, p in zip(sampled, prompts)]}


def repeated_ngram_share(ids: list[int], n: int = 4) -> float | None:
    """Share of the n-grams of a continuation that already occurred in it (0 = no loops)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return None if not grams else 1 - len(set(grams)) / len(grams)
