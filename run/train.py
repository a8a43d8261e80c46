"""`python -m run.train [strategy=NAME] [nproc=N] [FLAGS...]`: train a GPT (see docs/training.md).

With no flags it runs the embedded default: the tiny preset on the built-in corpus, on CPU.
`strategy=` / `nproc=` may appear anywhere (that is how `just train` hands them over). With
nproc > 1 outside torchrun, it re-launches itself under `torch.distributed.run`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys

from fgpt.attention import WINDOW_KERNELS
from fgpt.checkpoint import checkpoint_config
from fgpt.config import GPTConfig, PRESETS
from fgpt.data import check_text_field
from fgpt.errors import FgptError
from fgpt.heap import HEAPS
from fgpt.parallel import STRATEGIES
from fgpt.parallel.process_group import DEVICES
from fgpt.recompute import RECOMPUTE
from fgpt.training import precision, run_dir
from fgpt.training.attention_kernel import CHOICES as ATTENTION_KERNELS
from fgpt.training.autocompile import CHOICES
from fgpt.training.run_config import SCHEDULES
from fgpt.training.train import TrainConfig, check_launch, train
from fgpt.tree import COMPUTE_DTYPES
from run._cli import ArgumentParser, main_guard

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "n_ctx", "n_kv_head", "pos_emb", "window")


def window_arg(text: str):
    """`64`, `none`, or one entry per layer: `64,64,none,64`."""
    def one(item: str):
        if item.strip().lower() == "none":
            return None
        try:
            return int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"window entries are integers or 'none', got {item!r}") from None
    items = [one(x) for x in text.split(",")]
    return items[0] if len(items) == 1 else tuple(items)


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(prog="python -m run.train", description=__doc__.split("\n")[0], argument_default=None)
    p.add_argument("--strategy", choices=list(STRATEGIES), help="also strategy=NAME (default single)")
    p.add_argument("--nproc", type=int, help="processes (also nproc=N; default 1 for single, 2 otherwise)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts every rank after a failure, resuming from the last checkpoint")
    g = p.add_argument_group("model (a preset, then overrides)")
    g.add_argument("--model", choices=list(PRESETS), help="preset (default: tiny)")
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--n-embd", type=int)
    g.add_argument("--n-ctx", type=int, help="context length = training sequence length")
    g.add_argument("--n-kv-head", type=int, help="grouped-query attention: key/value heads")
    g.add_argument("--pos-emb", choices=["learned", "rope"])
    g.add_argument("--window", type=window_arg, help="sliding window: N, none, or a per-layer list")
    g = p.add_argument_group("training")
    g.add_argument("--data", help="text / JSONL / Parquet file, directory or glob, or a directory of token "
                   "shards: fgpt (run.prepare), nanoGPT, llm.c (default: Python's stdlib)")
    g.add_argument("--text-field", help="JSONL field / Parquet column of --data holding the text (default text)")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, help=f"global sequences per step (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=float, help="cosine floor (default lr/10)")
    g.add_argument("--warmup", type=int, help="warmup steps (default min(100, steps/10))")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="after warmup: half a cosine to --min-lr (default), or constant then a linear cooldown")
    g.add_argument("--cooldown", type=float, help="wsd: final fraction of the steps that decays (default 0.2)")
    g.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, help=f"global-norm clip, 0 = off (default {d.grad_clip})")
    g.add_argument("--seed", type=int)
    g.add_argument("--precision", choices=precision.PRECISIONS,
                   help="auto (default): bf16 where this device's bf16 matmul is measurably faster")
    g.add_argument("--reduce-dtype", choices=list(COMPUTE_DTYPES), help="dtype gradients cross ranks in (default fp32)")
    g.add_argument("--eval-interval", type=int, help=f"0 = off (default {d.eval_interval})")
    g.add_argument("--eval-iters", type=int, help=f"val batches per eval (default {d.eval_iters})")
    g.add_argument("--checkpoint-interval", type=int, help="0 = final checkpoint only")
    g.add_argument("--out", help="run directory (default out/train-<timestamp>)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    g.add_argument("--stop-after", type=int, help="checkpoint and stop after this step (resume later)")
    g.add_argument("--init-from", help="fine-tune from a checkpoint (file or directory)")
    g.add_argument("--device", choices=DEVICES)
    g.add_argument("--compile", nargs="?", const="on", choices=CHOICES,
                   help="torch.compile the step: auto (default) where the run is long enough to pay for "
                   "the compile here, on (also plain --compile) or off; strategy=single only")
    g.add_argument("--recompute", choices=RECOMPUTE,
                   help="activations computed again in backward instead of kept: none (default), "
                   "attention (each block's attention half) or full (whole blocks): memory for time")
    g.add_argument("--heap", choices=HEAPS,
                   help="kept (default): freed memory stays for the next step, which then needs no fresh "
                   "pages (faster; the resident peak held, and higher); glibc: glibc's default")
    g.add_argument("--attention-kernel", choices=ATTENTION_KERNELS,
                   help="full causal layers: auto (default: the faster here of sdpa and scores, measured "
                   "once per machine and shape; bf16 on CPUs only), sdpa (O(T) memory) or scores (the "
                   "explicit T x T scores: faster for short bf16 sequences on some CPUs, O(T²) memory)")
    g.add_argument("--window-kernel", choices=WINDOW_KERNELS,
                   help="windowed layers: band (plain O(T·W), default), flex (compiled flex_attention; CUDA only) or dense (a T² mask)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p


def expand_launcher_tokens(argv: list[str]) -> list[str]:
    """`strategy=X` / `nproc=N` anywhere -> `--strategy X` / `--nproc N`."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in ("strategy", "nproc"):
            out += [f"--{key}", value]
        else:
            out.append(arg)
    return out


