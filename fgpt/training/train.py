"""The training loop over a parallel Strategy: schedule, accumulation, clipping, eval,
metrics, checkpoints and exact resume.

    result = train(TrainConfig(model=GPTConfig.preset("tiny"), steps=100, out="out/run"))
    result.metrics[-1]["loss"]

Rank-aware throughout: every rank runs the same loop on its slice of the global batch;
only rank 0 writes metrics, progress and the model; each rank writes its own optimizer
state (it may be a shard). Read `train` then `_train`: the loop itself. Its components
live beside it in fgpt/training/: the settings (`run_config.TrainConfig`), the run
directory's files (`run_dir`), each step's metrics row, progress bar and MFU (`metrics`),
Ctrl-C / SIGTERM (`signals`), --precision auto (`precision`), --compile auto (`autocompile`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from fgpt import data, heap, tree
from fgpt.attention import using_causal_kernel
from fgpt.checkpoint import load_checkpoint
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.model import init_params
from fgpt.parallel import Strategy, make_strategy
from fgpt.parallel.process_group import resolve_device
from fgpt.training import attention_kernel, autocompile, precision, run_dir
from fgpt.training.metrics import StepLog, flops_per_token, measured_flops
from fgpt.training.run_config import TrainConfig, check_batch_split, validate
from fgpt.training.signals import StopRequest, stop_requests


@dataclass
class TrainResult:
    """What `train` returns on every rank."""
    config: GPTConfig
    metrics: list[dict] = field(default_factory=list)  # one per optimizer step run here
    out_dir: Path | None = None
    params: dict | None = None  # the final fp32 tree on CPU
    step: int = 0  # optimizer steps done in total (including before a resume)
    interrupted: bool = False  # stopped early by SIGINT / SIGTERM


# --- the schedule -------------------------------------------------------------------------

def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
          cooldown: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over `warmup`
    steps, then either half a cosine down to `min_lr` at the last step ("cosine"), or
    constant `lr` until the last `cooldown` fraction of the steps and a linear decay to
    `min_lr` over them ("wsd", warmup-stable-decay: evaluations before the decay compare
    runs of different lengths at the same learning rate)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "wsd":
        decay = max(1, round(cooldown * total))
        start = total - decay
        if step < start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - start + 1) / decay)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# --- before the first step --------------------------------------------------------------

def check_launch(run: TrainConfig, *, nproc: int) -> None:
    """What a launcher checks before it starts `nproc` ranks on this machine, so that bad
    input is one error there rather than one per rank: every setting, the run directory,
    and the data, tokenised into the cache the ranks then open. (A --init-from
    checkpoint is read by the ranks alone.)"""
    validate(run, world_size=nproc)
    if resolve_device(run.device) == "cuda" and nproc > torch.cuda.device_count():
        raise FgptError(f"nproc={nproc}: this machine has {torch.cuda.device_count()} CUDA devices")
    run = run_dir.effective_settings(run)
    corpus = load_corpus(run)
    if not run.init_from:  # otherwise the context length is the checkpoint's
        _check_fits(corpus, run, (run.model or GPTConfig.preset("tiny")).n_ctx)


def load_corpus(run: TrainConfig, strategy: Strategy | None = None) -> data.Corpus:
    """Rank 0 (or a launcher, without a strategy) tokenises a raw source into the cache
    (streaming, on every core) while the others wait; then all open the same shards.
    Rank 0's failure is shared with every rank, so bad input is one error everywhere,
    never a hang."""
    error = None
    if strategy is None or strategy.is_main:
        try:
            data.build_cache(run.data, text_field=run.text_field, progress=run.progress)
        except FgptError as e:
            error = e
    if strategy is not None and strategy.any_rank(error is not None):
        raise error or FgptError("--data: rank 0 could not prepare the corpus (its error says why)")
    if error is not None:
        raise error
    return data.load_corpus(run.data, text_field=run.text_field, progress=False)


def _check_fits(corpus: data.Corpus, run: TrainConfig, seq_len: int) -> None:
    data.check_fits(corpus.train, seq_len, run.batch_size, "train")
    if run.eval_interval:
        data.check_fits(corpus.val, seq_len, 1, "val")


def initial_params(run: TrainConfig) -> tuple[GPTConfig, dict]:
    """A fresh run's model: the --init-from checkpoint's, else initialised from the seed."""
    if run.init_from:
        model_config, params = load_checkpoint(run.init_from)
        if run.model is not None and run.model != model_config:
            differ = [f"{f.name}={getattr(run.model, f.name)} (the checkpoint's: {getattr(model_config, f.name)})"
                      for f in dataclasses.fields(GPTConfig)
                      if getattr(run.model, f.name) != getattr(model_config, f.name)]
            raise FgptError(f"--init-from {run.init_from}: its model config contradicts {', '.join(differ)}; "
                            "leave the model flags out to train the checkpoint's model")
        return model_config, params
    model_config = run.model or GPTConfig.preset("tiny")
    return model_config, init_params(model_config, seed=run.seed)


class Start(NamedTuple):
    """Where a session of a run begins."""
    model_config: GPTConfig
    corpus: data.Corpus
    first_step: int  # optimizer steps already done
    elapsed_s: float  # training time before this session


def start(run: TrainConfig, strategy: Strategy, corpus: data.Corpus | None) -> Start:
    """Set the strategy up at step 0, or where the checkpoint in `run.out` left off."""
    if run.resume:
        model_config, params, resumed = run_dir.load_train_checkpoint(Path(run.out), strategy)
    else:
        (model_config, params), resumed = initial_params(run), None
    corpus = corpus or load_corpus(run, strategy)
    data.check_vocab(corpus, model_config.vocab_size)
    _check_fits(corpus, run, model_config.n_ctx)
    strategy.setup(params, model_config, lr=run.lr, weight_decay=run.weight_decay, betas=run.betas,
                   precision=run.precision)
    del params  # the strategy holds its own (possibly sharded) copy
    if resumed is None:
        torch.manual_seed(run.seed + strategy.rank)  # dropout differs per rank, as in DDP
        return Start(model_config, corpus, 0, 0.0)
    strategy.load_optimizer_state(resumed.optimizer)
    if resumed.rng is None:  # another world size: no saved stream fits; only dropout draws
        torch.manual_seed(run.seed + 1_000_003 * resumed.step + strategy.rank)
    else:
        torch.set_rng_state(resumed.rng["cpu"])
        if "cuda" in resumed.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(resumed.rng["cuda"])
    # returning drops this loop's hold on the memory-mapped rank files
    return Start(model_config, corpus, resumed.step, resumed.elapsed_s)


class NonFiniteLoss(FgptError):
    """A step's loss is NaN or infinite (checked before the optimizer step)."""


