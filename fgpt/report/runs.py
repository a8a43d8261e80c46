"""The study's training runs as ordinary `run.train` run directories, and the study directory
that lets a rerun of the same command resume.

    OUT/runs/study.json          what the study is (budget, data): a rerun of another is refused
    OUT/runs/sections/NAME.json  each finished measurement (pilot, window, per-run scores, probes,
                                 efficiency), saved as it finishes and read back on a rerun
    OUT/runs/corpus/             the restricted-vocabulary corpus as fgpt shards (the manifest
                                 names its UNK id, whose targets the loss leaves out)
    OUT/runs/ARM-seedS/          one run.train run directory per arm and seed: config.json,
                                 metrics.jsonl, checkpoints (`python -m run.train --resume --out`
                                 continues one by hand)
    OUT/runs/uptrain-KIND-seedS/ the uptraining ladder's runs, from OUT/runs/uptrain-init/

Runs train in this process (strategy single, one process) or under torchrun as `run.train`
launches it (`--strategy S --nproc N`): one launch trains every pending run of a phase in
turn on the same process group (run/_report_ranks.py). A run that finished is skipped, a
half-trained one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgpt import data
from fgpt.atomic import atomic_write_text, json_safe
from fgpt.config import GPTConfig
from fgpt.data.shards import FORMAT, MANIFEST, dtype_for, shard_entries, shard_name
from fgpt.errors import FgptError
from fgpt.parallel.process_group import resolve_device
from fgpt.training import run_dir
from fgpt.training.run_config import TrainConfig, absolute_data


class Stopped(Exception):
    """--stop-after-runs: the study trained as many runs as asked and stopped (rerun to go on)."""


@dataclass
class Launch:
    """Where and how the runs train; `runs_left`: how many more this invocation may train."""
    strategy: str = "single"
    nproc: int = 1
    device: str = "cpu"
    precision: str = "auto"
    compile: bool = False
    runs_left: int | None = None

    def __post_init__(self):
        if self.nproc < 1:
            raise FgptError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nproc > 1 and self.strategy == "single":
            raise FgptError("--strategy single runs one process; use ddp, fsdp or custom-fsdp with --nproc > 1")
        self.device = resolve_device(self.device)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "world_size": self.nproc, "device": self.device,
                "precision": self.precision, "compile": self.compile}


# --- the study directory ---------------------------------------------------------------------

def _json(value):
    """A value as it reads back from JSON (tuples -> lists, int keys -> strings, NaN -> None),
    so a measurement read back on a rerun is the one computed in an uninterrupted run."""
    return json.loads(json.dumps(json_safe(value)))


class StudyDir:
    """OUT/runs: refuses a study other than the one it holds; saves and reads back sections."""

    def __init__(self, root: Path, identity: dict):
        self.root = root
        path = root / "study.json"
        identity = _json(identity)
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != identity:
                raise FgptError(f"--out {root.parent} holds a study of {_difference(saved, identity)}: "
                                f"use another --out (or delete {root})")
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(identity, indent=1) + "\n")

    def section(self, name: str, compute):
        """The saved section `name`, else compute it and save it."""
        path = self.root / "sections" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = _json(compute())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(value) + "\n")
        return value

    def has(self, name: str) -> bool:
        return (self.root / "sections" / f"{name}.json").exists()

    def invocations(self) -> list[float]:
        """Minutes of wall-clock of each invocation so far (OUT/runs/wall.json)."""
        path = self.root / "wall.json"
        return json.loads(path.read_text()) if path.exists() else []

    def add_wall_min(self, minutes: float) -> None:
        atomic_write_text(self.root / "wall.json", json.dumps(self.invocations() + [minutes]) + "\n")

    def wall_min(self) -> float:
        return sum(self.invocations())


def _difference(saved: dict, wanted: dict) -> str:
    """`another budget` / `other data`, in words, for the refusal."""
    if saved.get("data") != wanted.get("data"):
        return f"data {saved.get('data') or 'built-in'}, not {wanted.get('data') or 'built-in'}"
    a, b = saved.get("budget", {}), wanted.get("budget", {})
    if a.get("name") != b.get("name"):
        return f"budget {a.get('name')}, not {b.get('name')}"
    field = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")
    return f"budget {a.get('name')} with {field} = {a.get(field)!r}, not {b.get(field)!r}"


# --- the corpus the runs read ------------------------------------------------------------------

def write_corpus(corpus: data.Corpus, directory: Path) -> Path:
    """The (restricted) corpus as one train and one val fgpt shard, once; its manifest records
    the UNK id as `ignore_id` (fgpt.data.open_corpus leaves its targets out of the loss)."""
    if (directory / MANIFEST).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    top = int(max(np.max(corpus.train), np.max(corpus.val)))
    dtype = dtype_for(top + 1)
    splits = {}
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        path = directory / shard_name(split, 0)
        np.asarray(tokens).astype(dtype).tofile(path)
        entries = shard_entries(directory, split, dtype)
        splits[split] = {"tokens": sum(e["tokens"] for e in entries), "shards": entries}
    manifest = {"format": FORMAT, "tokenizer": "gpt2 (restricted by fgpt.report.vocab)", "dtype": dtype.name,
                "max_token": top, "source": corpus.description, "ignore_id": corpus.ignore_id,
                "splits": splits}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return directory


# --- the runs ------------------------------------------------------------------------------------

def grad_accum(batch_size: int, micro_batch: int | None, nproc: int) -> int:
    """The fewest micro-batches per step that split each rank's share of the batch evenly
    into forwards of at most `micro_batch` sequences (None: one forward)."""
    if batch_size % nproc:
        raise FgptError(f"batch_size {batch_size} does not split evenly into {nproc} ranks: "
                        f"set batch_size in a --budget-file")
    per_rank = batch_size // nproc
    if micro_batch is None:
        return 1
    return next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= micro_batch)


def run_config(config: GPTConfig | None, *, seed: int, steps: int, out: Path, data_dir: Path, launch: Launch,
               settings: dict) -> TrainConfig:
    """One run of the study as run.train would record it."""
    windowed = config is not None and config.window is not None
    return TrainConfig(model=config, data=absolute_data(str(data_dir)), steps=steps, seed=seed, out=str(out),
                       resume=run_dir.train_state(out) is not None, strategy=launch.strategy,
                       device=launch.device, precision=launch.precision, compile="on" if launch.compile else "off",
                       window_kernel="flex" if windowed and launch.device == "cuda" else "band",
                       progress=False, **settings)


def finished(run: TrainConfig) -> bool:
    state = run_dir.train_state(run.out)
    return state is not None and state["step"] >= run.steps


def train_runs(runs: list[TrainConfig], launch: Launch, root: Path, log) -> None:
    """Train every unfinished run (resuming half-trained ones): here, or under torchrun."""
    pending = [r for r in runs if not finished(r)]
    if not pending:
        return
    stopping = launch.runs_left is not None and len(pending) > launch.runs_left
    if launch.runs_left is not None:
        pending = pending[:launch.runs_left]
        launch.runs_left -= len(pending)
    if pending:
        if launch.strategy == "single" and launch.nproc == 1:
            from fgpt.training.train import train
            for run in pending:
                run = dataclasses.replace(run, resume=run_dir.train_state(run.out) is not None)
                if train(run).interrupted:  # Ctrl-C / SIGTERM: the run checkpointed; end the study too
                    raise KeyboardInterrupt
                log(f"trained {Path(run.out).name}")
        else:
            _launch(pending, launch, root)
            log(f"trained {', '.join(Path(r.out).name for r in pending)} ({launch.strategy} x {launch.nproc})")
    if stopping:
        raise Stopped


def _launch(runs: list[TrainConfig], launch: Launch, root: Path) -> None:
    from fgpt.training.train import check_launch
    from run.train import relaunch
    check_launch(runs[0], nproc=launch.nproc)  # bad input: one error here, before any rank starts
    plan = root / "plan.json"
    atomic_write_text(plan, json.dumps([dataclasses.asdict(r) for r in runs]) + "\n")
    code = relaunch([str(plan)], launch.nproc, 0, module="run._report_ranks")
    if code >= 128:
        raise KeyboardInterrupt
    if code:
        raise FgptError(f"a training rank failed (exit {code}); rerun the same command to resume")


def from_plan(entry: dict) -> TrainConfig:
    """A TrainConfig of plan.json (dataclasses.asdict of one)."""
    model = entry["model"]
    if model is not None:
        model = GPTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    return TrainConfig(**(entry | {"model": model, "betas": tuple(entry["betas"])}))


def metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / run_dir.METRICS_FILE).read_text().splitlines() if line.strip()]