def model_config(args, base: GPTConfig | None) -> GPTConfig | None:
    """The preset (or `base`) with the explicit --n-* overrides; None if nothing was given."""
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.model:
        base = GPTConfig.preset(args.model)
    if not overrides:
        return base if args.model else None
    return (base or GPTConfig.preset("tiny")).replace(**overrides)


def build_config(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        if args.init_from:
            raise FgptError("--resume and --init-from exclude each other")
        saved, saved_model = run_dir.saved_run(args.out)
        model = model_config(args, saved_model)
        return dataclasses.replace(saved, **given, **({"model": model} if model else {}))
    # flags given with --init-from change its model (and contradict it, which training refuses
    # naming the field), not the tiny preset's
    base = checkpoint_config(args.init_from) if args.init_from and not args.model else None
    return TrainConfig(**{"precision": "auto", "compile": "auto", **given}, model=model_config(args, base))


LAUNCHER_FLAGS = ("--nproc", "--max-restarts")


def without_launcher_flags(argv: list[str]) -> list[str]:
    """argv minus `--nproc N` / `--max-restarts K` (either spelling): torchrun's own parser
    reads the script's arguments too, and takes `--nproc` for an ambiguous prefix of its
    `--nproc-per-node` and `--max-restarts` for its own."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCHER_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCHER_FLAGS)):
            out.append(arg)
    return out


# The signals torchrun's agent takes for "shut down": it passes each to every rank, waits
# for them (30 s, then SIGKILL) and exits. Forwarded, since the agent runs in a session of
# its own and no longer hears the terminal's Ctrl-C, Ctrl-\ or hang-up itself.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def relaunch(argv: list[str], nproc: int, max_restarts: int, *, module: str = "run.train") -> int:
    """Run this command (or `module`'s) under torchrun with `nproc` ranks, OMP threads split between them.
    A signal stops the ranks as it stops one process (finish the step, checkpoint); the exit
    code is then 128 + its number, once every child has exited; else torchrun's."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "run._torchrun", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", module, *without_launcher_flags(argv)]
    # A rank aborts without a checkpoint on a second signal, so each signal must reach the
    # agent exactly once, from a terminal (the whole foreground group) or from `kill` /
    # `timeout` / a scheduler (this process only): hence the agent's own session and the
    # forwarding. Never kill the agent: it waits for the ranks (subprocess.call SIGKILLs it
    # 0.25 s after a Ctrl-C, which orphaned them mid-step).
    agent, received = None, []

    def forward(signum, frame):
        received.append(signum)
        if agent is not None:
            agent.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        agent = subprocess.Popen(cmd, env=env, start_new_session=True)
        if received:  # came while it started (harmless if sent twice: no rank runs yet)
            agent.send_signal(received[0])
        code = agent.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else code


def choose_ranks(args, under_torchrun: bool) -> None:
    """Fill in strategy and nproc (as given; else as the resumed run had them; else single,
    or two ranks of another strategy), checking the launcher's own flags."""
    saved = run_dir.train_state(args.out) if args.resume else None
    if saved and args.strategy in (None, saved["strategy"]):  # as the run was, unless told otherwise
        args.strategy = saved["strategy"]
        if args.nproc is None:
            args.nproc = saved["world_size"]
    args.strategy = args.strategy or "single"
    if args.nproc is None:  # `just train strategy=custom-fsdp` means two ranks
        args.nproc = 1 if args.strategy == "single" else 2
    if args.nproc < 1:
        raise FgptError(f"nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and args.strategy == "single":
        raise FgptError("strategy=single runs one process; use ddp, fsdp or custom-fsdp with nproc > 1")
    if args.max_restarts < 0:
        raise FgptError(f"--max-restarts must be at least 0, got {args.max_restarts}")
    if args.max_restarts and args.strategy == "single":
        raise FgptError("--max-restarts restarts torchrun's ranks: use ddp, fsdp or custom-fsdp")
    if args.resume and not args.out:
        raise FgptError("--resume needs --out DIR: the run directory to continue")
    if under_torchrun and args.max_restarts:
        raise FgptError("--max-restarts is torchrun's own option when you start torchrun yourself: "
                        "give it before `-m run.train`")


def main() -> int:
    argv = expand_launcher_tokens(sys.argv[1:])
    args = parser().parse_args(argv)
    under_torchrun = "RANK" in os.environ
    choose_ranks(args, under_torchrun)
    if args.out is None:  # one name for every rank and every restart
        job = run_dir.torchrun_job_id()
        if under_torchrun and job is None:
            raise FgptError("under torchrun without --rdzv-id, pass --out DIR: the ranks need one "
                            "run directory")
        args.out = f"out/train-{job}" if under_torchrun else run_dir.default_out_dir()
        argv += ["--out", args.out]
    run_dir.check_not_input(args.out, data=args.data, init_from=args.init_from)
    check_text_field(args.data, args.text_field)
    # One writer per run directory: this process, or under torchrun rank 0 (a launcher's
    # lock is handed down to the ranks it starts, see fgpt.outdir.exclusive).
    writer = not under_torchrun or int(os.environ["RANK"]) == 0
    with run_dir.writer_lock(args.out) if writer else contextlib.nullcontext():
        code = run(args, argv, under_torchrun)
    if under_torchrun:  # a torchrun worker: skip finalizers that can abort after gloo
        from fgpt.parallel.process_group import exit_without_finalizers
        exit_without_finalizers(code)
    return code


def run(args, argv: list[str], under_torchrun: bool) -> int:
    """Train (or launch the ranks that do), holding the run directory: the exit code."""
    mine = run_dir.saved_by_this_job(args.out) if under_torchrun else None
    if mine is not None and not args.resume:  # torchrun restarted this job after a failure
        args.resume, args.init_from = True, None  # the checkpoint supersedes --init-from
        if int(os.environ["RANK"]) == 0:
            print(f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '?')}: resuming from "
                  f"step {mine['step']} in {args.out}", file=sys.stderr)
        if mine["step"] >= (args.steps or mine["run_config"]["steps"]):
            return 0  # it had finished: a rank died after the final checkpoint

    run = build_config(args)
    if args.strategy != "single" and not under_torchrun:
        check_launch(run, nproc=args.nproc)  # bad input: one error here, before any rank starts
        return relaunch(argv, args.nproc, args.max_restarts)
    result = train(run)
    if int(os.environ.get("RANK", 0)) == 0:
        last = result.metrics[-1] if result.metrics else {}
        summary = f"step {result.step}" + (f", loss {last['loss']:.4f}" if last else "")
        summary += f" ({run_dir.saved_run(result.out_dir)[0].precision})"  # what --precision auto chose
        if result.interrupted:
            print(f"stopped at {summary}; continue with: python -m run.train --resume --out {args.out}",
                  file=sys.stderr)
        print(f"{summary}. checkpoint: {result.out_dir} "
              f"(sample: python -m run.generate --checkpoint {result.out_dir})")
    # A signal ends with 130, as Ctrl-C does; --stop-after is a stop as asked: 0, which also
    # keeps torchrun from taking it for a failure (and restarting under --max-restarts).
    return 130 if result.interrupted and result.step != run.stop_after else 0

if __name__ == "__main__":
    main_guard(main)
