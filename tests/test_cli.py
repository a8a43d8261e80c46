"""The entry points' shared plumbing (run/_cli.py): a usage error is one `error:` line and
exit code 2, like every other bad input, in each tool that parses flags."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("tool", ["eval", "prepare", "plot", "convert", "generate", "serve"])
def test_a_usage_error_is_one_line_with_exit_code_2(tool, capsys):
    module = importlib.import_module(f"run.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--no-such-flag"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"(see python -m run.{tool} --help)" in lines[0], lines


@pytest.mark.parametrize("what", ["generate", "train", "eval"])
def test_a_bench_against_transformers_without_it_names_the_extra(what, capsys, monkeypatch):
    import sys
    from run import bench
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if a plain install: import fails
    monkeypatch.setattr(sys, "argv", ["run.bench", what])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert lines == [f"error: just bench {what} (its peer) needs transformers, which a plain install leaves "
                     "out: pip install 'fgpt[dev]'"]


@pytest.mark.parametrize("argv", [["bogus"], []])
def test_an_unknown_or_missing_bench_is_one_error_line(argv, capsys, monkeypatch):
    import sys
    from run import bench
    monkeypatch.setattr(sys, "argv", ["run.bench", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert all(name in lines[0] for name in bench.BENCHES)
