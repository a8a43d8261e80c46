"""docs/cli.md is every entry point's `--help`, verbatim: the flag reference cannot drift
from the code. After changing a flag, rewrite it with
    FGPT_WRITE_DOCS=1 python -m pytest tests/test_cli_docs.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every entry point's --help in a subprocess: `just test-fast` leaves it out

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
HEADER = """# Command-line reference

Every entry point's `--help`, as it prints it (80 columns). `just NAME ...` runs
`python -m run.NAME ...` with the same flags; bad input to any of them is one `error: ...`
line on stderr and exit code 2. This page is generated and checked by
`tests/test_cli_docs.py`; after changing a flag, rewrite it with
`FGPT_WRITE_DOCS=1 python -m pytest tests/test_cli_docs.py`.
"""


def entry_points() -> list[str]:
    """run/NAME.py modules and run/NAME/ packages with a __main__, private ones aside, and the
    GPU check."""
    run = ROOT / "run"
    names = [p.stem for p in run.glob("*.py") if not p.stem.startswith("_")]
    names += [p.parent.name for p in run.glob("*/__main__.py")]
    return sorted(names) + ["bench.gpu_check"]  # `just gpu-check`


def helps() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    procs = {name: subprocess.Popen([sys.executable, "-m", f"run.{name}", "--help"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in entry_points()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stderr[-2000:])
        out[name] = stdout.rstrip()
    return out


def render(helps: dict[str, str]) -> str:
    sections = [f"## `python -m run.{name}`\n\n```text\n{text}\n```\n" for name, text in helps.items()]
    return HEADER + "\n" + "\n".join(sections)


def test_docs_cli_md_is_every_entry_points_help():
    expected = render(helps())
    if os.environ.get("FGPT_WRITE_DOCS"):
        DOC.write_text(expected)
    assert DOC.read_text() == expected, "docs/cli.md is stale: FGPT_WRITE_DOCS=1 python -m pytest tests/test_cli_docs.py"
