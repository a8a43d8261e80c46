"""`just report`: the assessment study at any scale, from 2 CPU cores to GPT-2 124M on many GPUs.

    just report [--budget quick|cpu|gpu-smoke|gpu|gpt2] [--budget-file F.toml] [--dry-run]
                [--strategy S --nproc N] [--device D] [--precision P] [--compile] [--data SRC] [--out DIR]

Trains every arm on its seeds, each a run.train run directory under DIR/runs/ (through the
strategy and ranks given: torchrun as run.train launches it), probes the trained models
(context use, length, copying, generation), runs the relay probe and the efficiency
measurements, and writes DIR/report.md, DIR/report/*.png and DIR/report/results.json
(every number the text quotes). DIR defaults to docs/. Rerunning the same command resumes:
finished runs are skipped, a half-trained one resumes from its last checkpoint, finished
measurements are read back (DIR/runs/sections/). `--budget quick` (alias `--quick`) runs
the same code with tiny budgets (the test). Where a budget pins no steps (quick, cpu), a
pilot turns its training minutes into steps per run; `--steps N` pins them instead.
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

from fgpt.atomic import atomic_write_text, json_safe
from fgpt.errors import FgptError, require_extra
from fgpt.measure import machine, machine_line
from fgpt.outdir import LOCK_FILE, exclusive
from fgpt.parallel import STRATEGIES
from fgpt.parallel.process_group import DEVICES
from fgpt.report.budget import Budget, PRESETS, with_file
from fgpt.report.claims import derive
from fgpt.report.runs import Launch, Stopped
from fgpt.report.writer import write_report
from fgpt.training import precision
from run._cli import ArgumentParser, main_guard
from run.train import expand_launcher_tokens


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="just report", description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=list(PRESETS) + ["full"], default="cpu",
                   help="preset (default cpu, the committed report; full = cpu)")
    p.add_argument("--quick", action="store_true", help="= --budget quick: tiny budgets (the test's mode)")
    p.add_argument("--budget-file", metavar="FILE.toml", help="override any field of the preset (fgpt/report/budget.py)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs, steps, tokens, FLOPs, estimated time and disk) and train nothing")
    p.add_argument("--strategy", choices=list(STRATEGIES), default=None, help="also strategy=NAME (default single)")
    p.add_argument("--nproc", type=int, help="ranks (also nproc=N; default 1 for single, 2 otherwise)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (default): cuda where there is one")
    p.add_argument("--precision", choices=precision.PRECISIONS, default="auto",
                   help="auto (default): bf16 where this device's bf16 matmul is measurably faster")
    p.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    p.add_argument("--out", default="docs", help="output directory (default: docs); runs under DIR/runs/")
    p.add_argument("--data", help="corpus: text / JSONL / Parquet file, directory or glob, or token shards "
                   "(run.prepare, nanoGPT, llm.c) (default: Python's stdlib)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="train every run N steps (a multiple of the budget's evaluation count) instead of the "
                        "budget's: the same schedule on any machine")
    p.add_argument("--stop-after-runs", type=int, metavar="K",
                   help="stop after training K runs (rerun the same command to go on)")
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="measure nothing: derive the claims, plots and text again from this results.json")
    return p.parse_args(expand_launcher_tokens(list(argv or [])))


def pinned(budget: Budget, steps: int | None) -> Budget:
    if steps is None:
        return budget
    k = budget.evals_per_run
    if steps < k or steps % k:
        raise FgptError(f"--steps {steps}: the {budget.name} budget evaluates {k} times a run, so the steps "
                        f"must be a positive multiple of {k}")
    return dataclasses.replace(budget, steps=steps)


def chosen_budget(args) -> Budget:
    budget = PRESETS["quick" if args.quick else "cpu" if args.budget == "full" else args.budget]
    if args.budget_file:
        budget = with_file(budget, args.budget_file)
    budget = pinned(budget, args.steps)
    budget.check()
    return budget


def read_results(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FgptError(f"--render {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(results, dict) or "budget" not in results or "runs" not in results:
        raise FgptError(f"--render {path}: not a results.json written by just report")
    return results


def save_results(asset_dir: Path, results: dict) -> None:
    """Strict JSON (NaN, say of a single seed's spread, as null): other programs read it too."""
    asset_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(asset_dir / "results.json", json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")


def dry_run(budget: Budget, launch: Launch, data_spec: str | None) -> None:
    from fgpt.report import plan
    if launch.precision == "auto":  # what the study would resolve it to (fgpt.report.study.study_precision)
        launch.precision = precision.choose(launch.device)
    flops_per_s = plan.pilot_flops_per_s(budget, launch)
    steps = plan.fitted_steps(budget, flops_per_s)
    tokens = None
    if budget.restrict_vocab:
        from fgpt import data
        corpus = data.load_corpus(data_spec, progress=False)
        tokens = len(corpus.train) + len(corpus.val)
    print(plan.describe(plan.plan(budget, steps, launch, flops_per_s, tokens), budget))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.render and args.steps is not None:
        raise FgptError("--steps: --render measures nothing, so there are no steps to pin")
    budget = None if args.render else chosen_budget(args)
    strategy = args.strategy or "single"
    launch = Launch(strategy=strategy, nproc=args.nproc or (1 if strategy == "single" else 2), device=args.device,
                    precision=args.precision, compile=args.compile, runs_left=args.stop_after_runs)
    if args.dry_run:
        dry_run(budget, launch, args.data)
        return
    require_extra("matplotlib", "plot", "the report's plots")  # before hours of training, not after
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FgptError(f"--out {out}: {e.strerror}") from None
    with exclusive(out / LOCK_FILE, what=f"--out {out}"):  # one study writes a directory at a time
        study(args, argv, budget, launch, out)


def study(args, argv: list[str], budget: Budget | None, launch: Launch, out: Path) -> None:
    """Run (or resume, or only --render) the study into `out`: results.json, plots, report.md."""
    from fgpt.report.plots import write_plots
    from fgpt.report.study import run_study
    asset_dir = out / "report"
    if args.render:
        results = read_results(args.render)
        budget = Budget.from_dict(results["budget"])
    else:
        try:
            results = run_study(budget, data_spec=args.data, out=out, launch=launch)
        except Stopped:
            print(f"stopped after {args.stop_after_runs} runs; rerun the same command to go on", file=sys.stderr)
            return
        budget = Budget.from_dict(results["budget"])  # with the window the rule chose
        results["meta"] = {"command": "python -m run.report" + "".join(" " + shlex.quote(a) for a in argv),
                           "machine": machine(), "machine_line": machine_line()}
        save_results(asset_dir, results)  # the measurements are safe before any derivation runs
    derive(results, budget)
    write_plots(results, asset_dir)
    save_results(asset_dir, results)
    atomic_write_text(out / "report.md", write_report(results, plot_dir="report"))
    print(f"wrote {out / 'report.md'}, {asset_dir}/results.json and plots", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
