"""The training loop over a parallel Strategy: schedule, accumulation, clipping, eval,
metrics, checkpoints and exact resume.

    result = train(TrainConfig(model=GPTConfig.preset("tiny"), steps=100, out="out/run"))
    result.metrics[-1]["loss"]

Rank-aware throughout: every rank runs the same loop on its slice of the global batch;
only rank 0 writes metrics, progress and the model; each rank writes its own optimizer
state (it may be a shard). Layout of the output directory:

    model.safetensors, config.json   the newest weights, HF layout (links into step-N)
    train_state.pt                   the commit record: step, run config, elapsed time,
                                     which step directory is whole, its model's digest
    metrics.jsonl                    one JSON object per optimizer step
    checkpoints/step-N/              model.safetensors, config.json, and optimizer.rank{r}.pt:
                                     optimizer and RNG state of rank r (custom-fsdp's and
                                     ddp's resume on another world size too)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fgpt import data, precision
from fgpt.atomic import atomic_path, atomic_write_text
from fgpt.attention import use_window_kernel
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.model import count_params, init_params
from fgpt.parallel import Strategy, make_strategy
from fgpt.parallel.optimizer_state import SavedOptimizer

log = logging.getLogger("fgpt")

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"steps", "stop_after", "eval_interval", "eval_iters", "checkpoint_interval", "out",
                     "resume", "device", "compile", "progress", "window_kernel", "strategy", "reduce_dtype"}


@dataclass
class TrainConfig:
    """One run's settings. The defaults are `just train`'s embedded run: the tiny preset on
    the built-in corpus, 120 steps of 8 x 256 tokens."""
    model: GPTConfig | None = None  # None: the --init-from checkpoint's, else the tiny preset
    data: str | None = None  # text file / directory / glob; None = the built-in corpus
    steps: int = 120
    batch_size: int = 8  # global sequences per optimizer step (over micro-batches and ranks)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; None = lr / 10
    warmup: int | None = None  # warmup steps; None = min(100, steps // 10)
    schedule: str = "cosine"  # cosine | wsd (constant, then a linear cooldown; see lr_at)
    cooldown: float = 0.2  # wsd: the final fraction of the steps that decays to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # <= 0: no clipping
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where measurably faster: fgpt/precision.py)
    reduce_dtype: str = "fp32"  # fp32 | bf16: the dtype gradients cross ranks in
    eval_interval: int = 50  # 0: no evaluation
    eval_iters: int = 4  # validation batches per evaluation
    checkpoint_interval: int = 50  # 0: only the final checkpoint
    out: str | None = None  # None: nothing written (in-process use)
    resume: bool = False
    stop_after: int | None = None  # end this session after that step, checkpointed, as Ctrl-C would
    init_from: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    window_kernel: str = "band"  # kernel of windowed layers: band | flex (fgpt.attention)
    strategy: str = "single"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_hf_dict() if self.model else None
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    config: GPTConfig
    metrics: list[dict] = field(default_factory=list)  # one per optimizer step run here
    out_dir: Path | None = None
    params: dict | None = None  # the final fp32 tree on CPU
    step: int = 0  # optimizer steps done in total (including before a resume)
    interrupted: bool = False  # stopped early by SIGINT / SIGTERM


# --- schedule, flops --------------------------------------------------------------------

SCHEDULES = ("cosine", "wsd")


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


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the matmuls, plus attention scores."""
    return 6 * count_params(config) + 12 * config.n_layer * config.n_embd * seq_len


@functools.cache
def peak_flops(device: str, dtype: torch.dtype) -> float:
    """This device's measured matmul FLOP/s in `dtype`: the yardstick for the MFU estimate."""
    n = 4096 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 4
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


# --- resolving the run ------------------------------------------------------------------

def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FgptError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise FgptError(f"--device must be auto, cpu or cuda, got {name!r}")
    return name


