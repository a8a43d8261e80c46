"""The probe's sections, each on one model and one token stream: context use, windows at
inference, rotary length, and the samples collected from every setting (the GQA section is
fgpt/evaluation/probe_gqa.py). Each returns its rows and what it measured (`setting`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from fgpt.config import GPTConfig
from fgpt.data.tokenizer import EOT, gpt2_encoding
from fgpt.evaluation.scoring import decode_summary, loss_summary, score
from fgpt.report import probes
from fgpt.report.stats import bootstrap_interval

if TYPE_CHECKING:
    from fgpt.evaluation.probe import ProbeOptions


def context_cuts(n_ctx: int) -> list[int]:
    cuts, k = [], 8
    while k < n_ctx:
        cuts.append(k)
        k *= 2
    return cuts + [n_ctx]


def context_section(params: dict, config: GPTConfig, tokens: np.ndarray, opts: ProbeOptions) -> tuple[list, dict]:
    """The loss of fixed targets given exactly the k tokens before each, k = 8, 16, ..., n_ctx."""
    cuts = context_cuts(config.n_ctx)
    targets = probes.context_targets(tokens, config.n_ctx, opts.context_targets, None)
    losses = probes.context_losses(params, config, tokens, targets, tuple(cuts))
    full = losses[config.n_ctx]
    rows = []
    for k in cuts:
        iv = bootstrap_interval(losses[k], resamples=opts.resamples, seed=opts.seed)
        gain = bootstrap_interval(losses[k] - full, resamples=opts.resamples, seed=opts.seed)
        rows.append({"k": k, "loss": iv["mean"], "loss_lo": iv["lo"], "loss_hi": iv["hi"],
                     "minus_full": gain["mean"], "minus_full_lo": gain["lo"], "minus_full_hi": gain["hi"],
                     "targets": len(targets)})
    return rows, {"setting": (f"{len(targets)} targets spread evenly over the evaluation text, each scored given "
                              f"exactly its previous k tokens (one forward of length k per target and k); "
                              f"the last column is loss(k) - loss({config.n_ctx}) on the same targets; intervals: 95% "
                              "bootstrap over targets"),
                  "target_positions": [int(t) for t in targets]}


def window_configs(config: GPTConfig, windows: list[int]) -> list[tuple[str, object, GPTConfig]]:
    """(pattern, window field, config) per setting: every layer windowed to W, then local W /
    global alternating over the layers (layer 0 local) for each W below n_ctx."""
    out = [("all layers", w, config.replace(window=w)) for w in windows]
    if config.n_layer >= 2:
        for w in windows:
            if w < config.n_ctx:
                per_layer = tuple(w if i % 2 == 0 else None for i in range(config.n_layer))
                out.append(("alternating local/global", list(per_layer), config.replace(window=per_layer)))
    return out


def window_section(params: dict, config: GPTConfig, tokens: np.ndarray, opts: ProbeOptions, *, tick,
                   sample) -> tuple[list, dict]:
    """Each window setting against the model as trained, on the same evaluation windows."""
    n_ctx, stride = config.n_ctx, opts.stride_for(config)
    ctx = n_ctx - opts.decode_tokens
    evaluate = lambda c: score(params, c, tokens, n_ctx=n_ctx, stride=stride, batch_size=opts.batch_size)  # noqa: E731
    ref = evaluate(config)
    reference = loss_summary(ref, resamples=opts.resamples) | decode_summary(
        config, context=ctx, new_tokens=opts.decode_tokens, runs=opts.decode_runs)
    tick("window: the model as trained")
    rows = []
    for pattern, window, c in window_configs(config, opts.windows_for(config)):
        row = {"window": window, "pattern": pattern} | loss_summary(evaluate(c), resamples=opts.resamples, ref=ref)
        rows.append(row | decode_summary(c, context=ctx, new_tokens=opts.decode_tokens, runs=opts.decode_runs))
        sample(f"window {window if pattern == 'all layers' else str(window[0]) + ' / full, alternating'}", params, c)
        tick(f"window {pattern} {window}")
    trained = "full attention" if config.window is None else f"window {config.window} (as trained)"
    return rows, {"setting": (f"The checkpoint with its attention windowed at inference only, no training; "
                              f"strided evaluation of the same tokens (windows of {n_ctx}, stride {stride}); "
                              f"delta = loss - loss with {trained}; intervals: 95% bootstrap over evaluation "
                              f"windows. Decode: greedy, batch 1, {opts.decode_tokens} new tokens after {ctx} "
                              f"cached, median [min, max] of {opts.decode_runs} runs; KV cache in fp32 bytes"),
                  "reference": reference | {"window": config.window}}


def length_section(params: dict, config: GPTConfig, tokens: np.ndarray, opts: ProbeOptions) -> dict:
    """Rotary models: one pass over length_mult x n_ctx tokens against a sliding-n_ctx
    evaluation of the same tokens, per position; learned positions cannot run past n_ctx."""
    n, mult, stride = config.n_ctx, opts.length_mult, opts.stride_for(config)
    if config.pos_emb != "rope":
        return {"applies": False, "reason": f"learned position embeddings end at n_ctx={n}: the model has no "
                "embedding for a later position, so it cannot be run past its context (only a sliding "
                "evaluation, which never shows it more than n_ctx tokens, applies)"}
    count = min(16, len(tokens) // (mult * n + 1))
    if count < 1:
        return {"applies": False, "reason": f"the evaluation text ({len(tokens)} tokens) is shorter than one "
                f"sequence of {mult} x n_ctx + 1 = {mult * n + 1} tokens; raise --max-tokens"}
    inputs, targets = probes.length_sequences(tokens, n, mult, count)
    models = {"one pass": None}
    if config.window is None:
        models[f"one pass, window {n} at inference"] = config.replace(window=n)
    bins = [(i * n, (i + 1) * n) for i in range(mult)]
    out = {"applies": True, "n_ctx": n, "length": mult * n, "stride": stride, "sequences": count,
           "bins": [list(b) for b in bins], "models": {},
           "setting": (f"{count} sequences of {mult * n} tokens, each scored once in one pass and once by a "
                       f"sliding evaluation with windows of n_ctx={n}, stride {stride} (every position sees "
                       f"at most n_ctx tokens); penalty = one pass - sliding, per position; intervals: 95% "
                       "bootstrap over sequences (few: read them as rough)")}
    for label, eval_config in models.items():
        r = probes.length_penalty(params, config, inputs, targets, stride, None, eval_config=eval_config)
        per_bin = []
        for a, b in bins:
            row = {"positions": [a, b]}
            for key in ("long", "sliding", "penalty"):
                iv = bootstrap_interval(r[key][:, a:b], resamples=opts.resamples, seed=opts.seed)
                name = key if key == "penalty" else f"{key}_loss"
                row |= {name: iv["mean"], f"{name}_lo": iv["lo"], f"{name}_hi": iv["hi"]}
            per_bin.append(row)
        out["models"][label] = {"bins": per_bin, "long_loss": float(np.nanmean(r["long"])),
                                "sliding_loss": float(np.nanmean(r["sliding"])),
                                "inside_max_abs": float(np.nanmax(np.abs(r["penalty"][:, :n]))),
                                "curve": [float(np.nanmean(r["penalty"][:, i:i + 16]))
                                          for i in range(0, mult * n, 16)]}
    return out


class Samples:
    """The same prompts, greedy and sampled (temperature 0.8, top-k 40, seed 0), per setting."""

    def __init__(self, tokens: np.ndarray, config: GPTConfig, opts: ProbeOptions):
        self.new = min(opts.new_tokens, config.n_ctx // 2)
        length = min(24, config.n_ctx // 2)
        starts = probes.evenly_spaced(len(tokens), length + self.new, opts.prompts)
        self.prompts = [tokens[s:s + length].astype(np.int64).tolist() for s in starts]
        self.limit = min(config.vocab_size, EOT + 1)
        self.enc = gpt2_encoding()
        self.rows: dict[str, dict] = {}

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([t for t in ids if t < EOT])

    def add(self, label: str, params: dict, config: GPTConfig) -> None:
        gen = probes.continuations(params, config, self.prompts, self.new, eos_id=EOT, vocab_limit=self.limit)
        self.rows[label] = {k: [self.decode(g) for g in v] for k, v in gen.items()}

    def result(self) -> dict:
        return {"prompts": [self.decode(p) for p in self.prompts], "new_tokens": self.new,
                "sampling": dataclasses.asdict(probes.SAMPLED) | {"seed": 0}, "settings": self.rows}
