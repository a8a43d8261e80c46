"""Signals to the `strategy=ddp nproc=2` launcher (run.train re-launching itself under
torchrun): SIGTERM to the launcher alone, as `timeout` or a scheduler sends it, and SIGINT to
its whole process group, as a terminal's Ctrl-C does. Either way the ranks finish the step
and checkpoint, and the launcher exits 128 + the signal only once every child has exited.
(That a ddp checkpoint resumes: test_train_cli.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_case import ROOT

pytestmark = pytest.mark.slow  # signals to torchrun launches: `just test-fast` leaves it out

# About two seconds a step on two CPU cores (the 50k-token head dominates): long enough that a
# launcher exiting before its ranks finish the step is caught by the check for leftovers.
# --checkpoint-interval 0: a checkpoint at the stopped step proves the ranks stopped cleanly.
FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--n-ctx", "64", "--batch-size", "32",
         "--eval-interval", "0", "--checkpoint-interval", "0", "--no-progress"]


def processes_of(out: Path) -> list[int]:
    """Live processes whose command line names `out`: the launcher, torchrun's agent, the ranks."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "run.train", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs)


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-the-launcher", "sigint-to-the-process-group"])
def test_a_signal_checkpoints_every_rank_and_the_launcher_waits_for_them(text_file, tmp_path, signum, to_group):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    metrics = out / "metrics.jsonl"
    try:
        with log.open("w") as stderr:  # a file, not a pipe: a leftover rank would hold a pipe open
            proc = cli("strategy=ddp", "nproc=2", *FLAGS, "--steps", "100000", "--data", str(text_file),
                       "--out", str(out), stdout=subprocess.DEVNULL, stderr=stderr,
                       start_new_session=True)  # its own process group, as a terminal's foreground job
        deadline = time.time() + 90
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        assert proc.wait(timeout=60) == 128 + signum, log.read_text()[-3000:]
        assert processes_of(out) == [], log.read_text()[-3000:]  # nothing left running
    finally:  # never leave a run training in the background, whatever failed
        for pid in processes_of(out):
            os.kill(pid, signal.SIGKILL)

    stderr = log.read_text()
    state = torch.load(out / "train_state.pt", weights_only=True)
    done = state["step"]
    assert (state["strategy"], state["world_size"]) == ("ddp", 2)
    assert f"stopped at step {done}," in stderr and "interrupted" not in stderr, stderr[-3000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, done + 1))
