"""Loss curves of training runs, read from their metrics.jsonl and drawn side by side.

    runs = [read_curves("out/a"), read_curves("out/b")]
    save_figure(figure(runs), "runs.png")                 # needs matplotlib: pip install 'fgpt[plot]'
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fgpt.atomic import atomic_path
from fgpt.errors import FgptError, require_extra
from fgpt.training.run_dir import METRICS_FILE

log = logging.getLogger("fgpt")


@dataclass
class Curves:
    label: str
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, loss) per step
    val: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val_loss) per evaluation


def read_curves(run: str | Path, label: str | None = None) -> Curves:
    """A run directory (or its metrics.jsonl) -> its curves. A last line that a kill cut
    short is skipped, as training itself does on resume."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FgptError(f"cannot read {path}: {e.strerror or e}") from None
    curves = Curves(label or (path.parent.name if path.name == METRICS_FILE else path.stem))
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: skipped the last line, cut short", path)
                continue
            raise FgptError(f"{path}:{number}: not JSON") from None
        if not isinstance(row, dict) or "tokens" not in row or "loss" not in row:
            raise FgptError(f"{path}:{number}: a metrics row needs 'tokens' and 'loss'")
        curves.train.append((row["tokens"], row["loss"]))
        if "val_loss" in row:
            curves.val.append((row["tokens"], row["val_loss"]))
    if not curves.train:
        raise FgptError(f"{path} holds no metrics rows")
    return curves


def distinct_labels(runs: list[str | Path]) -> list[str]:
    """Each run's directory name, or its whole path where two names clash."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(runs, names)]


def figure(runs: list[Curves]):
    """Training loss (left) and validation loss (right) against tokens, one line per run,
    each run the same colour in both panels."""
    plt = _pyplot()
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        train_ax.plot(*zip(*run.train), color=colour, lw=1.2, label=run.label)
        if run.val:
            val_ax.plot(*zip(*run.val), color=colour, lw=1.6, marker=".", label=run.label)
    train_ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="training loss")
    val_ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="validation loss")
    if not any(run.val for run in runs):
        val_ax.text(0.5, 0.5, "no evaluations in these runs\n(--eval-interval 0)", ha="center",
                    va="center", transform=val_ax.transAxes, color="0.4")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, out: str | Path) -> Path:
    """Write the figure in the format its suffix names (png, svg, pdf), atomically."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    with atomic_path(out) as tmp:
        try:
            fig.savefig(tmp, format=fmt, dpi=120)
        except ValueError as e:  # matplotlib's "Format 'xyz' is not supported"
            raise FgptError(f"--out {out}: {e}") from None
    _pyplot().close(fig)
    return out


def _pyplot():
    matplotlib = require_extra("matplotlib", "plot", "plotting")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt
