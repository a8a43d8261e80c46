"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fgpt.report.writer import PLOTS  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(r: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, arm in r["arms"].items():
        steps = [s for s, _ in arm["val_curve"]]
        means = [v for _, v in arm["val_curve"]]
        ax.plot(steps, means, marker=".", label=name, lw=2.2 if name in ("baseline", "rope") else 1.2)
    ax.set(xlabel="optimizer step", ylabel="validation loss (mean over seeds)", title="Validation loss")
    ax.legend(fontsize=8)
    _save(fig, path)


def position(r: dict, path: Path) -> None:
    pos = r["position"]
    L1, _ = pos["lengths"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in pos.items():
        if name == "lengths":
            continue
        curve = entry.get("2x", entry["1x"])
        ax.plot(range(len(curve)), curve, label=f"{name} ({'2' if '2x' in entry else '1'}× n_ctx)", lw=1)
    ax.axvline(L1, color="k", ls="--", lw=1, label="training length")
    ax.set(xlabel="position", ylabel="next-token loss (mean over seeds and sequences)", title="Loss by position")
    ax.legend(fontsize=7)
    _save(fig, path)


def gqa(r: dict, path: Path) -> None:
    eff = r["gqa_efficiency"]
    loss = {a["config"]["n_kv_head"]: a["final_loss"] for a in r["arms"].values()
            if a["config"]["pos_emb"] == "learned" and a["config"]["window"] is None}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    kb = [e["kv_bytes_per_token"] for e in eff]
    ax1.errorbar(kb, [loss[e["n_kv_head"]]["mean"] for e in eff],
                 yerr=[loss[e["n_kv_head"]]["std"] for e in eff], marker="o", capsize=3)
    for e, x in zip(eff, kb):
        ax1.annotate(f"{e['n_kv_head']} KV", (x, loss[e["n_kv_head"]]["mean"]), fontsize=8)
    ax1.set(xlabel="KV-cache bytes per token", ylabel="validation loss", title="Quality vs cache size")
    ax2.bar([str(e["n_kv_head"]) for e in eff], [e["decode_tokens_per_s"] for e in eff])
    ax2.set(xlabel="KV heads", ylabel="decode tokens/s", title="Decode speed at long context")
    _save(fig, path)


def scaling(r: dict, path: Path) -> None:
    rows = r["scaling"]["rows"]
    T = [row["seq_len"] for row in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    for k in rows[0]["kernels"]:
        ax1.plot(T, [row["kernels"][k]["ms"] for row in rows], marker="o", label=k)
        ax2.plot(T, [max(row["kernels"][k]["mib"], 1e-2) for row in rows], marker="o", label=k)
    ax1.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms", title="Attention time")
    ax2.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak extra MiB", title="Attention memory")
    ax1.legend(fontsize=8)
    _save(fig, path)


def recall(r: dict, path: Path) -> None:
    rc = r["recall"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = range(1, rc["max_distance"] + 1)
    for m in rc["models"]:
        label = "full attention" if m["window"] is None else f"W = {m['window']}"
        line, = ax.plot(d, m["accuracy"], marker=".", label=label)
        if m["window"] is not None:
            ax.axvline(m["predicted_edge"] + 0.5, color=line.get_color(), ls="--", lw=1)
    ax.axhline(rc["chance"], color="grey", ls=":", label="chance")
    ax.set(xlabel="distance to the answer", ylabel="accuracy",
           title="Recall by distance (dashed: predicted edge n_layer·(W−1))", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    _save(fig, path)


def write_plots(r: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, fn in (("curves", curves), ("position", position), ("gqa", gqa), ("scaling", scaling),
                    ("recall", recall)):
        fn(r, directory / PLOTS[key])
        paths.append(directory / PLOTS[key])
    return paths
