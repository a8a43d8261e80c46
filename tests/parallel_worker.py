"""Run under torchrun by tests/test_parallel.py. Each TASK runs on every rank, and rank 0
saves what the test compares against a single-device run in the pytest process to
OUT/TASK.pt (':' -> '-'):

    python -m torch.distributed.run --standalone --nproc-per-node W tests/parallel_worker.py OUT TASK...

    parity       every distributed strategy through the Strategy interface, the way
                 fgpt/training/train.py drives it, and resumed from params + optimizer state
    start:NAME   fgpt.training.train run in OUT/NAME (NAME = STRATEGY.TAG), checkpointed and stopped
                 after STOP_AFTER steps
    resume:NAME  --resume of OUT/NAME on this world size, to the end
    reduce-bf16  fgpt.training.train runs of ddp, fsdp and custom-fsdp with reduce_dtype="bf16"
    recompute    ddp, fsdp and custom-fsdp with each --recompute mode
    die          rank 1 raises
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgpt import init_params  # noqa: E402
from fgpt.errors import FgptError  # noqa: E402
from fgpt.parallel import make_strategy  # noqa: E402
from fgpt.parallel.optimizer_state import SavedOptimizer  # noqa: E402
from fgpt.parallel.process_group import exit_without_finalizers  # noqa: E402
from fgpt.training.train import train  # noqa: E402
from parallel_case import CASES, CONFIG, HYPER, STEPS, STOP_AFTER, train_run, train_steps  # noqa: E402


def run_case(name: str, accum: int, precision: str, steps: int, recompute: str = "none") -> dict:
    strategy = make_strategy(name, device="cpu", recompute=recompute)
    strategy.setup(init_params(CONFIG, seed=0), CONFIG, precision=precision, **HYPER)
    out = train_steps(strategy, accum, steps, rank=strategy.rank, world=strategy.world_size)
    out["params"] = strategy.full_params()
    strategy.close()
    return out


def resume_case(name: str) -> dict:
    """Stop after 3 steps, rebuild from full_params + optimizer state as --resume does (setup
    on the saved tree, then load_optimizer_state), finish the run."""
    first = make_strategy(name, device="cpu")
    first.setup(init_params(CONFIG, seed=0), CONFIG, precision="fp32", **HYPER)
    head = train_steps(first, 1, 3, rank=first.rank, world=first.world_size)
    params, opt = first.full_params(), first.optimizer_state()
    second = make_strategy(name, device="cpu")
    second.setup(params, CONFIG, precision="fp32", **HYPER)
    second.load_optimizer_state(SavedOptimizer(first.world_size, {first.rank: opt}.__getitem__))
    tail = train_steps(second, 1, STEPS, rank=second.rank, world=second.world_size, start=3)
    return {"losses": head["losses"] + tail["losses"]}


def error_of(call) -> str:
    try:
        call()
    except FgptError as e:
        return str(e)
    return ""


def parity() -> dict:
    results = {f"{name}/{accum}/{precision}": run_case(name, accum, precision, steps)
               for name, accum, precision, steps in CASES}
    return results | {f"{name}/resume": resume_case(name) for name in ("fsdp", "custom-fsdp")}


def recompute() -> dict:
    """Every strategy with each --recompute mode, 2 steps of 2 micro-batches (tests/test_recompute.py)."""
    return {f"{name}/{mode}/{precision}": run_case(name, 2, precision, 2, recompute=mode)
            for name in ("ddp", "fsdp", "custom-fsdp") for precision in ("fp32", "bf16")
            for mode in ("none", "attention", "full")}


def summary(result) -> dict:
    return {"losses": [row["loss"] for row in result.metrics], "norms": [row["grad_norm"] for row in result.metrics],
            "params": result.params, "world": dist.get_world_size()}


def strategies(name: str) -> tuple[str, str]:
    """"ddp.b" starts and resumes with ddp; "ddp+fsdp.e" starts with ddp, resumes with fsdp."""
    first, _, second = name.partition(".")[0].partition("+")
    return first, second or first


def start(out: Path, name: str) -> dict:
    strategy = strategies(name)[0]
    return summary(train(train_run(out, strategy=strategy, out=str(out / name), stop_after=STOP_AFTER)))


def resume(out: Path, name: str) -> dict:
    cfg = train_run(out, strategy=strategies(name)[1], out=str(out / name), resume=True)
    uneven = error_of(lambda: train(dataclasses.replace(cfg, batch_size=dist.get_world_size() + 1)))
    return summary(train(cfg)) | {"uneven_batch_error": uneven}


def reduce_bf16(out: Path) -> dict:
    results = {name: summary(train(train_run(out, strategy=name, reduce_dtype="bf16")))
               for name in ("fsdp", "custom-fsdp")}
    return results | {"ddp_error": error_of(lambda: train(train_run(out, strategy="ddp", reduce_dtype="bf16")))}


def main() -> None:
    out_dir, tasks = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")  # shared by every case below (strategies join it)
    if tasks == ["die"]:
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 dies on purpose")
        dist.all_reduce(torch.ones(1))  # rank 0 would wait here for ever without torchrun
        return
    for task in tasks:
        kind, _, name = task.partition(":")
        result = {"parity": parity, "recompute": recompute, "reduce-bf16": lambda: reduce_bf16(out_dir),
                  "start": lambda: start(out_dir, name), "resume": lambda: resume(out_dir, name)}[kind]()
        if dist.get_rank() == 0:
            torch.save(result, out_dir / f"{task.replace(':', '-')}.w{dist.get_world_size()}.pt")
    dist.destroy_process_group()
    exit_without_finalizers(0)


if __name__ == "__main__":
    main()
