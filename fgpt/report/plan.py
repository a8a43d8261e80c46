"""`just report --dry-run`: the study's plan before anything trains — every run (arm x seed,
and the uptraining ladder's), its steps and tokens, its training FLOPs (6·N·D plus
attention), the time they would take on this device (from a short pilot: labelled an
estimate) and the disk its run directories need.

FLOPs per training token of a run (PaLM, appendix B, as fgpt.training.metrics.flops_per_token):
6·N for the matmuls of forward and backward, N every parameter (embedding included), plus
12·n_layer·n_embd·T for attention scores and values, T the keys a query sees (n_ctx; the
window for a windowed arm, whose band kernel computes T·W scores, not T²).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fgpt import data
from fgpt.config import GPTConfig
from fgpt.model import count_params
from fgpt.report.budget import Budget, GPT2_VOCAB
from fgpt.report.runs import Launch

CPU_PILOT_FLOPS = 2e11  # the dry-run pilot's step on a CPU: a second or so
BYTES_PER_PARAM_ON_DISK = 12  # fp32 weights (4) + AdamW's two fp32 moments (8), per run directory


def flops_per_token(config: GPTConfig) -> float:
    keys = config.n_ctx if config.window is None else min(config.window, config.n_ctx)
    return 6 * count_params(config) + 12 * config.n_layer * config.n_embd * keys


def vocab_size(budget: Budget) -> int:
    return budget.vocab_size if budget.restrict_vocab else GPT2_VOCAB


def runs(budget: Budget, steps: int) -> list[dict]:
    """Every run the study trains: name, config, steps, tokens, FLOPs."""
    window = budget.window or max(budget.context_cuts)  # the rule picks one of the cuts: plan for the widest
    b = dataclasses.replace(budget, window=window)
    arms = {name: c.replace(vocab_size=vocab_size(budget)) for name, c in b.arms().items()}
    tokens_per_step = budget.batch_size * budget.n_ctx
    out = []
    for seed in sorted({s for a in arms for s in b.seeds_of(a)}):
        for name, config in arms.items():
            if seed in b.seeds_of(name):
                out.append(_run(f"{name}-seed{seed}", config, steps, tokens_per_step))
    top = max(1, round(max(budget.uptrain_percents) / 100 * steps))
    base = arms["baseline"]
    for seed in budget.seeds:
        out.append(_run(f"uptrain-converted-seed{seed}", base.replace(n_kv_head=budget.main_kv_head), top,
                        tokens_per_step))
        out.append(_run(f"uptrain-control-seed{seed}", base, top, tokens_per_step))
    return out


def _run(name: str, config: GPTConfig, steps: int, tokens_per_step: int) -> dict:
    tokens = steps * tokens_per_step
    return {"name": name, "params": count_params(config), "steps": steps, "tokens": tokens,
            "flops": flops_per_token(config) * tokens}


def pilot_flops_per_s(budget: Budget, launch: Launch, steps: int = 2) -> float:
    """Training FLOP/s of the baseline arm on this device, one process: a warm-up step, then
    `steps` timed ones, on random tokens, at one rank's micro-batch (on a CPU at most
    CPU_PILOT_FLOPS a step, where a 124M model's micro-batch would take minutes)."""
    from fgpt.training.train import TrainConfig, train
    config = budget.base_config().replace(vocab_size=vocab_size(budget))
    batch = budget.micro_batch or budget.batch_size
    if launch.device == "cpu":
        batch = max(1, min(batch, int(CPU_PILOT_FLOPS // (flops_per_token(config) * config.n_ctx))))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 4 * (batch + 1) * (config.n_ctx + 1))
    corpus = data.Corpus(train=tokens, val=tokens[:2 * config.n_ctx + 2], cache_dir=None, description="random")
    result = train(TrainConfig(model=config, steps=1 + steps, batch_size=batch, eval_interval=0, checkpoint_interval=0,
                               device=launch.device, precision=launch.precision, progress=False, compile="on" if launch.compile else "off"),
                   corpus=corpus)
    step_s = batch * config.n_ctx / np.median([m["tokens_per_s"] for m in result.metrics[1:]])
    return flops_per_token(config) * batch * config.n_ctx / step_s


def plan(budget: Budget, steps: int, launch: Launch, flops_per_s: float | None, corpus_tokens: int | None) -> dict:
    rows = runs(budget, steps)
    total = sum(r["flops"] for r in rows)
    biggest = max(r["params"] for r in rows)
    disk = sum(BYTES_PER_PARAM_ON_DISK * r["params"] for r in rows) + BYTES_PER_PARAM_ON_DISK * biggest
    if budget.restrict_vocab and corpus_tokens:
        disk += 2 * corpus_tokens  # the restricted corpus's uint16 shards
    seconds = total / (flops_per_s * launch.nproc) if flops_per_s else None
    return {"budget": budget.name, "runs": rows, "steps": steps, "tokens": sum(r["tokens"] for r in rows),
            "flops": total, "flops_per_s": flops_per_s, "seconds": seconds, "disk_bytes": disk,
            "launch": launch.to_dict()}


def describe(p: dict, budget: Budget) -> str:
    lines = [f"budget {p['budget']}: {len(p['runs'])} runs on {p['launch']['device']}, {p['launch']['strategy']} x "
             f"{p['launch']['world_size']}, precision {p['launch']['precision']}",
             f"model {budget.n_layer} layers x {budget.n_embd} ({budget.n_head} heads), n_ctx {budget.n_ctx}, "
             f"vocabulary {vocab_size(budget)}{' (restricted)' if budget.restrict_vocab else ''}, "
             f"batch {budget.batch_size} x {budget.n_ctx} tokens; SWA window "
             + (str(budget.window) if budget.window else f"by the rule after baseline seed {budget.seeds[0]} "
                f"(planned as {max(budget.context_cuts)})"),
             f"{'run':<28} {'params':>12} {'steps':>7} {'tokens':>15} {'FLOPs':>10}"]
    for r in p["runs"]:
        lines.append(f"{r['name']:<28} {r['params']:>12,} {r['steps']:>7} {r['tokens']:>15,} {r['flops']:>10.3e}")
    lines.append(f"total: {p['tokens']:,} tokens, {p['flops']:.3e} FLOPs (6·N·D plus attention)")
    if p["seconds"] is not None:
        lines.append(f"estimated training time: {_duration(p['seconds'])} (estimate: a pilot measured "
                     f"{p['flops_per_s'] / 1e12:.3g} TFLOP/s on one rank, assumed to scale to "
                     f"{p['launch']['world_size']}; probes and measurements come on top)")
    lines.append(f"estimated disk: {p['disk_bytes'] / 2**30:.2f} GiB (weights and AdamW state of every run "
                 f"directory, one checkpoint in flight{', the restricted corpus' if budget.restrict_vocab else ''})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"



def fitted_steps(budget: Budget, flops_per_s: float) -> int:
    """The steps the study's own pilot would give (fgpt.report.study.pilot_steps), from the
    dry-run pilot's rate: train_minutes over every run's steps."""
    pinned = budget.pinned_steps()
    if pinned is not None:
        return pinned
    config = budget.base_config().replace(vocab_size=vocab_size(budget))
    step_s = flops_per_token(config) * budget.batch_size * budget.n_ctx / flops_per_s
    fits = budget.train_minutes * 60 / (budget.run_equivalents() * step_s)
    k = budget.evals_per_run
    return int(min(budget.max_steps, max(budget.min_steps, fits)) // k * k)
