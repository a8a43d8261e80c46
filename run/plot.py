"""`python -m run.plot RUN [RUN ...] --out FIG.png`: training and validation loss against
tokens, one labelled line per run, from each run directory's metrics.jsonl."""

from __future__ import annotations

import argparse
import logging
import sys

from fgpt.errors import FgptError
from fgpt.evaluation.curves import distinct_labels, figure, read_curves, save_figure
from run._cli import ArgumentParser, main_guard, summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.plot", description=summary(__doc__))
    ap.add_argument("runs", nargs="+", metavar="RUN", help="a training --out directory (or its metrics.jsonl)")
    ap.add_argument("--out", required=True, help="the figure to write (.png, .svg or .pdf)")
    ap.add_argument("--label", action="append", help="a legend label per run, in order (default: directory names)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    labels = args.label or distinct_labels(args.runs)
    if len(labels) != len(args.runs):
        raise FgptError(f"{len(labels)} --label for {len(args.runs)} runs: give one per run or none")
    runs = [read_curves(run, label) for run, label in zip(args.runs, labels)]
    out = save_figure(figure(runs), args.out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
