"""The probe's measurements on one model: strided losses per evaluation window (with
bootstrap intervals over the windows), decode speed and KV-cache bytes.

    s = score(params, config, tokens, n_ctx=1024, stride=512, batch_size=8)
    loss_summary(s, resamples=1000)               # {"loss", "loss_lo", "loss_hi", "ppl", "tokens", ...}
    loss_summary(s, resamples=1000, ref=full)     # ... and "delta" (s - full) with its paired interval

Scoring is fgpt.evaluation.perplexity's (HF's strided perplexity), window by window: the pooled loss is
exactly what `run.eval --n-ctx N --stride S` prints for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgpt.config import GPTConfig
from fgpt.evaluation.perplexity import batches, plan_windows, window_nlls
from fgpt.report import efficiency
from fgpt.report.stats import bootstrap_ratio


@dataclass(frozen=True)
class Scored:
    nll: np.ndarray  # [windows] summed NLL of each evaluation window's scored tokens, nats
    count: np.ndarray  # [windows] scored tokens

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / self.count.sum())


def scored_tokens(n_tokens: int, n_ctx: int, stride: int) -> tuple[int, int]:
    """(forward tokens, scored tokens) of a strided evaluation: what it costs and counts."""
    windows = plan_windows(n_tokens, n_ctx, stride)
    return sum(w.length for w in windows), sum(w.end - w.first for w in windows)


def score(params: dict, config: GPTConfig, tokens, *, n_ctx: int, stride: int, batch_size: int) -> Scored:
    """Per evaluation window NLL, batched exactly as fgpt.evaluation.perplexity.strided_nll batches."""
    windows = plan_windows(len(tokens), n_ctx, stride)
    parts = [window_nlls(params, config, tokens, group) for group in batches(windows, batch_size)]
    return Scored(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def loss_summary(s: Scored, *, resamples: int, ref: Scored | None = None, seed: int = 0) -> dict:
    """Pooled loss with its 95% bootstrap interval over evaluation windows; with `ref` (the
    same windows under another model) also the paired difference s - ref and its interval."""
    iv = bootstrap_ratio(s.nll, s.count, resamples=resamples, seed=seed)
    out = {"loss": iv["mean"], "loss_lo": iv["lo"], "loss_hi": iv["hi"], "ppl": float(np.exp(iv["mean"])),
           "tokens": int(s.count.sum()), "windows": int(len(s.nll))}
    if ref is not None:
        d = bootstrap_ratio(s.nll - ref.nll, s.count, resamples=resamples, seed=seed)
        out |= {"delta": d["mean"], "delta_lo": d["lo"], "delta_hi": d["hi"]}
    return out


def decode_summary(config: GPTConfig, *, context: int, new_tokens: int, runs: int) -> dict:
    """Greedy decode tokens/s (batch 1) after `context` cached tokens, median and range over
    `runs` timed runs (random weights of the same shapes: a step's cost does not depend on
    the values), and the fp32 KV-cache bytes at that context plus the new tokens."""
    speeds = efficiency.decode_runs(config, context=context, batch=1, new_tokens=new_tokens, runs=runs)
    return {"decode_context": context, "decode_tokens_per_s": float(np.median(speeds)),
            "decode_tokens_per_s_lo": float(min(speeds)), "decode_tokens_per_s_hi": float(max(speeds)),
            "decode_runs": len(speeds),
            "kv_cache_bytes": efficiency.kv_cache_bytes(config, context + new_tokens)}
