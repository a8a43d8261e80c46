"""What a trained checkpoint gives up at inference: how much of its context it uses, what a
sliding window costs it, how far mean-pooled K/V heads move its loss (and how much a short
uptraining recovers, against a control), how rotary positions hold up past n_ctx, and
samples of each setting side by side.

    opts = ProbeOptions(settings=("context", "window"), max_tokens=8192)
    results = run_probe(config, params, tokens, opts, train_tokens=corpus.train)
    write_outputs(results, "probe/")      # fgpt.evaluation.probe_report: results.json, probe.md, figures

Every loss is mean nats per scored token, on the same tokens within a section, with a 95%
bootstrap interval (over evaluation windows, targets or sequences: each section says which).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fgpt.config import GPTConfig
from fgpt.errors import FgptError, check_at_least
from fgpt.evaluation.probe_gqa import check_uptrain_data, gqa_section, gqa_targets
from fgpt.evaluation.scoring import decode_summary, scored_tokens
from fgpt.evaluation.sections import (Samples, context_cuts, context_section, length_section, window_configs,
                                      window_section)
from fgpt.measure import best_time, machine
from fgpt.model import count_params, forward

SETTINGS = ("context", "window", "gqa", "length", "samples")


@dataclass(frozen=True)
class ProbeOptions:
    settings: tuple[str, ...] = SETTINGS
    windows: tuple[int, ...] | None = None  # None: 32, 64, ... below n_ctx, and n_ctx
    uptrain_steps: int = 20
    uptrain_batch: int = 4
    uptrain_seq: int | None = None  # None: min(256, n_ctx)
    uptrain_lr: float = 1e-4
    max_tokens: int = 8192  # evaluation tokens (the first N of the stream)
    stride: int | None = None  # strided evaluation; None: n_ctx // 2 (run.eval's default)
    context_targets: int = 64
    length_mult: int = 2
    batch_size: int = 8
    decode_tokens: int = 16
    decode_runs: int = 3
    prompts: int = 3
    new_tokens: int = 32
    resamples: int = 1000
    seed: int = 0

    def uptrain_seq_for(self, config: GPTConfig) -> int:
        return min(self.uptrain_seq or 256, config.n_ctx)

    def stride_for(self, config: GPTConfig) -> int:
        return self.stride or max(1, config.n_ctx // 2)

    def windows_for(self, config: GPTConfig) -> list[int]:
        if self.windows is not None:
            return sorted(set(self.windows))
        out, w = [], 32
        while w < config.n_ctx:
            out.append(w)
            w *= 2
        return out + [config.n_ctx]


def check_options(opts: ProbeOptions) -> None:
    """What can be refused before a checkpoint is loaded."""
    unknown = [s for s in opts.settings if s not in SETTINGS]
    if unknown or not opts.settings:
        raise FgptError(f"--settings: unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}"
                        if unknown else f"--settings is empty; choose from {', '.join(SETTINGS)}")
    for flag, value, least in (("--max-tokens", opts.max_tokens, 2), ("--uptrain-steps", opts.uptrain_steps, 0),
                               ("--uptrain-batch", opts.uptrain_batch, 1), ("--uptrain-seq", opts.uptrain_seq, 2),
                               ("--context-targets", opts.context_targets, 1), ("--batch-size", opts.batch_size, 1),
                               ("--decode-tokens", opts.decode_tokens, 1), ("--decode-runs", opts.decode_runs, 1),
                               ("--stride", opts.stride, 1), ("--length-mult", opts.length_mult, 2),
                               ("--prompts", opts.prompts, 1), ("--new-tokens", opts.new_tokens, 1)):
        check_at_least(flag, value, least)
    for w in opts.windows or ():
        check_at_least("--windows", w, 1)
    if not opts.uptrain_lr > 0:
        raise FgptError(f"--uptrain-lr must be positive, got {opts.uptrain_lr}")


def check_model(opts: ProbeOptions, config: GPTConfig) -> None:
    """What needs the model's config."""
    n = config.n_ctx
    too_big = [w for w in opts.windows or () if w > n]
    if too_big:
        raise FgptError(f"--windows {too_big[0]} is larger than the model's n_ctx={n}")
    if opts.stride is not None and opts.stride > n:
        raise FgptError(f"--stride {opts.stride} is larger than the model's n_ctx={n}")
    if opts.decode_tokens >= n and ({"window", "gqa"} & set(opts.settings)):
        raise FgptError(f"--decode-tokens {opts.decode_tokens} leaves no context below n_ctx={n}")


