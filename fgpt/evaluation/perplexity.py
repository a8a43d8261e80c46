"""Strided sliding-window perplexity, the method of Hugging Face's perplexity guide.

    total = strided_nll(params, config, tokens, n_ctx=1024, stride=512)
    total.loss, total.ppl, total.tokens                  # nats per scored token, exp(loss), count

Windows of `n_ctx` tokens start every `stride` tokens. A window predicts only the tokens the
previous window did not reach, so with stride < n_ctx every token but the first is scored
exactly once, each with at least n_ctx - stride tokens of context (all there is near the
start). With stride = n_ctx the windows do not overlap and each window's first token has no
context inside it, so it goes unscored, as in the guide. The last window ends at the last
token and may be shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fgpt.config import GPTConfig
from fgpt.errors import FgptError, check_at_least
from fgpt.model import forward


@dataclass(frozen=True)
class Window:
    begin: int  # first input token (absolute position in the stream)
    end: int  # one past the last input token
    first: int  # first scored token; the window's targets are tokens first .. end-1

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Total:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # scored tokens
    n_bytes: int | None = None  # UTF-8 bytes the scored tokens decode to, where known

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.n_bytes if self.n_bytes else None


def check_window_flags(n_ctx: int | None, stride: int | None) -> None:
    """--n-ctx and --stride as far as they are known (None: not given yet), so run.eval can
    refuse them before loading a checkpoint with the words check_windows uses after."""
    if n_ctx is not None and n_ctx < 2:
        raise FgptError(f"--n-ctx must be at least 2 (one token of context, one to score), got {n_ctx}")
    if stride is not None and (stride < 1 or (n_ctx is not None and stride > n_ctx)):
        bound = "--n-ctx" if n_ctx is None else f"--n-ctx ({n_ctx})"
        raise FgptError(f"--stride must be between 1 and {bound}, got {stride}")


def check_windows(n_tokens: int, n_ctx: int, stride: int) -> None:
    check_window_flags(n_ctx, stride)
    if n_tokens < 2:
        raise FgptError(f"the text has {n_tokens} token(s): perplexity needs at least 2")


def plan_windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """The guide's loop: begin = 0, stride, 2*stride, ... until a window reaches the end."""
    check_windows(n_tokens, n_ctx, stride)
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_ctx, n_tokens)
        windows.append(Window(begin, end, first=max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def model_windows(config: GPTConfig, n_tokens: int, n_ctx: int | None = None,
                  stride: int | None = None) -> list[Window]:
    """The windows `strided_nll` scores a stream of `n_tokens` in. Defaults: n_ctx = the
    model's, stride = n_ctx // 2."""
    n_ctx = config.n_ctx if n_ctx is None else n_ctx
    stride = n_ctx // 2 if stride is None else stride
    if n_ctx > config.n_ctx and config.pos_emb == "learned":
        raise FgptError(f"--n-ctx {n_ctx} exceeds the model's n_ctx={config.n_ctx} (learned positions stop there)")
    return plan_windows(n_tokens, n_ctx, stride)


def batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Runs of at most `batch_size` windows of one length (only the last window can be shorter)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def window_nll(params: dict, config: GPTConfig, tokens: Sequence[int] | np.ndarray,
               windows: list[Window], device: torch.device | str = "cpu") -> Total:
    """Summed NLL of the windows' targets, run as one batch of equal-length windows."""
    nll, count = window_nlls(params, config, tokens, windows, device)
    return Total(float(nll.sum()), int(count.sum()))


@torch.inference_mode()
def window_nlls(params: dict, config: GPTConfig, tokens: Sequence[int] | np.ndarray,
                windows: list[Window], device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per window: the summed NLL of its targets (float64) and how many there are, run as one
    batch of equal-length windows. The LM head runs only on the positions that predict a
    target (a window overlapping its predecessor by n_ctx - stride tokens skips that many
    head rows)."""
    x = torch.from_numpy(np.stack([np.asarray(tokens[w.begin:w.end], dtype=np.int64) for w in windows]))
    x = x.to(device)  # [B, T]
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= config.vocab_size:
        raise FgptError(f"token id {high if high >= config.vocab_size else low} is outside the "
                        f"model's vocabulary of {config.vocab_size}")
    # logits at window position j predict token begin + j + 1
    lo = min(w.first - w.begin - 1 for w in windows)
    hi = windows[0].length - 1
    logits = forward(params, x, config, logits_for=slice(lo, hi))  # [B, hi - lo, V]
    targets = x[:, lo + 1:hi + 1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    nll = nll.view(len(windows), hi - lo)
    position = torch.arange(lo + 1, hi + 1, device=x.device)
    firsts = torch.tensor([w.first - w.begin for w in windows], device=x.device)
    scored = position[None, :] >= firsts[:, None]
    per_window = torch.where(scored, nll.double(), 0.0).sum(dim=1)
    return per_window.cpu().numpy(), scored.sum(dim=1).cpu().numpy()


def strided_nll(params: dict, config: GPTConfig, tokens: Sequence[int] | np.ndarray, *,
                n_ctx: int | None = None, stride: int | None = None, batch_size: int = 8,
                byte_lengths: np.ndarray | None = None, device: torch.device | str = "cpu",
                progress: bool = True) -> Total:
    """The strided perplexity of a token stream (anything with len() and slicing: a list, a
    numpy array, a memory-mapped shard). Defaults: n_ctx = the model's, stride = n_ctx // 2.
    `byte_lengths[id]`: the UTF-8 bytes of each token id, to count the scored text's bytes."""
    check_at_least("--batch-size", batch_size, 1)
    windows = model_windows(config, len(tokens), n_ctx, stride)
    nll, count = 0.0, 0
    with tqdm(total=sum(w.end - w.first for w in windows), unit="tok", unit_scale=True,
              desc="perplexity", disable=not progress, dynamic_ncols=True) as bar:
        for group in batches(windows, batch_size):
            part = window_nll(params, config, tokens, group, device)
            nll, count = nll + part.nll, count + part.tokens
            bar.update(part.tokens)
            bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}", refresh=False)
    n_bytes = None if byte_lengths is None else scored_bytes(tokens, windows, byte_lengths)
    return Total(nll, count, n_bytes)


def scored_bytes(tokens: Sequence[int] | np.ndarray, windows: list[Window], byte_lengths: np.ndarray,
                 chunk: int = 1 << 22) -> int | None:
    """UTF-8 bytes of the scored tokens: those of the whole stream less the few no window
    scores (the first token; with stride = n_ctx, each window's first). None when some id
    has no known byte length (not this tokenizer's)."""
    def nbytes(ids) -> int:
        return int(byte_lengths[np.asarray(ids, dtype=np.int64)].sum())

    if max(int(np.max(tokens[i:i + chunk])) for i in range(0, len(tokens), chunk)) >= len(byte_lengths):
        return None
    total = sum(nbytes(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk))
    unscored, prev_end = [], 0
    for w in windows:
        unscored.extend(range(prev_end, w.first))
        prev_end = w.end
    return total - nbytes([tokens[i] for i in unscored])
