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


def _err(iv: dict) -> tuple[float, float]:
    if iv is None or iv.get("lo") is None:
        return 0.0, 0.0
    return iv["mean"] - iv["lo"], iv["hi"] - iv["mean"]


def _finish(fig, ax, path: Path, **labels) -> None:
    """Axis labels and title, the legend, then the file."""
    ax.set(**labels)
    ax.legend(fontsize=8)
    _save(fig, path)


def _intervals(ax, xs: list, ivs: list[dict], label: str | None = None) -> None:
    """Means with their 95% intervals as error bars."""
    ax.errorbar(xs, [iv["mean"] for iv in ivs], yerr=list(zip(*[_err(iv) for iv in ivs])), marker="o",
                capsize=3, label=label)


def curves(r: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in r["runs"].items():
        steps = [s for s, _ in runs[0]["val_curve"]]
        mean = [sum(run["val_curve"][i][1] for run in runs) / len(runs) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    total = r["pilot"]["steps"]
    ax.axvline(total * (1 - r["budget"]["cooldown"]), color="grey", ls=":", label="cooldown starts")
    _finish(fig, ax, path, xlabel="optimizer step", ylabel="validation loss (mean over seeds)", title="Validation loss")


def context(r: dict, path: Path) -> None:
    c = r["context"]
    cuts = c["cuts"][:-1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, e in c["arms"].items():
        _intervals(ax, cuts, [e[str(k)] for k in cuts], arm)
    ax.axhline(r["rules"]["context_use_nats"], color="grey", ls=":", label="threshold")
    _finish(fig, ax, path, xscale="log", xlabel="context k (tokens)",
            ylabel=f"loss(k) − loss({c['cuts'][-1]}) (nats)", title="What the context beyond k is worth")


def length(r: dict, path: Path) -> None:
    L = r["length"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in L["models"].items():
        curve = m["curve"]
        width = L["length"] / len(curve)
        ax.plot([width * (i + 0.5) for i in range(len(curve))], curve, label=name)
    for i in range(1, r["budget"]["length_mult"]):
        ax.axvline(i * L["n_ctx"], color="k", ls="--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    _finish(fig, ax, path, xlabel="position", ylabel="loss, one pass − sliding n_ctx (nats)",
            title="Penalty past the training length")


def copy(r: dict, path: Path) -> None:
    cp = r["copy"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entries in cp["models"].items():
        pts = [(D, e) for D, e in zip(cp["distances"], entries) if e is not None and e["mean"] is not None]
        if pts:
            _intervals(ax, [D for D, _ in pts], [e for _, e in pts], name)
    ax.axvline(cp["reach"], color="grey", ls=":", label="rope+swa reach L·(W−1)")
    ax.axvline(r["budget"]["n_ctx"], color="k", ls="--", lw=0.8, label="n_ctx")
    ax.axhline(0, color="grey", lw=0.8)
    _finish(fig, ax, path, xscale="log", xlabel="distance between the copies (tokens)",
            ylabel="second − first copy loss (nats)", title="Copying a random span")


def relay(r: dict, path: Path) -> None:
    rel = r["relay"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in rel["models"]:
        label = f"{m['n_layer']} layers, " + ("full" if m["window"] is None else f"W = {m['window']}")
        d = [i + 1 for i, a in enumerate(m["accuracy"]) if a is not None]
        line, = ax.plot(d, [a for a in m["accuracy"] if a is not None], lw=1.2, label=label)
        if m["window"] is not None:
            ax.axvline(m["predicted_edge"] + 0.5, color=line.get_color(), ls="--", lw=1)
    ax.axhline(rel["chance"], color="grey", ls=":", label="chance")
    _finish(fig, ax, path, xlabel="distance from the value", ylabel="accuracy at reads", ylim=(-0.02, 1.02),
            title="Relay (dashed: predicted edge L·(W−1))")


def gqa(r: dict, path: Path) -> None:
    d = r["derived"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts = sorted((cfg["n_kv_head"], arm) for arm, cfg in r["arms_config"].items()
                 if cfg["pos_emb"] == "learned" and not cfg["window"])
    ax1.plot([h for h, _ in pts], [d["final"][a]["mean"] for _, a in pts], marker="o")
    for h, a in pts:
        ax1.scatter([h] * len(d["final"][a]["per_seed"]), d["final"][a]["per_seed"], color="grey", s=10)
    ax1.set(xscale="log", xlabel="KV heads (∝ KV-cache bytes)", ylabel="validation loss", title="Quality vs KV heads")
    _intervals(ax2, d["uptrain"]["points"], d["uptrain"]["gap"])
    m = r["rules"]["margin_nats"]
    ax2.axhspan(-m, m, color="grey", alpha=0.2, label="± margin")
    ax2.set(xlabel="uptraining, % of pre-training steps", ylabel="converted − MHA control (nats)",
            title="MHA → GQA conversion")
    ax2.legend(fontsize=8)
    _save(fig, path)


def kernels(r: dict, path: Path) -> None:
    rows = r["efficiency"]["kernels"]["rows"]
    names = list(rows[0]["kernels"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        pts = [row for row in rows if n in row["kernels"]]
        T = [row["seq_len"] for row in pts]
        ax1.plot(T, [row["kernels"][n]["fwd_bwd_ms"] for row in pts], marker="o", label=f"{n} fwd+bwd")
        ax1.plot(T, [row["kernels"][n]["fwd_ms"] for row in pts], marker=".", ls=":", label=f"{n} fwd")
        ax2.plot(T, [max(row["kernels"][n]["fwd_bwd_mib"], 1e-2) for row in pts], marker="o", label=n)
    ax1.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms", title="Attention time")
    ax2.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak extra MiB (fwd+bwd)",
            title="Attention memory")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    _save(fig, path)


def decode(r: dict, path: Path) -> None:
    dec = r["efficiency"]["decode"]
    batches = sorted({row["batch"] for rows in dec.values() for row in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for name, rows in dec.items():
            pts = [row for row in rows if row["batch"] == B]
            T = [row["context"] for row in pts]
            line, = ax.plot(T, [row["tokens_per_s"]["median"] for row in pts], marker="o", label=name)
            ax.plot(T, [row["bound_tokens_per_s"] for row in pts], ls=":", color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="cached tokens", ylabel="tokens/s",
               title=f"Decode, batch {B} (dotted: bandwidth bound)")
        ax.legend(fontsize=8)
    _save(fig, path)


def write_plots(r: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    fns = {"curves": curves, "context": context, "length": length, "copy": copy, "relay": relay, "gqa": gqa,
           "kernels": kernels, "decode": decode}
    for key, fn in fns.items():
        fn(r, directory / PLOTS[key])
    return [directory / PLOTS[key] for key in fns]
