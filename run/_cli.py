"""Shared plumbing for the entry points: one-line errors and a clean exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from fgpt.errors import FgptError


def main_guard(main: Callable[[], int | None]) -> None:
    """Run `main`; turn FgptError (bad input) into `error: ...` on stderr and exit 2."""
    try:
        code = main()
    except FgptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad choice, a missing value) are FgptError too, so
    `main_guard` prints them as the same one line as every other bad input."""

    def error(self, message: str):
        raise FgptError(f"{message} (see {self.prog} --help)")
