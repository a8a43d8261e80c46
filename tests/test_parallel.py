"""ddp, fsdp and custom-fsdp on 2 and 3 gloo ranks against the single-device run.

One torchrun launch per world size (tests/parallel_worker.py) runs every case; the
single-device reference runs here, in the pytest process, on the same batches.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgpt import init_params, tree
from fgpt.errors import FgptError
from fgpt.parallel import make_strategy
from parallel_case import CASES, CONFIG, HYPER, MAX_NORM, STEPS, train_steps

WORKER = Path(__file__).with_name("parallel_worker.py")
WORLD_SIZES = (2, 3)


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("parallel")
    results = {}
    for world in WORLD_SIZES:
        proc = torchrun(world, str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = torch.load(out / f"world{world}.pt", weights_only=False)
    return results


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
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
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
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_custom_fsdp_refuses_optimizer_state_of_another_world_size(distributed, world):
    message = distributed[world]["custom-fsdp/resume"]["wrong_world_error"]
    assert f"nproc={world + 1}" in message and "\n" not in message


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
