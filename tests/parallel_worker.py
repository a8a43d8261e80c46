"""Run under torchrun by tests/test_parallel.py: one launch per world size drives every
distributed strategy through the Strategy interface, the way fgpt/train.py does, and rank 0
saves what the test compares against a single-device run in the pytest process.

    python -m torch.distributed.run --standalone --nproc-per-node W tests/parallel_worker.py OUT [die]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgpt import init_params  # noqa: E402
from fgpt.errors import FgptError  # noqa: E402
from fgpt.parallel import make_strategy  # noqa: E402
from fgpt.parallel.dist import exit_without_finalizers  # noqa: E402
from parallel_case import CASES, CONFIG, HYPER, STEPS, train_steps  # noqa: E402


def run_case(name: str, accum: int, precision: str, steps: int) -> dict:
    strategy = make_strategy(name, device="cpu")
    strategy.setup(init_params(CONFIG, seed=0), CONFIG, precision=precision, **HYPER)
    out = train_steps(strategy, accum, steps, rank=strategy.rank, world=strategy.world_size)
    out["params"] = strategy.full_params()
    strategy.close()
    return out


def resume_case(name: str) -> dict:
    """Stop after 3 steps, rebuild from full_params + optimizer state, finish the run."""
    first = make_strategy(name, device="cpu")
    first.setup(init_params(CONFIG, seed=0), CONFIG, precision="fp32", **HYPER)
    head = train_steps(first, 1, 3, rank=first.rank, world=first.world_size)
    params, opt = first.full_params(), first.optimizer_state()
    second = make_strategy(name, device="cpu")
    second.setup(init_params(CONFIG, seed=1), CONFIG, precision="fp32", **HYPER)
    second.load_params(params)
    second.load_optimizer_state(opt)
    tail = train_steps(second, 1, STEPS, rank=second.rank, world=second.world_size, start=3)
    error = ""
    try:
        second.load_optimizer_state({**opt, "world_size": second.world_size + 1})
    except FgptError as e:
        error = str(e)
    return {"losses": head["losses"] + tail["losses"], "wrong_world_error": error}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")  # shared by every case below (strategies join it)
    if sys.argv[2:] == ["die"]:
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 dies on purpose")
        dist.all_reduce(torch.ones(1))  # rank 0 would wait here for ever without torchrun
        return
    results = {f"{name}/{accum}/{precision}": run_case(name, accum, precision, steps)
               for name, accum, precision, steps in CASES}
    results |= {f"{name}/resume": resume_case(name) for name in ("fsdp", "custom-fsdp")}
    if dist.get_rank() == 0:
        torch.save(results, out_dir / f"world{dist.get_world_size()}.pt")
    dist.destroy_process_group()
    exit_without_finalizers(0)


if __name__ == "__main__":
    main()
