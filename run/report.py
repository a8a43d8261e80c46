"""`just report [--quick] [--out DIR] [--no-parallel]`: the assessment study.

Trains every arm (baseline, RoPE, GQA, SWA, the combination) on every seed, measures, and
writes DIR/report.md, DIR/report/*.png and DIR/report/results.json (every number the text
quotes). DIR defaults to docs/. `--quick` runs the same code with tiny budgets (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from fgpt.errors import FgptError, require_extra
from fgpt.report.budget import FULL, QUICK
from fgpt.report.study import run_study
from fgpt.report.writer import REFERENCES, write_report
from run._cli import main_guard


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="just report", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (about a minute): the test's mode")
    p.add_argument("--out", default="docs", help="output directory (default: docs)")
    p.add_argument("--data", help="corpus: text file, directory or glob (default: Python's stdlib)")
    p.add_argument("--no-parallel", action="store_true", help="skip the parallel-strategies table")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(argv: list[str]) -> dict:
    return {"command": "python -m run.report" + "".join(" " + shlex.quote(a) for a in argv),
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    require_extra("matplotlib", "plot", "the report's plots")  # before hours of training, not after
    from fgpt.report.plots import write_plots
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FgptError(f"--out {out}: {e.strerror}") from None
    budget = QUICK if args.quick else FULL
    results = run_study(budget, data_spec=args.data, parallel=not args.no_parallel)
    results |= {"meta": meta(argv), "budget": budget.to_dict(), "references": REFERENCES}
    asset_dir = out / "report"
    write_plots(results, asset_dir)
    (asset_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(write_report(results, plot_dir="report"))
    print(f"wrote {out / 'report.md'}, {asset_dir}/results.json and plots", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
