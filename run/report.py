"""`just report [--quick] [--out DIR] [--data SRC]`: the assessment study.

Trains every arm on its seeds, probes the trained models (context use, length, copying,
generation), runs the relay probe and the efficiency measurements, and writes
DIR/report.md, DIR/report/*.png and DIR/report/results.json (every number the text
quotes). DIR defaults to docs/. `--quick` runs the same code with tiny budgets (the test).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from fgpt.errors import FgptError, require_extra
from fgpt.measure import machine, machine_line
from fgpt.report.budget import FULL, QUICK
from fgpt.report.claims import derive
from fgpt.report.study import run_study
from fgpt.report.writer import write_report
from run._cli import main_guard


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="just report", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (about a minute): the test's mode")
    p.add_argument("--out", default="docs", help="output directory (default: docs)")
    p.add_argument("--data", help="corpus: text file, directory or glob (default: Python's stdlib)")
    return p.parse_args(argv)


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
    results = run_study(budget, data_spec=args.data)
    results["meta"] = {"command": "python -m run.report" + "".join(" " + shlex.quote(a) for a in argv),
                       "machine": machine(), "machine_line": machine_line()}
    results["budget"] = budget.to_dict()
    derive(results, budget)
    asset_dir = out / "report"
    write_plots(results, asset_dir)
    (asset_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(write_report(results, plot_dir="report"))
    print(f"wrote {out / 'report.md'}, {asset_dir}/results.json and plots", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
