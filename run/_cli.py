"""Shared plumbing for the entry points: one-line errors and a clean exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from fgpt.errors import FgptError


def main_guard(main: Callable[[], int | None]) -> None:
    """Run `main`; turn FgptError (bad input) and OSError (a full disk, an unwritable
    directory: the file system's answer, not a bug) into `error: ...` on stderr and exit 2."""
    try:
        code = main()
    except FgptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad choice, a missing value) are the same one line and
    exit code as every other bad input, rather than the whole usage text first."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def checkpoint_or_default(given: str | None) -> str:
    """--checkpoint as given; else the newest training run under out/ (else the newest
    checkpoint of any kind there), said on stderr."""
    if given:
        return given
    from fgpt.training import run_dir
    from fgpt.checkpoint import latest_checkpoint
    run = run_dir.latest_run("out")
    if run is not None:
        print(f"no --checkpoint: using the newest training run, {run}", file=sys.stderr)
        return str(run)
    path = latest_checkpoint("out")
    print(f"no --checkpoint: no training run under out/, using the newest checkpoint there, {path}",
          file=sys.stderr)
    return str(path)


def summary(doc: str) -> str:
    """A module docstring's first paragraph on one line: an --help description."""
    return " ".join(doc.split("\n\n")[0].split())