def validate(cfg: TrainConfig) -> None:
    if cfg.steps < 1:
        raise FgptError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise FgptError("--batch-size and --grad-accum must be at least 1")
    if cfg.batch_size % cfg.grad_accum:
        raise FgptError(f"--batch-size {cfg.batch_size} does not split into --grad-accum "
                        f"{cfg.grad_accum} micro-batches")
    precision.check(cfg.precision)
    if cfg.schedule not in SCHEDULES:
        raise FgptError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 < cfg.cooldown <= 1:
        raise FgptError(f"--cooldown must be in (0, 1], got {cfg.cooldown}")
    if not cfg.lr > 0:
        raise FgptError(f"--lr must be positive, got {cfg.lr}")
    if min(cfg.eval_interval, cfg.checkpoint_interval) < 0:
        raise FgptError("--eval-interval and --checkpoint-interval must be >= 0")
    if cfg.eval_interval and cfg.eval_iters < 1:
        raise FgptError("--eval-iters must be at least 1 when evaluating")
    if cfg.resume and not cfg.out:
        raise FgptError("--resume needs --out DIR: the run directory to continue")
    if cfg.window_kernel == "flex":  # fail before any work: no backward on CPU
        from fgpt.flex_window import check_trainable
        check_trainable(resolve_device(cfg.device))


def default_out_dir(name: str = "train") -> str:
    return f"out/{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def saved_run_config(out_dir: str | Path) -> TrainConfig:
    """The TrainConfig a checkpointed run was started with."""
    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        raise FgptError(f"--resume: no training checkpoint in {out_dir} (missing {STATE_FILE})")
    d = dict(torch.load(path, weights_only=True)["run_config"])
    if d["model"] is not None:  # None: the run used the default (tiny or --init-from's) model
        d["model"] = GPTConfig.from_hf_dict(d["model"])
    d["betas"] = tuple(d["betas"])
    return TrainConfig(**d)


def check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES or f.name == "init_from":
            continue
        mine, theirs = getattr(cfg, f.name), getattr(saved, f.name)
        if f.name == "model" and mine is not None:
            for m in dataclasses.fields(GPTConfig):
                if getattr(mine, m.name) != getattr(theirs, m.name):
                    raise FgptError(f"--resume: {m.name} = {getattr(mine, m.name)!r} contradicts "
                                    f"the checkpoint's {getattr(theirs, m.name)!r}")
        elif f.name != "model" and mine != theirs:
            raise FgptError(f"--resume: {f.name} = {mine!r} contradicts the checkpoint's {theirs!r}")


def _load_checkpoint(path):
    from fgpt.checkpoint import load_checkpoint
    return load_checkpoint(path)


def initial_params(cfg: TrainConfig) -> tuple[GPTConfig, dict]:
    if cfg.init_from:
        config, params = _load_checkpoint(cfg.init_from)
        if cfg.model is not None and cfg.model != config:
            raise FgptError(f"--init-from {cfg.init_from}: its model config contradicts the one given")
        return config, params
    config = cfg.model or GPTConfig.preset("tiny")
    return config, init_params(config, seed=cfg.seed)


# --- checkpoints --------------------------------------------------------------------------

