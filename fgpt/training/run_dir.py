"""The run directory: the files a training run leaves, and the one writer and reader of each.

    model.safetensors, config.json   the newest weights, HF layout (links into step-N)
    train_state.pt                   the commit record: step, run config, elapsed time,
                                     which step directory is whole, its model's digest
    metrics.jsonl                    one JSON object per optimizer step
    .fgpt.lock                       the one-writer lock (fgpt.outdir), while a run writes
    checkpoints/step-N/              model.safetensors, config.json, and optimizer.rank{r}.pt:
                                     optimizer and RNG state of rank r (custom-fsdp's and
                                     ddp's resume on another world size too)

Every file is written through fgpt.atomic (temp file, then rename), and a checkpoint is
committed by one rename of train_state.pt, so a crash at any moment leaves the last
committed checkpoint whole and resumable.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fgpt.atomic import atomic_path, atomic_write_text, file_sha256
from fgpt.checkpoint import CONFIG as CONFIG_FILE, WEIGHTS as MODEL_FILE, load_checkpoint, save_checkpoint
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.outdir import LOCK_FILE, check_not_source, exclusive
from fgpt.parallel.base import Strategy
from fgpt.parallel.optimizer_state import SavedOptimizer
from fgpt.training.run_config import TrainConfig, absolute_data, resumed

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"


def default_out_dir(name: str = "train") -> str:
    return f"out/{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def latest_run(root: str | Path = "out") -> Path | None:
    """The training run under `root` that committed a checkpoint last (it holds metrics.jsonl
    and train_state.pt: a run.convert output or a downloaded model does not), or None."""
    runs = [state.parent for state in Path(root).glob(f"**/{STATE_FILE}")
            if (state.parent / METRICS_FILE).is_file() and (state.parent / MODEL_FILE).is_file()]
    return max(runs, key=lambda d: ((d / STATE_FILE).stat().st_mtime, -len(d.parts)), default=None)


# --- the commit record ---------------------------------------------------------------------

def train_state(out_dir: str | Path | None) -> dict | None:
    """The commit record of the run in `out_dir`, or None when it holds none."""
    path = Path(out_dir) / STATE_FILE if out_dir else None
    if path is None or not path.exists():
        return None
    return load_saved(path, mmap=False)


def load_saved(path: Path, mmap: bool = True) -> dict:
    """A torch-saved file of a run (tensors and plain values only); a truncated or corrupt
    one is an FgptError naming it, not the zip reader's traceback."""
    try:
        return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FgptError(f"{path} is damaged or not a file torch saved ({type(e).__name__}): "
                        "restore it, or start the run again in another --out") from None


def saved_run(out_dir: str | Path) -> tuple[TrainConfig, GPTConfig]:
    """The settings a checkpointed run was started with, and the model config of its last
    committed checkpoint (the settings record none when the run used the default model)."""
    state = _committed(out_dir)
    return (TrainConfig.from_dict(state["run_config"]),
            GPTConfig.from_json(_step_dir(Path(out_dir), state) / CONFIG_FILE))


def check_not_input(out: str | Path | None, *, data: str | None, init_from: str | None) -> None:
    """A run directory is never an input of its run, nor inside or around one."""
    if out:
        check_not_source("--out", out, {"--data": data, "--init-from": init_from})


def writer_lock(out: str | Path):
    """The run directory's one-writer lock (fgpt.outdir.exclusive), held for a whole run."""
    return exclusive(Path(out) / LOCK_FILE, what=f"the run directory {out}")


def _committed(out_dir: str | Path) -> dict:
    state = train_state(out_dir)
    if state is None:
        raise FgptError(f"--resume: no training checkpoint in {out_dir} (missing {STATE_FILE})")
    if "checkpoint" not in state:
        raise FgptError(f"--resume: {out_dir} was written before checkpoints/step-N existed; "
                        "it cannot be resumed (its model still loads for generation)")
    return state


def _step_dir(out_dir: Path, state: dict) -> Path:
    return out_dir / state["checkpoint"]


def effective_settings(run: TrainConfig) -> TrainConfig:
    """The settings this session runs with: `run`, or for a resume the checkpoint's own with
    the changes a resume may make. Refuses to start a fresh run over a checkpointed one,
    a resume of a run that is already done, and an --out that is an input."""
    check_not_input(run.out, data=run.data, init_from=run.init_from)
    if not run.resume:
        if train_state(run.out) is not None:
            raise FgptError(f"{run.out} already holds a run; pass --resume to continue it")
        clash = [f for f in (MODEL_FILE, CONFIG_FILE) if run.out and (Path(run.out) / f).exists()]
        if clash:  # e.g. a downloaded GPT-2 folder: a fresh run writes both files
            raise FgptError(f"{run.out} already holds a checkpoint ({', '.join(clash)}) that training would "
                            "overwrite; give another --out")
        return dataclasses.replace(run, data=absolute_data(run.data))
    run = resumed(run, *saved_run(run.out))
    done = _committed(run.out)["step"]
    if done >= run.steps:
        raise FgptError(f"--resume: the run already did {done} of --steps {run.steps}")
    if run.stop_after is not None and run.stop_after <= done:
        raise FgptError(f"--stop-after {run.stop_after}: the run is already at step {done}")
    return run


