"""`python -m run.bench WHAT [ARGS...]`: benchmarks that print a table of ratios against a
peer measured in the same run. WHAT is one of the modules run/bench/<what>.py."""

from __future__ import annotations

import importlib
import sys

BENCHES = ("generate", "train", "loss", "parallel", "attention", "eval", "data", "profile", "serve")
AGAINST_TRANSFORMERS = ("generate", "train", "eval")  # their peer is transformers' GPT-2


def main() -> None:
    usage = f"usage: python -m run.bench {{{'|'.join(BENCHES)}}} [ARGS...]"
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}\n`python -m run.bench WHAT --help` lists WHAT's own arguments.")
        return
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        given = f"{sys.argv[1]!r} is not a benchmark" if len(sys.argv) > 1 else "no benchmark named"
        print(f"error: {given}: choose one of {', '.join(BENCHES)}", file=sys.stderr)
        sys.exit(2)
    what = sys.argv[1]
    sys.argv = [f"run.bench {what}"] + sys.argv[2:]
    from run._cli import main_guard

    def bench():
        if what in AGAINST_TRANSFORMERS:
            from fgpt.errors import require_extra
            require_extra("transformers", "dev", f"just bench {what} (its peer)")
        importlib.import_module(f"run.bench.{what}").main()
    main_guard(bench)
