"""The multi-node command of docs/parallel.md, rehearsed on one machine: two torchrun
agents ("nodes", one rank each) meet through c10d rendezvous on loopback.

References: the single-device run (the losses must equal it step for step), and the
documented one-line error for automatic restarts across nodes without a fresh store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgpt import GPTConfig
from fgpt.training.train import TrainConfig, train
from helpers import children_of
from train_case import assert_reordered_losses_match

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32)
STEPS = 8
pytestmark = [pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc"),
              pytest.mark.slow]  # torchrun nodes on loopback: `just test-fast` leaves them out


@pytest.fixture(scope="module")
def single_losses(text_file):
    result = train(TrainConfig(model=TINY, data=str(text_file), steps=STEPS, batch_size=4, eval_interval=0,
                               checkpoint_interval=2, precision="fp32", progress=False))
    return [m["loss"] for m in result.metrics]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(text_file, out: Path, *, max_restarts: int = 0, fresh_store: bool = False) -> list[subprocess.Popen]:
    """docs/parallel.md's command, once per node, with one CPU rank per node."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if fresh_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"rehearsal-{out.name}",
           f"--max-restarts={max_restarts}", "-m", "run.train", "--strategy", "custom-fsdp",
           "--device", "cpu", "--out", str(out), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
           "--n-ctx", "16", "--steps", str(STEPS), "--batch-size", "4", "--eval-interval", "0",
           "--checkpoint-interval", "2", "--precision", "fp32", "--data", str(text_file), "--no-progress"]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]


def finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each node's agent, once both have ended."""
    try:
        errs = [n.communicate(timeout=300)[1] for n in nodes]
    finally:
        stop(nodes)
    return [(n.returncode, err) for n, err in zip(nodes, errs)]


def stop(nodes: list[subprocess.Popen]) -> None:
    """Kill what is still running of the agents and their workers (after a failed test)."""
    for n in nodes:
        if n.poll() is None:
            for pid in children_of(n.pid):
                os.kill(pid, signal.SIGKILL)
            n.kill()
            n.wait()


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_a_worker_after(nodes, out: Path, steps_done: int) -> None:
    """SIGKILL the second node's rank once `steps_done` steps are logged (a crashed node)."""
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps_done) and time.time() < deadline:
        time.sleep(0.01)
    workers = children_of(nodes[1].pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)


def test_two_nodes_on_loopback_log_the_single_device_losses(text_file, single_losses, tmp_path):
    out = tmp_path / "two-nodes"
    results = finish(start_nodes(text_file, out))
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    assert_reordered_losses_match(logged_losses(out), single_losses)  # half batches on 1 thread each


def test_restarts_across_nodes_without_a_fresh_store_are_the_documented_error_on_every_node(text_file, tmp_path):
    """Only one node's agent counts restarts, so a shared store cannot be keyed per attempt:
    both nodes refuse at once, rather than one hanging at the first restart."""
    results = finish(start_nodes(text_file, tmp_path / "shared-store", max_restarts=1))
    assert all(code != 0 for code, _ in results)
    for _, err in results:
        errors = {line for line in err.splitlines() if line.startswith("error:")}
        assert errors == {"error: automatic restarts across several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "in torchrun's environment (a fresh rendezvous store per attempt)"}, err[-2000:]


def test_a_restart_across_nodes_with_a_fresh_store_resumes_to_the_same_losses(text_file, single_losses, tmp_path):
    out = tmp_path / "fresh-store"
    nodes = start_nodes(text_file, out, max_restarts=1, fresh_store=True)
    try:
        kill_a_worker_after(nodes, out, 3)
    except BaseException:
        stop(nodes)
        raise
    results = finish(nodes)
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    assert any("resuming from step" in err for _, err in results)
    assert_reordered_losses_match(logged_losses(out), single_losses)  # half batches on 1 thread each