def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file: a crash leaves the old file whole."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_train_checkpoint(out_dir: Path, strategy: Strategy, cfg: TrainConfig, config: GPTConfig,
                          *, step: int, elapsed_s: float) -> None:
    """Every rank calls this. Each save fills a fresh checkpoints/step-N (the ranks' optimizer
    files, then the model); rank 0's atomic rewrite of train_state.pt naming it commits it.
    Only then do the top-level model files move to it and older step directories go, so a
    crash at any moment leaves the last committed checkpoint whole and resumable."""
    from fgpt.checkpoint import CONFIG, save_checkpoint
    params = strategy.full_params()  # a collective
    step_dir = out_dir / CHECKPOINTS_DIR / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    atomic_torch_save({"step": step, "optimizer": strategy.optimizer_state(), "rng": rng},
                      step_dir / f"optimizer.rank{strategy.rank}.pt")
    strategy.barrier()
    if strategy.is_main:
        save_checkpoint(step_dir, config, params)
        atomic_torch_save({"step": step, "run_config": cfg.to_dict(), "elapsed_s": elapsed_s,
                           "strategy": strategy.name, "world_size": strategy.world_size,
                           "checkpoint": step_dir.relative_to(out_dir).as_posix(),
                           "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                           "model_sha256": file_digest(step_dir / MODEL_FILE)},
                          out_dir / STATE_FILE)
        for name in (MODEL_FILE, CONFIG):
            replace_with_link(step_dir / name, out_dir / name)
        for old in (out_dir / CHECKPOINTS_DIR).glob("step-*"):
            if old != step_dir and old.is_dir():
                shutil.rmtree(old)
    strategy.barrier()


def replace_with_link(source: Path, target: Path) -> None:
    """Atomically make `target` the same file as `source` (a hard link; a copy where the
    filesystem has none)."""
    with atomic_path(target) as tmp:
        tmp.unlink()  # os.link makes the name itself
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def load_train_checkpoint(out_dir: Path, strategy: Strategy) -> tuple[dict, SavedOptimizer, dict | None]:
    """(rank 0's train state, the saved ranks' optimizer states, this rank's saved RNG state
    or None when the world size changed), each file checked to belong to the same save.
    Rank files are opened on demand and memory-mapped: resharding reads only what it needs."""
    state = torch.load(out_dir / STATE_FILE, weights_only=True, map_location="cpu")
    if "checkpoint" not in state:
        raise FgptError(f"--resume: {out_dir} was written before checkpoints/step-N existed; "
                        "it cannot be resumed (its model still loads for generation)")
    step_dir = out_dir / state["checkpoint"]
    torn = FgptError(f"--resume: the checkpoint in {step_dir} is damaged (changed after it was saved)")
    if file_digest(step_dir / MODEL_FILE) != state["model_sha256"]:
        raise torn

    @functools.cache
    def rank_file(q: int) -> dict:
        path = step_dir / f"optimizer.rank{q}.pt"
        if not path.exists():
            raise FgptError(f"--resume: {path} is missing")
        # on the CPU: a rank file of a GPU run names its rank's device, which may not exist now
        saved = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        if saved["step"] != state["step"]:
            raise torn
        if "pieces" not in saved["optimizer"]:
            raise FgptError(f"--resume: {path} was written by an older fgpt (another optimizer layout); "
                            "it cannot be resumed (its model still loads for generation)")
        return saved

    same_world = state["world_size"] == strategy.world_size
    rng = {k: v.clone() for k, v in rank_file(strategy.rank)["rng"].items()} if same_world else None
    return state, SavedOptimizer(state["world_size"], lambda q: rank_file(q)["optimizer"]), rng


# --- the loop -------------------------------------------------------------------------------

@contextmanager
def stop_requests():
    """SIGINT / SIGTERM set a flag the loop checks after each step (a second one aborts)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_signal(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def evaluate(strategy: Strategy, corpus: data.Corpus, cfg: TrainConfig, config: GPTConfig, seq_len: int) -> float:
    """Mean loss over `eval_iters` fixed validation batches: the same at every evaluation, for
    every training seed (they depend on the data alone)."""
    batch = cfg.batch_size // cfg.grad_accum  # global micro-batch size: fits in memory
    losses = []
    for i in range(cfg.eval_iters):
        x, y = data.eval_batch(corpus.val, seq_len=seq_len, batch_size=batch, seed=data.EVAL_SEED, index=i,
                               rank=strategy.rank, world_size=strategy.world_size, ignore_id=corpus.ignore_id)
        losses.append(strategy.eval_loss(x, y).float().cpu())
    return float(strategy.mean_across_ranks(torch.stack(losses).mean()))


def train(cfg: TrainConfig, *, corpus: data.Corpus | None = None) -> TrainResult:
    """Run (or continue) a training run; see the module docstring for what is written.
    `corpus`: train on these token arrays instead of reading `cfg.data` (in-process use,
    e.g. the study's restricted-vocabulary corpus)."""
    validate(cfg)
    strategy = make_strategy(cfg.strategy, device=resolve_device(cfg.device), compile=cfg.compile,
                             reduce_dtype=cfg.reduce_dtype)
    try:
        cfg = resolve_precision(cfg, strategy)
        with stop_requests() as stop, use_window_kernel(cfg.window_kernel):
            return _train(cfg, strategy, stop, corpus)
    finally:
        strategy.close()


def resolve_precision(cfg: TrainConfig, strategy: Strategy) -> TrainConfig:
    """--precision auto -> fp32 or bf16, so the saved run config records the choice: on
    resume the run's own; else what this device measures faster, by a vote of the ranks so
    that all of them agree."""
    if cfg.precision != "auto":
        return cfg
    if cfg.resume:
        return dataclasses.replace(cfg, precision=saved_run_config(cfg.out).precision)
    vote = torch.tensor(1.0 if precision.choose(str(strategy.device)) == "bf16" else 0.0)
    chosen = "bf16" if float(strategy.mean_across_ranks(vote)) > 0.5 else "fp32"
    log.info("--precision auto: %s (a bf16 matmul runs at %.2fx fp32's speed here)", chosen,
             precision.measured_speedup(str(strategy.device)))
    return dataclasses.replace(cfg, precision=chosen)


def _train(cfg: TrainConfig, strategy: Strategy, stop: dict, corpus: data.Corpus | None) -> TrainResult:
    out_dir = Path(cfg.out) if cfg.out else None
    W, K = strategy.world_size, cfg.grad_accum
    if cfg.batch_size % (K * W):
        raise FgptError(f"--batch-size {cfg.batch_size} does not split into {K} micro-batches "
                        f"on each of {W} ranks")
    if cfg.resume:
        saved = saved_run_config(out_dir)
        check_resumable(cfg, saved)
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES})
        state, saved_optimizer, saved_rng = load_train_checkpoint(out_dir, strategy)
        config, params = _load_checkpoint(out_dir / state["checkpoint"])
        start, elapsed0 = state["step"], state["elapsed_s"]
        if start >= cfg.steps:
            raise FgptError(f"--resume: the run already did {start} of --steps {cfg.steps}")
    else:
        if out_dir and (out_dir / STATE_FILE).exists():
            raise FgptError(f"{out_dir} already holds a run; pass --resume to continue it")
        config, params = initial_params(cfg)
        start, elapsed0 = 0, 0.0
    T = config.n_ctx

    corpus = corpus or _load_corpus(cfg, strategy)
    data.check_fits(corpus.train, T, cfg.batch_size, "train")
    if cfg.eval_interval:
        data.check_fits(corpus.val, T, 1, "val")

    strategy.setup(params, config, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                   precision=cfg.precision)
    del params
    if cfg.resume:
        strategy.load_optimizer_state(saved_optimizer)
        del saved_optimizer  # drop this loop's hold on the memory-mapped rank files
        if saved_rng is None:  # another world size: no saved stream fits; only dropout draws
            torch.manual_seed(cfg.seed + 1_000_003 * start + strategy.rank)
        else:
            torch.set_rng_state(saved_rng["cpu"])
            if "cuda" in saved_rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(saved_rng["cuda"])
    else:
        torch.manual_seed(cfg.seed + strategy.rank)  # dropout differs per rank, as in DDP

    metrics_file = _open_metrics(out_dir, strategy, keep_until=start)
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    warmup = min(100, cfg.steps // 10) if cfg.warmup is None else cfg.warmup
    tokens_per_step = cfg.batch_size * T
    flops_tok = flops_per_token(config, T)
    peak = peak_flops(strategy.device.type, torch.bfloat16 if cfg.precision == "bf16" else torch.float32) \
        if strategy.is_main else 1.0
    result = TrainResult(config=config, out_dir=out_dir, step=start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and strategy.is_main))
    t0 = time.perf_counter() - elapsed0
    try:
        for s in range(start, cfg.steps):
            step_start = time.perf_counter()
            lr = lr_at(s, lr=cfg.lr, min_lr=min_lr, warmup=warmup, total=cfg.steps, schedule=cfg.schedule,
                       cooldown=cfg.cooldown)
            x, y = data.rank_batch(corpus.train, seq_len=T, batch_size=cfg.batch_size, seed=cfg.seed,
                                   step=s, rank=strategy.rank, world_size=W, ignore_id=corpus.ignore_id)
            loss, grad_norm = optimizer_step(strategy, data.micro_batches(x, y, K), lr=lr,
                                             grad_clip=cfg.grad_clip, step=s + 1, out_dir=out_dir)
            step_s = time.perf_counter() - step_start
            n = s + 1
            row = {"step": n, "loss": loss, "lr": lr, "tokens": n * tokens_per_step,
                   "elapsed_s": round(time.perf_counter() - t0, 4), "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step / step_s,
                   "mfu": flops_tok * tokens_per_step / step_s / (peak * W)}
            if cfg.eval_interval and (n % cfg.eval_interval == 0 or n == cfg.steps):
                row["val_loss"] = evaluate(strategy, corpus, cfg, config, T)
                row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            result.metrics.append(row)
            result.step = n
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mfu=f"{row['mfu']:.1%}", refresh=False)
            bar.update()
            stopping = _agree(strategy, stop["stop"]) or n == cfg.stop_after
            periodic = cfg.checkpoint_interval and n % cfg.checkpoint_interval == 0
            if out_dir and (periodic or stopping or n == cfg.steps):
                save_train_checkpoint(out_dir, strategy, cfg, config, step=n,
                                      elapsed_s=time.perf_counter() - t0)
            if stopping:
                result.interrupted = True
                break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    result.params = strategy.full_params()
    return result