def check_text(config: GPTConfig, n_tokens: int, what: str = "the evaluation text") -> None:
    n = config.n_ctx
    if n_tokens < n + 1:
        raise FgptError(f"{what} has {n_tokens} tokens (after --max-tokens): fewer than "
                        f"n_ctx + 1 = {n + 1}, one window of the model's context")


# --- the plan ---------------------------------------------------------------------------------

def plan(config: GPTConfig, n_tokens: int, opts: ProbeOptions) -> dict[str, dict]:
    """Per section: progress items, forward tokens, training tokens and decode steps."""
    n, on = config.n_ctx, set(opts.settings)
    forward_tokens, _ = scored_tokens(n_tokens, n, opts.stride_for(config))
    decode = (opts.decode_runs + 1) * opts.decode_tokens
    gen = (2 * min(opts.new_tokens, n // 2) + 2) * opts.prompts  # greedy and sampled steps, two prefills
    out = {}
    if "context" in on:
        out["context"] = {"items": 1, "forward": opts.context_targets * sum(context_cuts(n)), "train": 0, "decode": 0}
    if "window" in on:
        rows = len(window_configs(config, opts.windows_for(config))) + 1
        out["window"] = {"items": rows, "forward": rows * forward_tokens, "train": 0, "decode": rows * decode,
                         "generate": (rows - 1) * gen}
    if "gqa" in on:
        k, steps = len(gqa_targets(config)), opts.uptrain_steps
        versions = 2 if steps else 1
        out["gqa"] = {"items": 1 + (1 if steps else 0) + k * versions,
                      "forward": (1 + k) * versions * forward_tokens,
                      "train": (1 + k) * steps * opts.uptrain_batch * opts.uptrain_seq_for(config),
                      "decode": (1 + k) * decode, "generate": (k * versions + (1 if steps else 0)) * gen}
    if "length" in on and config.pos_emb == "rope":
        L = opts.length_mult * n
        count = min(16, n_tokens // (L + 1))
        long_pass = count * (L + scored_tokens(L + 1, n, opts.stride_for(config))[0])
        out["length"] = {"items": 1, "forward": (1 if config.window else 2) * long_pass, "train": 0, "decode": 0}
    if "samples" in on:
        out["samples"] = {"items": 1, "forward": 0, "train": 0, "decode": 0, "generate": gen}
    return out


def measure_rates(params: dict, config: GPTConfig, opts: ProbeOptions) -> dict:
    """Forward tokens/s at [1, n_ctx] with the head on every position (as scoring runs it)
    and decode tokens/s at a long context, measured here."""
    x = torch.zeros(1, config.n_ctx, dtype=torch.long)
    with torch.inference_mode():
        seconds = best_time(lambda: forward(params, x, config), 2)
    speed = decode_summary(config, context=config.n_ctx - min(opts.decode_tokens, config.n_ctx // 2),
                           new_tokens=min(4, config.n_ctx // 2), runs=1)
    return {"forward_tokens_per_s": config.n_ctx / seconds, "decode_tokens_per_s": speed["decode_tokens_per_s"]}


def estimate(work: dict[str, dict], rates: dict) -> dict[str, float]:
    """Seconds per section: forward tokens at the measured rate, a training token at three
    forward tokens' cost (forward + backward), decode and generation steps at the decode rate."""
    f, d = rates["forward_tokens_per_s"], rates["decode_tokens_per_s"]
    return {name: w["forward"] / f + 3 * w["train"] / f + (w["decode"] + w.get("generate", 0)) / d
            for name, w in work.items()}


# --- the whole probe --------------------------------------------------------------------------

def run_probe(config: GPTConfig, params: dict, tokens: np.ndarray, opts: ProbeOptions, *,
              gqa_tokens: np.ndarray | None = None, train_tokens=None, checkpoint: str = "",
              data: str = "", progress: bool = True) -> dict:
    """The sections of `opts.settings` on `tokens` (the GQA section on `gqa_tokens`, default the
    same, uptraining on `train_tokens`); returns the results tree written to results.json."""
    check_options(opts)
    tokens = np.asarray(tokens[:opts.max_tokens], dtype=np.int64)
    gqa_tokens = tokens if gqa_tokens is None else np.asarray(gqa_tokens[:opts.max_tokens], dtype=np.int64)
    on = set(opts.settings)
    if "gqa" in on and opts.uptrain_steps:  # first: the likeliest mistake of a run that trains
        if train_tokens is None:
            raise FgptError(f"--uptrain-steps {opts.uptrain_steps} needs text to train on (or --uptrain-steps 0)")
        check_uptrain_data(train_tokens, steps=opts.uptrain_steps, batch=opts.uptrain_batch,
                           seq=opts.uptrain_seq_for(config))
    check_model(opts, config)
    check_text(config, len(tokens))
    if "gqa" in on:
        check_text(config, len(gqa_tokens), "the validation split of --data (the GQA section's text)")
    torch.manual_seed(opts.seed)
    work = plan(config, len(tokens), opts)
    rates = measure_rates(params, config, opts)
    seconds = estimate(work, rates)
    print(f"probe: {', '.join(f'{k} ~{v / 60:.1f} min' for k, v in seconds.items())}; total ~"
          f"{sum(seconds.values()) / 60:.1f} min (an estimate from {rates['forward_tokens_per_s']:.0f} forward "
          f"tokens/s and {rates['decode_tokens_per_s']:.1f} decode tokens/s measured just now)",
          file=sys.stderr, flush=True)
    bar = tqdm(total=sum(w["items"] for w in work.values()), desc="probe", unit="step", disable=not progress,
               dynamic_ncols=True)

    def tick(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    samples = Samples(tokens, config, opts) if "samples" in on else None
    sample = (lambda label, p, c: samples.add(label, p, c)) if samples else (lambda *a: None)
    results = {"checkpoint": checkpoint, "data": data, "config": config.to_hf_dict(),
               "parameters": count_params(config), "evaluation_tokens": len(tokens),
               "options": dataclasses.asdict(opts) | {"settings": list(opts.settings)}, "machine": machine(),
               "rates": rates, "estimate_s": seconds, "elapsed_s": {}, "about": {}}
    timed = lambda name, f: _timed(results, name, f)  # noqa: E731
    if samples:
        samples.add("as trained", params, config)
    if "context" in on:
        results["context"], results["about"]["context"] = timed("context", lambda: context_section(
            params, config, tokens, opts))
        tick("context")
    if "window" in on:
        results["window"], results["about"]["window"] = timed("window", lambda: window_section(
            params, config, tokens, opts, tick=tick, sample=sample))
    if "gqa" in on:
        results["gqa"], results["about"]["gqa"] = timed("gqa", lambda: gqa_section(
            params, config, gqa_tokens, train_tokens, opts, tick=tick, sample=sample))
    if "length" in on:
        results["length"] = timed("length", lambda: length_section(params, config, tokens, opts))
        if "length" in work:
            tick("length")
    if samples:
        results["samples"] = samples.result()
        tick("samples")
    bar.close()
    return results


def _timed(results: dict, name: str, f):
    start = time.perf_counter()
    out = f()
    results["elapsed_s"][name] = time.perf_counter() - start
    return out
