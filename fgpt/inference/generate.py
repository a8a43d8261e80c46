"""Sampling from a model with a preallocated KV cache: prefill once, then one token a step.

    for new in stream(params, config, [prompt_ids], 50, sampling=Sampling(temperature=0.8)):
        ...                                   # new: [rows] token ids (-1 once a row has stopped)
    sequences = generate(params, config, [ids_a, ids_b], 50, num_samples=2, seed=0)

Prompts of different lengths run as one left-padded batch: the cache knows each row's
padding, so positions start at 0 in every row and padding is never attended to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from fgpt.config import GPTConfig
from fgpt.data.tokenizer import EOT
from fgpt.errors import FgptError
from fgpt.inference.decode_layout import decode_layout  # noqa: F401  (re-exported: a decode step's layouts)
from fgpt.inference.kv_cache import KVCache
from fgpt.model import forward

STOPPED = -1  # what `stream` yields for a row that has already met its end-of-text


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set
    whose probability reaches p (nucleus sampling). Both filters apply after temperature."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # NaN too; inf would sample uniformly
            raise FgptError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise FgptError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FgptError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    logits = logits.float()  # also for argmax: slower over bf16 on CPU (no `just bench` row isolates it)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the likelier ones already reach p (the likeliest always stays)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """logits [B, V] -> token ids [B], row i drawn with its own settings and generator: the
    rows of a continuous batch (fgpt/serving) belong to different requests. Row i gets the
    token `sample` gives it alone, so a request's seed yields what `stream` yields for it;
    greedy rows share one argmax (a row's argmax does not depend on its neighbours)."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(samplings) if s.temperature == 0]
    if greedy:
        out[greedy] = sample(logits[greedy], Sampling(temperature=0), None)
    for i, (s, g) in enumerate(zip(samplings, generators)):
        if s.temperature != 0:
            out[i] = sample(logits[i:i + 1], s, g)[0]
    return out


def _step(params: dict, tokens: torch.Tensor, config: GPTConfig, cache: KVCache,
          window_kernel: str = "band") -> torch.Tensor:
    """tokens [B, T] continue the cached sequence -> logits of the last position [B, V]."""
    return forward(params, tokens, config, cache=cache, last_only=True, window_kernel=window_kernel)[:, -1]


def check_length(config: GPTConfig, longest: int, max_new_tokens: int, allow_past_ctx: bool = False) -> None:
    """Refuse a prompt + continuation longer than the model's context, where it has one."""
    if longest + max_new_tokens <= config.n_ctx:
        return
    if config.pos_emb == "rope" and (config.max_window is not None or allow_past_ctx):
        return  # rotary positions extend; all-windowed layers keep rolling caches
    why = ("learned positions stop at n_ctx" if config.pos_emb == "learned" else
           "full-attention layers; pass allow_past_ctx=True (run.generate: --allow-past-ctx) to extrapolate anyway")
    raise FgptError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                    f"n_ctx={config.n_ctx} ({why})")


def _validate(prompts: Sequence[Sequence[int]], config: GPTConfig, max_new_tokens: int, num_samples: int):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FgptError("empty prompt: give at least one token")
    if max_new_tokens < 0:
        raise FgptError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise FgptError(f"num_samples must be >= 1, got {num_samples}")
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise FgptError(f"token id {bad[0]} is outside the vocabulary of {config.vocab_size}")


@torch.inference_mode()
def stream(params: dict, config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           sampling: Sampling = Sampling(), seed: int | None = None, num_samples: int = 1,
           eos_id: int | None = EOT, ignore_eos: bool = False, allow_past_ctx: bool = False,
           vocab_limit: int | None = None, window_kernel: str = "band") -> Iterator[torch.Tensor]:
    """Yield, per step, the new token of every row ([len(prompts) * num_samples] ids; rows
    are prompt-major). A row that produced `eos_id` yields STOPPED afterwards; the stream
    ends when every row has stopped or after `max_new_tokens` steps. `vocab_limit`: sample
    only ids below it (a vocabulary padded past the tokenizer's, e.g. 50304 for 50257).
    `window_kernel`: the kernel of windowed layers in the prefill, the one full-sequence pass."""
    _validate(prompts, config, max_new_tokens, num_samples)
    if vocab_limit is not None and not 0 < vocab_limit <= config.vocab_size:
        raise FgptError(f"vocab_limit must be in [1, {config.vocab_size}], got {vocab_limit}")
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    longest = max(len(r) for r in rows)
    check_length(config, longest, max_new_tokens, allow_past_ctx)
    if max_new_tokens == 0:
        return
    ln_f = params["ln_f"]["weight"]  # the activations' dtype, also where wte is int8
    device = ln_f.device
    pad = torch.tensor([longest - len(r) for r in rows], device=device)  # [N]
    tokens = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)  # [N, T]
    cache = KVCache.allocate(config, len(rows), longest + max_new_tokens, dtype=ln_f.dtype,
                             device=device, pad=pad)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stops = eos_id is not None and not ignore_eos
    stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)

    logits = _step(params, tokens, config, cache, window_kernel)  # prefill: [N, V]
    for i in range(max_new_tokens):
        new = sample(logits[:, :vocab_limit], sampling, generator)  # [N]
        yield new.masked_fill(stopped, STOPPED)
        if stops:
            stopped |= new == eos_id
            if bool(stopped.all()):
                return
        if i + 1 < max_new_tokens:
            logits = _step(params, new[:, None], config, cache)


def generate(params: dict, config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             on_token: Callable[[torch.Tensor], None] | None = None, eos_id: int | None = EOT,
             ignore_eos: bool = False, num_samples: int = 1, **kwargs) -> list[list[int]]:
    """Each prompt followed by its continuation, `num_samples` rows per prompt (prompt-major).
    A stopping end-of-text token is not included. `on_token` sees each step's new tokens;
    other keywords are those of `stream`."""
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    for new in stream(params, config, prompts, max_new_tokens, eos_id=eos_id, ignore_eos=ignore_eos,
                      num_samples=num_samples, **kwargs):
        if on_token is not None:
            on_token(new)
        for row, t in zip(rows, new.tolist()):
            if t != STOPPED and (ignore_eos or t != eos_id):
                row.append(t)
    return rows