def session_free(run: TrainConfig) -> TrainConfig:
    """The settings as recorded for a resume: --stop-after ends one session, not the run."""
    return dataclasses.replace(run, stop_after=None)


# --- torchrun restarts ---------------------------------------------------------------------

def torchrun_job_id() -> str | None:
    """torchrun's rendezvous id: one per job, kept across its restarts. `--standalone` makes
    a fresh one; a multi-node job without `--rdzv-id` gets "none", which names nothing."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run_id in (None, "none") else run_id


def saved_by_this_job(out_dir: str | Path) -> dict | None:
    """The train state in `out_dir` if this very torchrun job wrote it: a restart
    (--max-restarts) resumes it. A checkpoint of any other run is resumed only when asked
    (--resume). (Not the restart count: every node's agent keeps its own.)"""
    job = torchrun_job_id()
    state = train_state(out_dir) if job else None
    return state if state and state.get("torchrun_run_id") == job else None


# --- checkpoints ---------------------------------------------------------------------------

def save_train_checkpoint(out_dir: Path, strategy: Strategy, run: TrainConfig, model_config: GPTConfig,
                          *, step: int, elapsed_s: float) -> None:
    """Every rank calls this. Each save fills a fresh checkpoints/step-N (the ranks' optimizer
    files, then the model); rank 0's atomic rewrite of train_state.pt naming it commits it.
    Only then do the top-level model files move to it and older step directories go, so a
    crash at any moment leaves the last committed checkpoint whole and resumable."""
    params = strategy.full_params()  # a collective
    step_dir = out_dir / CHECKPOINTS_DIR / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _atomic_torch_save({"step": step, "optimizer": strategy.optimizer_state(), "rng": rng},
                       _rank_file(step_dir, strategy.rank))
    strategy.barrier()
    if strategy.is_main:
        save_checkpoint(step_dir, model_config, params)
        _atomic_torch_save({"step": step, "run_config": session_free(run).to_dict(), "elapsed_s": elapsed_s,
                            "strategy": strategy.name, "world_size": strategy.world_size,
                            "checkpoint": step_dir.relative_to(out_dir).as_posix(),
                            "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                            "model_sha256": file_sha256(step_dir / MODEL_FILE)},
                           out_dir / STATE_FILE)
        for name in (MODEL_FILE, CONFIG_FILE):
            _replace_with_link(step_dir / name, out_dir / name)
        for old in (out_dir / CHECKPOINTS_DIR).glob("step-*"):
            if old != step_dir and old.is_dir():
                shutil.rmtree(old)
    strategy.barrier()


@dataclass
class Resumed:
    """What a resume continues from: the last committed checkpoint of a run directory."""
    step: int  # optimizer steps done
    elapsed_s: float
    optimizer: SavedOptimizer  # the saved ranks' optimizer states, read on demand
    rng: dict | None  # this rank's saved RNG states; None when the world size changed


def load_train_checkpoint(out_dir: Path, strategy: Strategy) -> tuple[GPTConfig, dict, Resumed]:
    """The last committed checkpoint: (model config, fp32 params on the CPU, the rest), each
    file checked to belong to the same save. Rank files are opened on demand and
    memory-mapped: resharding reads only what it needs."""
    state = _committed(out_dir)
    step_dir = _step_dir(out_dir, state)
    torn = FgptError(f"--resume: the checkpoint in {step_dir} is damaged (changed after it was saved)")
    if file_sha256(step_dir / MODEL_FILE) != state["model_sha256"]:
        raise torn

    @functools.cache
    def rank_file(q: int) -> dict:
        path = _rank_file(step_dir, q)
        if not path.exists():
            raise FgptError(f"--resume: {path} is missing")
        # on the CPU: a rank file of a GPU run names its rank's device, which may not exist now
        saved = load_saved(path)
        if saved["step"] != state["step"]:
            raise torn
        if "pieces" not in saved["optimizer"]:
            raise FgptError(f"--resume: {path} was written by an older fgpt (another optimizer layout); "
                            "it cannot be resumed (its model still loads for generation)")
        return saved

    same_world = state["world_size"] == strategy.world_size
    rng = {k: v.clone() for k, v in rank_file(strategy.rank)["rng"].items()} if same_world else None
    model_config, params = load_checkpoint(step_dir)
    optimizer = SavedOptimizer(state["world_size"], lambda q: rank_file(q)["optimizer"])
    return model_config, params, Resumed(step=state["step"], elapsed_s=state["elapsed_s"], optimizer=optimizer, rng=rng)


def _rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"optimizer.rank{rank}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _replace_with_link(source: Path, target: Path) -> None:
    """Atomically make `target` the same file as `source` (a hard link; a copy where the
    filesystem has none)."""
    with atomic_path(target) as tmp:
        tmp.unlink()  # os.link makes the name itself
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


# --- metrics -------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl, one JSON row per optimizer step. Opening it for a resume from step
    `keep_until` keeps only the rows up to that step (a crash during the trim leaves the
    old log whole); each row is flushed as it is appended."""

    def __init__(self, out_dir: Path, *, keep_until: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS_FILE
        kept = []
        if keep_until and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> float:
    """A metrics row's step; a line a kill cut short counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