# --- the loop -------------------------------------------------------------------------------

def train(run: TrainConfig, *, corpus: data.Corpus | None = None) -> TrainResult:
    """Run (or continue) a training run; see `fgpt.training.run_dir` for what is written.
    `corpus`: train on these token arrays instead of reading `run.data` (in-process use,
    e.g. the study's restricted-vocabulary corpus)."""
    validate(run)
    if run.heap == "kept":
        heap.keep_freed_memory()  # each step reuses the pages the last one freed (fgpt/heap.py)
    strategy = make_strategy(run.strategy, device=resolve_device(run.device), compile=run.compile == "on",
                             reduce_dtype=run.reduce_dtype, recompute=run.recompute, window_kernel=run.window_kernel)
    try:
        run = resolve_precision(run, strategy)
        with stop_requests() as stop:
            return _train(run, strategy, stop, corpus)
    finally:
        strategy.close()


def resolve_precision(run: TrainConfig, strategy: Strategy) -> TrainConfig:
    """--precision auto -> fp32 or bf16, so the saved run config records the choice: on
    resume the run's own; else what this device measures faster, by a vote of the ranks so
    that all of them agree."""
    if run.precision != "auto":
        return run
    if run.resume:
        return dataclasses.replace(run, precision=run_dir.saved_run(run.out)[0].precision)
    vote = torch.tensor(1.0 if precision.choose(str(strategy.device)) == "bf16" else 0.0)
    chosen = "bf16" if float(strategy.mean_across_ranks(vote)) > 0.5 else "fp32"
    logging.getLogger("fgpt").info("--precision auto: %s (a bf16 matmul runs at %.2fx fp32's speed here)",
                                   chosen, precision.measured_speedup(str(strategy.device)))
    return dataclasses.replace(run, precision=chosen)


