"""`just report [--quick] [--out DIR] [--data SRC] [--steps N]`: the assessment study.

Trains every arm on its seeds, probes the trained models (context use, length, copying,
generation), runs the relay probe and the efficiency measurements, and writes
DIR/report.md, DIR/report/*.png and DIR/report/results.json (every number the text
quotes). DIR defaults to docs/. `--quick` runs the same code with tiny budgets (the test).
A pilot turns the budget's training minutes into steps per run, so the schedule follows the
machine's speed; `--steps N` pins it instead (the committed report's N is in its setup).
The measurements are saved before anything is derived from them, so `--render` can rebuild
the claims, plots and text from a results.json without measuring again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from fgpt.atomic import atomic_write_text
from fgpt.errors import FgptError, require_extra
from fgpt.measure import machine, machine_line
from fgpt.outdir import LOCK_FILE, exclusive
from fgpt.report.budget import FULL, QUICK, Budget
from fgpt.report.claims import derive
from fgpt.report.study import run_study
from fgpt.report.writer import write_report
from run._cli import main_guard


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="just report", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (about a minute): the test's mode")
    p.add_argument("--out", default="docs", help="output directory (default: docs)")
    p.add_argument("--data", help="corpus: text file, directory or glob (default: Python's stdlib)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="train every run N steps (a multiple of the budget's evaluation count) instead of the "
                        "pilot's fit to the time budget: the same schedule on any machine")
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="measure nothing: derive the claims, plots and text again from this results.json")
    return p.parse_args(argv)


def pinned(budget: Budget, steps: int | None) -> Budget:
    if steps is None:
        return budget
    k = budget.evals_per_run
    if steps < k or steps % k:
        raise FgptError(f"--steps {steps}: the {budget.name} budget evaluates {k} times a run, so the steps "
                        f"must be a positive multiple of {k}")
    return dataclasses.replace(budget, steps=steps)


def read_results(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FgptError(f"--render {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(results, dict) or "budget" not in results or "runs" not in results:
        raise FgptError(f"--render {path}: not a results.json written by just report")
    return results


def save_results(asset_dir: Path, results: dict) -> None:
    asset_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(asset_dir / "results.json", json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.render and args.steps is not None:
        raise FgptError("--steps: --render measures nothing, so there are no steps to pin")
    budget = None if args.render else pinned(QUICK if args.quick else FULL, args.steps)
    require_extra("matplotlib", "plot", "the report's plots")  # before hours of training, not after
    from fgpt.report.plots import write_plots
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FgptError(f"--out {out}: {e.strerror}") from None
    with exclusive(out / LOCK_FILE, what=f"--out {out}"):  # one study writes a directory at a time
        study(args, argv, budget, out, write_plots)


def study(args, argv: list[str], budget, out: Path, write_plots) -> None:
    asset_dir = out / "report"
    if args.render:
        results = read_results(args.render)
        budget = {b.name: b for b in (FULL, QUICK)}[results["budget"]["name"]]
    else:
        results = run_study(budget, data_spec=args.data)
        results["meta"] = {"command": "python -m run.report" + "".join(" " + shlex.quote(a) for a in argv),
                           "machine": machine(), "machine_line": machine_line()}
        results["budget"] = budget.to_dict()
        save_results(asset_dir, results)  # the measurements are safe before any derivation runs
    derive(results, budget)
    write_plots(results, asset_dir)
    save_results(asset_dir, results)
    atomic_write_text(out / "report.md", write_report(results, plot_dir="report"))
    print(f"wrote {out / 'report.md'}, {asset_dir}/results.json and plots", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
