"""`python -m run.plot`: each run's metrics.jsonl drawn as labelled training and validation
lines against tokens; bad runs and a missing matplotlib are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fgpt import FgptError
from fgpt.evaluation.curves import distinct_labels, figure, read_curves
from run import plot as plot_cli
from run._cli import main_guard


def write_run(directory: Path, rows: list[dict], tail: str = "") -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return directory


def rows(n: int, tokens_per_step: int, eval_every: int | None, start: float) -> list[dict]:
    out = []
    for s in range(1, n + 1):
        row = {"step": s, "loss": start / s, "lr": 1e-3, "tokens": s * tokens_per_step, "elapsed_s": 0.1 * s}
        if eval_every and s % eval_every == 0:
            row["val_loss"] = start / s + 0.1
        out.append(row)
    return out


def test_one_labelled_line_per_run_in_each_panel(tmp_path):
    a = write_run(tmp_path / "a", rows(10, 512, 5, 4.0))
    b = write_run(tmp_path / "b", rows(6, 1024, None, 5.0), tail='{"step": 7, "lo')  # killed mid-write
    fig = figure([read_curves(a), read_curves(b)])
    train_ax, val_ax = fig.axes
    assert [line.get_label() for line in train_ax.get_lines()] == ["a", "b"]
    assert [line.get_label() for line in val_ax.get_lines()] == ["a"]  # b never evaluated
    xs, ys = train_ax.get_lines()[1].get_data()
    assert list(xs) == [1024 * s for s in range(1, 7)] and list(ys) == [5.0 / s for s in range(1, 7)]
    xs, ys = val_ax.get_lines()[0].get_data()
    assert list(xs) == [512 * 5, 512 * 10] and list(ys) == [4.0 / 5 + 0.1, 4.0 / 10 + 0.1]
    assert train_ax.get_lines()[0].get_color() == val_ax.get_lines()[0].get_color()


def test_the_command_writes_the_figure(tmp_path, monkeypatch):
    a = write_run(tmp_path / "x" / "run", rows(4, 256, 2, 3.0))
    b = write_run(tmp_path / "y" / "run", rows(4, 256, 2, 3.5))
    assert distinct_labels([a, b]) == [str(a), str(b)]  # same names: whole paths tell them apart
    monkeypatch.setattr(sys, "argv", ["run.plot", str(a), str(b / "metrics.jsonl"), "--out", str(tmp_path / "f.png")])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(plot_cli.main)
    assert exit_info.value.code == 0
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("", "holds no metrics rows"),
    ('{"step": 1}\n{"step": 2}\n', "metrics.jsonl:1: a metrics row needs 'tokens' and 'loss'"),
    ('not json\n{"step": 1, "loss": 1, "tokens": 1}\n', "metrics.jsonl:1: not JSON")])
def test_bad_runs_are_one_line_errors(content, message, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    monkeypatch.setattr(sys, "argv", ["run.plot", str(run), "--out", str(tmp_path / "f.png")])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(plot_cli.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "f.png").exists()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", rows(2, 8, None, 1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(FgptError, match=r"pip install 'fgpt\[plot\]'"):
        figure([read_curves(run)])
