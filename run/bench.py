"""`python -m run.bench WHAT [ARGS...]`: benchmarks that print a table of ratios against a
peer measured in the same run. WHAT is one of the modules run/bench_<what>.py."""

from __future__ import annotations

import importlib
import sys

BENCHES = ("generate", "train", "parallel", "attention", "eval", "data")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python -m run.bench {{{'|'.join(BENCHES)}}} [ARGS...]", file=sys.stderr)
        sys.exit(2)
    what = sys.argv[1]
    sys.argv = [f"run.bench {what}"] + sys.argv[2:]
    from run._cli import main_guard
    main_guard(importlib.import_module(f"run.bench_{what}").main)


if __name__ == "__main__":
    main()
