"""GQA by conversion (Ainslie et al. 2023): K/V heads mean-pooled (fgpt.convert.to_gqa) to
every divisor of the model's kv heads, scored before any training and after a short
uptraining; the control is the unconverted model uptrained the same steps the same way (same
batches, learning rate, schedule), so what the converted model recovers is told apart from
what any extra training on this text gives.
"""

from __future__ import annotations

from typing import Callable

from fgpt import data
from fgpt.config import GPTConfig
from fgpt.convert import to_gqa
from fgpt.errors import FgptError
from fgpt.evaluation.scoring import Scored, decode_summary, loss_summary, score
from fgpt.parallel import make_strategy
from fgpt.training.train import lr_at, optimizer_step


def gqa_targets(config: GPTConfig) -> list[int]:
    """Every kv-head count the pooling can reach: the divisors of the model's kv heads that
    also divide n_head, below the current count, largest first."""
    return [g for g in range(config.kv_heads - 1, 0, -1) if config.kv_heads % g == 0 and config.n_head % g == 0]


def check_uptrain_data(train_tokens, *, steps: int, batch: int, seq: int) -> None:
    """Uptraining needs a training split holding at least one batch."""
    if steps == 0:
        return
    try:
        data.check_fits(train_tokens, seq, batch, "train")
    except FgptError as e:
        raise FgptError(f"--uptrain-steps {steps} needs text to train on: {e} (or --uptrain-steps 0)") from None


def uptrain(params: dict, config: GPTConfig, train_tokens, *, steps: int, batch: int, seq: int, lr: float,
            seed: int) -> dict:
    """`steps` AdamW steps of the single-device strategy on batches of `batch` x `seq` tokens
    (a pure function of seed and step), linear warmup over a tenth of the steps, then constant
    lr. Returns a new tree; `params` is not modified."""
    strategy = make_strategy("single", device="cpu")
    strategy.setup(params, config, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), precision="fp32")
    warmup = max(1, steps // 10)
    for step in range(steps):
        x, y = data.rank_batch(train_tokens, seq_len=seq, batch_size=batch, seed=seed, step=step, rank=0,
                               world_size=1)
        rate = lr_at(step, lr=lr, min_lr=lr, warmup=warmup, total=steps)
        optimizer_step(strategy, [(x, y)], lr=rate, grad_clip=1.0, step=step + 1)
    out = strategy.full_params()
    strategy.close()
    return out


def gqa_section(params: dict, config: GPTConfig, tokens, train_tokens, opts, *, tick: Callable[[str], None],
                sample: Callable[[str, dict, GPTConfig], None]) -> tuple[list[dict], dict]:
    """(rows, about): a row per (n_kv_head, steps) with the converted model's loss and the
    control's on the same evaluation windows, their paired difference (`delta`), and decode
    speed / KV-cache bytes; `about` says what was measured, and holds the unconverted rows."""
    n_ctx, steps = config.n_ctx, opts.uptrain_steps
    seq = opts.uptrain_seq_for(config)
    stride = opts.stride_for(config)
    evaluate = lambda p, c: score(p, c, tokens, n_ctx=n_ctx, stride=stride, batch_size=opts.batch_size)  # noqa: E731
    ctx = n_ctx - opts.decode_tokens
    control: dict[int, Scored] = {0: evaluate(params, config)}
    tick("gqa: the unconverted model")
    base = loss_summary(control[0], resamples=opts.resamples) | {"n_kv_head": config.kv_heads}
    base |= decode_summary(config, context=ctx, new_tokens=opts.decode_tokens, runs=opts.decode_runs)
    control_summary = {0: base}
    if steps:
        trained = uptrain(params, config, train_tokens, steps=steps, batch=opts.uptrain_batch, seq=seq,
                          lr=opts.uptrain_lr, seed=opts.seed)
        control[steps] = evaluate(trained, config)
        control_summary[steps] = loss_summary(control[steps], resamples=opts.resamples)
        sample(f"control: {config.kv_heads} kv heads, uptrained {steps} steps", trained, config)
        del trained
        tick(f"gqa: control uptrained {steps} steps")
    rows = []
    for g in gqa_targets(config):
        gqa_config, gqa_params = to_gqa(config, params, g)
        speed = decode_summary(gqa_config, context=ctx, new_tokens=opts.decode_tokens, runs=opts.decode_runs)
        versions = [(0, gqa_params)]
        if steps:
            versions.append((steps, uptrain(gqa_params, gqa_config, train_tokens, steps=steps,
                                            batch=opts.uptrain_batch, seq=seq, lr=opts.uptrain_lr, seed=opts.seed)))
        for n, p in versions:
            s = evaluate(p, gqa_config)
            row = {"n_kv_head": g, "steps": n} | loss_summary(s, resamples=opts.resamples, ref=control[n])
            row |= {"control_loss": control_summary[n]["loss"], "control_loss_lo": control_summary[n]["loss_lo"],
                    "control_loss_hi": control_summary[n]["loss_hi"]} | speed
            rows.append(row)
            sample(f"GQA {g} kv heads, {n} steps", p, gqa_config)
            tick(f"gqa: {g} kv heads, {n} steps")
        del gqa_params, versions
    return rows, {"setting": (f"K/V heads mean-pooled from {config.kv_heads} to each divisor; loss before training and "
                        f"after {steps} uptraining steps ({opts.uptrain_batch} x {seq} tokens a step, AdamW, "
                        f"lr {opts.uptrain_lr:g} after a {max(1, steps // 10)}-step warmup, seed {opts.seed}); "
                        f"the control is the unconverted model uptrained the same way. Strided evaluation, "
                        f"windows of {n_ctx}, stride {stride}; intervals: 95% bootstrap over evaluation windows"),
            "uptrain": {"steps": steps, "batch": opts.uptrain_batch, "seq": seq, "lr": opts.uptrain_lr,
                        "warmup": max(1, steps // 10), "seed": opts.seed},
            "unconverted": control_summary[0], "control_uptrained": control_summary.get(steps) if steps else None}
