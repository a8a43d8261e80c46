"""ddp, fsdp and custom-fsdp on 2 and 3 gloo ranks against the single-device run.

One torchrun launch per world size (tests/parallel_worker.py) runs every parity case; the
single-device reference runs here, in the pytest process, on the same batches. The same
launches also train through fgpt.training.train: runs checkpointed on one world size resume on another
(one more launch resumes the 3-rank checkpoints on 2), and bf16-reduced runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgpt import init_params, tree
from fgpt.errors import FgptError
from fgpt.parallel import make_strategy
from fgpt.training.train import train
from parallel_case import (CASES, CONFIG, HYPER, MAX_NORM, STEPS, STOP_AFTER, TRAIN_STEPS, TRAIN_TEXT,
                           train_run, train_steps)
from train_case import assert_reordered_losses_match

pytestmark = pytest.mark.slow  # gloo process groups of 2 and 3 ranks: `just test-fast` leaves it out

WORKER = Path(__file__).with_name("parallel_worker.py")
WORLD_SIZES = (2, 3)
# checkpointed runs (OUT/STRATEGY.TAG) -> (the world size that starts them, the one that resumes)
# "A+B.tag": started with strategy A, resumed with B
RESUMED = {"custom-fsdp.a": (2, 3), "custom-fsdp.b": (3, 2), "ddp.b": (3, 2), "fsdp.c": (2, 3),
           "fsdp.d": (3, 2), "ddp+custom-fsdp.e": (2, 3), "custom-fsdp+fsdp.f": (3, 2)}
TASKS = {2: ["parity", "reduce-bf16"], 3: ["parity"]}  # the `resumed` fixture adds the third launch
for run, (first, second) in RESUMED.items():
    TASKS[first].append(f"start:{run}")
    if second == 3:
        TASKS[3].append(f"resume:{run}")


def torchrun(nproc: int, *args: str, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    (out / "text.txt").write_text(TRAIN_TEXT)
    return out


def launch(out: Path, world: int, tasks: list[str]) -> dict[str, dict]:
    """One torchrun launch running `tasks`; each task's result as rank 0 saved it."""
    proc = torchrun(world, str(out), *tasks, env=dict(os.environ, FGPT_CACHE=str(out / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {task: torch.load(out / f"{task.replace(':', '-')}.w{world}.pt", weights_only=False)
            for task in tasks}


@pytest.fixture(scope="module")
def launches(run_dir) -> dict[int, dict[str, dict]]:
    return {world: launch(run_dir, world, TASKS[world]) for world in WORLD_SIZES}


@pytest.fixture(scope="module")
def distributed(launches) -> dict[int, dict]:
    return {world: launches[world]["parity"] for world in WORLD_SIZES}


@pytest.fixture(scope="module")
def resumed(launches, run_dir) -> dict[str, tuple[dict, dict]]:
    """Run name -> (its first session, its resumed session), as RESUMED lays out."""
    last = launch(run_dir, 2, [f"resume:{run}" for run, worlds in RESUMED.items() if worlds[1] == 2])
    sessions = {**launches[3], **last}
    return {run: (launches[first][f"start:{run}"], sessions[f"resume:{run}"])
            for run, (first, _) in RESUMED.items()}


@pytest.fixture(scope="module")
def single_train_run(run_dir):
    """The uninterrupted single-device run of the same config, fp32."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FGPT_CACHE", str(run_dir / "cache"))
        return train(train_run(run_dir))


_single_cache: dict = {}


def single(accum: int, precision: str, steps: int) -> dict:
    """The reference: one process, the whole global batch (accumulated the same way)."""
    key = (accum, precision, steps)
    if key not in _single_cache:
        strategy = make_strategy("single")
        strategy.setup(init_params(CONFIG, seed=0), CONFIG, precision=precision, **HYPER)
        out = train_steps(strategy, accum, steps, rank=0, world=1)
        out["params"] = strategy.full_params()
        _single_cache[key] = out
    return _single_cache[key]


def assert_trees_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    a, e = tree.flatten(actual), tree.flatten(expected)
    assert a.keys() == e.keys()
    for k in e:
        torch.testing.assert_close(a[k], e[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


FP32 = [c for c in CASES if c[2] == "fp32"]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name,accum,precision,steps", FP32)
def test_fp32_losses_grads_and_weights_equal_single_device(distributed, world, name, accum, precision, steps):
    got, ref = distributed[world][f"{name}/{accum}/{precision}"], single(accum, precision, steps)
    assert len(got["losses"]) == STEPS >= 6
    # each rank's part of the batch against the whole batch: the same sums in another order
    assert_reordered_losses_match(got["losses"], ref["losses"])
    # the clipped norm is a global quantity: a reduce that summed instead of averaging
    # (pytorch #162338) would show here as a world-size factor
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
    assert max(ref["norms"]) > MAX_NORM  # clipping actually acted
    assert_trees_close(got["grads"], ref["grads"], rtol=1e-5, atol=1e-7)
    # AdamW divides by sqrt(v): near-zero gradients turn float-order noise into ~1e-5 weight
    # differences; decaying a 1-D gain by mistake would move it 3e-4 per step
    assert_trees_close(got["params"], ref["params"], rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["ddp", "fsdp", "custom-fsdp"])
def test_bf16_tracks_single_device_bf16(distributed, world, name):
    got, ref = distributed[world][f"{name}/1/bf16"], single(1, "bf16", 2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=0)
    # master weights stay fp32 in every strategy
    assert all(p.dtype == torch.float32 for p in tree.leaves(got["params"]))


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["fsdp", "custom-fsdp"])
def test_resume_from_params_and_sharded_optimizer_state_continues_the_run(distributed, world, name):
    got, ref = distributed[world][f"{name}/resume"], single(1, "fp32", STEPS)
    assert_reordered_losses_match(got["losses"], ref["losses"])


def metric(result, key: str) -> torch.Tensor:
    return torch.tensor([row[key] for row in result.metrics])


@pytest.mark.parametrize("run", RESUMED)
def test_resumed_run_equals_the_uninterrupted_single_device_run(resumed, single_train_run, run):
    """Stopped after STOP_AFTER steps on one world size, resumed through --resume (the tree
    read back from safetensors) on another, and with another strategy: each rank reads its
    part of every parameter's AdamW moments from the saved ranks' pieces. Same losses and
    final weights as one uninterrupted single-device run (fp32)."""
    first, second = resumed[run]
    assert (first["world"], second["world"]) == RESUMED[run]
    assert len(first["losses"]) == STOP_AFTER and len(second["losses"]) == TRAIN_STEPS - STOP_AFTER
    assert_reordered_losses_match(first["losses"] + second["losses"], metric(single_train_run, "loss").tolist())
    assert_trees_close(second["params"], single_train_run.params, rtol=1e-4, atol=5e-5)


def test_resume_refuses_a_global_batch_the_new_world_size_does_not_divide(launches):
    message = launches[3]["resume:custom-fsdp.a"]["uneven_batch_error"]
    assert "on each of 3 ranks" in message and "\n" not in message


@pytest.mark.parametrize("name", ["fsdp", "custom-fsdp"])
def test_bf16_reduction_stays_close_to_fp32_and_still_learns(launches, single_train_run, name):
    """Against the single-device fp32 run, which each strategy's fp32 reduction equals (above)."""
    got = launches[2]["reduce-bf16"][name]
    losses, norms = torch.tensor(got["losses"]), torch.tensor(got["norms"])
    fp32_losses, fp32_norms = metric(single_train_run, "loss"), metric(single_train_run, "grad_norm")
    torch.testing.assert_close(losses, fp32_losses, rtol=1e-3, atol=0)
    torch.testing.assert_close(norms, fp32_norms, rtol=1e-2, atol=0)
    # ... but not equal: the reduced gradients' norm misses the fp32 parity tolerance
    assert ((norms - fp32_norms).abs() / fp32_norms).max() > 1e-5
    assert losses[0] - losses[-1] > 0.5 * (fp32_losses[0] - fp32_losses[-1]) > 0  # learns about as fast


def test_ddp_refuses_bf16_reduction_on_gloo_with_one_line(launches):
    message = launches[2]["reduce-bf16"]["ddp_error"]
    assert "NCCL" in message and "gloo" in message and "\n" not in message


def test_single_refuses_a_bf16_reduction():
    with pytest.raises(FgptError, match="reduce-dtype"):
        make_strategy("single", reduce_dtype="bf16")


def test_a_dying_rank_ends_the_job_promptly_with_an_error(tmp_path):
    start = time.monotonic()
    proc = torchrun(2, str(tmp_path), "die", timeout=120)
    assert proc.returncode != 0
    assert "rank 1 dies on purpose" in proc.stderr
    assert time.monotonic() - start < 60


def test_unknown_strategy_is_a_one_line_error():
    with pytest.raises(FgptError, match="unknown strategy 'zero'"):
        make_strategy("zero")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "custom-fsdp"])
def test_distributed_strategy_outside_torchrun_is_a_one_line_error(monkeypatch, name):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FgptError, match="nproc="):
        make_strategy(name, device="cpu")