def resolve_compile(run: TrainConfig, strategy: Strategy, model_config: GPTConfig, *, steps_left: int) -> None:
    """--compile auto: compile where this session's steps pay for it here (fgpt/training/autocompile.py);
    one stderr line says which and why. The run config keeps `auto`: a resume decides again."""
    dtype = tree.COMPUTE_DTYPES[run.precision]
    decision = autocompile.choose(
        strategy=run.strategy, recompute=run.recompute, precision=run.precision, steps_left=steps_left,
        step_flops=flops_per_token(model_config, model_config.n_ctx) * model_config.n_ctx
        * run.batch_size // strategy.world_size, matmul_flops=lambda: measured_flops(strategy.device.type, dtype))
    strategy.compile = decision.on
    if strategy.is_main:
        print(decision.reason, file=sys.stderr)


def resolve_attention_kernel(run: TrainConfig, strategy: Strategy, model_config: GPTConfig) -> tuple[tuple, str]:
    """(fgpt.attention's key of this run's full causal layers, their kernel): --attention-kernel,
    or for auto the faster of SDPA and explicit scores here (fgpt/training/attention_kernel.py)
    by a vote of the ranks, so that all of them run the same maths; one stderr line where
    auto picked the scores."""
    batch = run.batch_size // (run.grad_accum * strategy.world_size)
    dtype = tree.COMPUTE_DTYPES[run.precision]
    key = attention_kernel.step_key(model_config, batch, model_config.n_ctx, dtype, strategy.device)
    if run.attention_kernel == "scores" and model_config.dropout > 0:
        raise FgptError(f"--attention-kernel scores has no attention dropout; this model's dropout is "
                        f"{model_config.dropout} (use auto or sdpa)")
    if run.attention_kernel != "auto":
        return key, run.attention_kernel
    mine = attention_kernel.fastest(model_config, batch, model_config.n_ctx, dtype, strategy.device)
    votes = float(strategy.mean_across_ranks(torch.tensor(1.0 if mine == "scores" else 0.0)))
    kernel = "scores" if votes > 0.5 else "sdpa"
    if kernel == "scores" and strategy.is_main:
        print(f"--attention-kernel auto: scores, measured faster than SDPA here for {batch} x "
              f"{model_config.n_ctx} tokens in {run.precision}", file=sys.stderr)
    return key, kernel


def _train(run: TrainConfig, strategy: Strategy, stop: StopRequest, corpus: data.Corpus | None) -> TrainResult:
    check_batch_split(run, strategy.world_size)
    run = run_dir.effective_settings(run)
    model_config, corpus, first, elapsed_s = start(run, strategy, corpus)
    if run.compile == "auto":
        resolve_compile(run, strategy, model_config, steps_left=(run.stop_after or run.steps) - first)
    kernel_key, kernel = resolve_attention_kernel(run, strategy, model_config)
    out_dir = Path(run.out) if run.out else None
    result = TrainResult(config=model_config, out_dir=out_dir, step=first)
    log = StepLog(run, strategy, model_config, first=first, elapsed_s=elapsed_s)
    with using_causal_kernel(kernel_key, kernel):  # this run's steps and evaluations
        try:
            for step in range(first, run.steps):
                n = step + 1
                row = _train_step(run, strategy, corpus, model_config.n_ctx, step, log)
                if run.eval_interval and (n % run.eval_interval == 0 or n == run.steps):
                    row["val_loss"] = evaluate(strategy, corpus, run, model_config)
                    row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
                log.write(row)
                result.metrics.append(row)
                result.step = n
                stopping = stop.anywhere(strategy) or n == run.stop_after
                periodic = run.checkpoint_interval and n % run.checkpoint_interval == 0
                if out_dir and (periodic or stopping or n == run.steps):
                    run_dir.save_train_checkpoint(out_dir, strategy, run, model_config, step=n,
                                                  elapsed_s=log.elapsed_s())
                if stopping:
                    result.interrupted = True
                    break
        except NonFiniteLoss as e:
            saved = run_dir.train_state(out_dir)
            where = (f"; the last good checkpoint (step {saved['step']}) stays in {out_dir}" if saved
                     else "; no checkpoint had been written" if out_dir else "")
            raise FgptError(f"{e}{where}") from None
        finally:
            log.close()
    result.params = strategy.full_params()
    return result


def _train_step(run: TrainConfig, strategy: Strategy, corpus: data.Corpus, seq_len: int, step: int,
                log: StepLog) -> dict:
    """Optimizer step `step` (0-based) on its global batch: the metrics row it logs."""
    started = time.perf_counter()
    lr = lr_at(step, lr=run.lr, min_lr=run.lr_floor, warmup=run.warmup_steps, total=run.steps,
               schedule=run.schedule, cooldown=run.cooldown)
    x, y = data.rank_batch(corpus.train, seq_len=seq_len, batch_size=run.batch_size, seed=run.seed, step=step,
                           rank=strategy.rank, world_size=strategy.world_size, ignore_id=corpus.ignore_id)
    loss, grad_norm = optimizer_step(strategy, data.micro_batches(x, y, run.grad_accum), lr=lr,
                                     grad_clip=run.grad_clip, step=step + 1)
    return log.row(step + 1, loss=loss, lr=lr, grad_norm=grad_norm, step_s=time.perf_counter() - started)


def optimizer_step(strategy: Strategy, micro_batches: list, *, lr: float, grad_clip: float,
                   step: int) -> tuple[float, float]:
    """Accumulate over the micro-batches, check the loss, clip, step: (loss, grad norm).
    The loss is the mean over the global batch, so every rank takes the same branch."""
    grad_accum = len(micro_batches)
    losses = [strategy.forward_backward(x, y, scale=1.0 / grad_accum, sync=i == grad_accum - 1)
              for i, (x, y) in enumerate(micro_batches)]
    loss = float(strategy.mean_across_ranks(torch.stack(losses).mean().float()))
    if not math.isfinite(loss):  # before the optimizer step: the params stay good
        raise NonFiniteLoss(f"loss is {loss} at step {step}: training stopped")
    grad_norm = strategy.clip_grad_norm(grad_clip)
    strategy.set_lr(lr)
    strategy.step()
    return loss, grad_norm


def evaluate(strategy: Strategy, corpus: data.Corpus, run: TrainConfig, model_config: GPTConfig) -> float:
    """Mean loss over `eval_iters` fixed validation batches: the same at every evaluation, for
    every training seed (they depend on the data alone)."""
    batch = run.batch_size // run.grad_accum  # global micro-batch size: fits in memory
    losses = []
    for i in range(run.eval_iters):
        x, y = data.eval_batch(corpus.val, seq_len=model_config.n_ctx, batch_size=batch, seed=data.EVAL_SEED,
                               index=i, rank=strategy.rank, world_size=strategy.world_size,
                               ignore_id=corpus.ignore_id)
        losses.append(strategy.eval_loss(x, y).float().cpu())
    return float(strategy.mean_across_ranks(torch.stack(losses).mean()))