def optimizer_step(strategy: Strategy, micro_batches: list, *, lr: float, grad_clip: float,
                   step: int, out_dir: Path | None) -> tuple[float, float]:
    """Accumulate over the micro-batches, check the loss, clip, step: (loss, grad norm).
    The loss is the mean over the global batch, so every rank takes the same branch."""
    K = len(micro_batches)
    losses = [strategy.forward_backward(x, y, scale=1.0 / K, sync=i == K - 1)
              for i, (x, y) in enumerate(micro_batches)]
    loss = float(strategy.mean_across_ranks(torch.stack(losses).mean().float()))
    if not math.isfinite(loss):  # before the optimizer step: the params stay good
        where = f"; the last good checkpoint stays in {out_dir}" if out_dir else ""
        raise FgptError(f"loss is {loss} at step {step}: training stopped{where}")
    grad_norm = strategy.clip_grad_norm(grad_clip)
    strategy.set_lr(lr)
    strategy.step()
    return loss, grad_norm


def _agree(strategy: Strategy, flag: bool) -> bool:
    """Stop only if any rank was signalled: all ranks must take the same checkpoint path."""
    return bool(strategy.mean_across_ranks(torch.tensor(float(flag), device=strategy.device)) > 0)


def _load_corpus(cfg: TrainConfig, strategy: Strategy) -> data.Corpus:
    """Every rank reads the sources (so bad input fails everywhere alike, never a hang);
    rank 0 tokenises into the cache while the others wait, then all open the same shards."""
    docs = data.documents(cfg.data)
    description = "python stdlib" if cfg.data is None else cfg.data
    if strategy.is_main:
        data.build_cache(docs, description, progress=cfg.progress)
    strategy.barrier()
    return data.open_corpus(data.cache_dir_for(docs), description)


def _open_metrics(out_dir: Path | None, strategy: Strategy, keep_until: int):
    """Rank 0's metrics.jsonl, keeping only rows up to the step a resume starts from."""
    if out_dir is None or not strategy.is_main:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / METRICS_FILE
    kept = []
    if keep_until and path.exists():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
    atomic_write_text(path, "".join(line + "\n" for line in kept))  # a crash leaves the old log whole
    return open(path, "a")


def _step_of(line: str) -> float:
    """A metrics row's step; a line a kill cut short counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
