"""One rank of `just report --strategy S --nproc N`: trains the runs of a plan.json
(fgpt.report.runs writes it) in turn, on one process group, each into its run.train run
directory (skipping finished runs, resuming half-trained ones). Started by run.train's
launcher (torchrun), never by hand."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch.distributed as dist

from fgpt.parallel.process_group import exit_without_finalizers, join_process_group, pick_device
from fgpt.report.runs import finished, from_plan
from fgpt.training import run_dir
from fgpt.training.train import train
from run._cli import main_guard


def main() -> int:
    runs = [from_plan(entry) for entry in json.loads(open(sys.argv[1]).read())]
    join_process_group(runs[0].strategy, pick_device(runs[0].device))  # once: every run shares the group
    code = 0
    for run in runs:
        if finished(run):
            continue
        run = dataclasses.replace(run, resume=run_dir.train_state(run.out) is not None)
        if train(run).interrupted:
            code = 130
            break
    dist.destroy_process_group()
    exit_without_finalizers(code)


if __name__ == "__main__":
    main_guard(main)
