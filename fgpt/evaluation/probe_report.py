"""The probe's outputs: DIR/results.json, DIR/probe.md and, with matplotlib (the `plot`
extra), figures beside them; without it, one warning line and no figures."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from fgpt.atomic import atomic_write_text, json_safe
from fgpt.report.writer import num, table

FIGURES = {"context": "probe_context.png", "window": "probe_window.png", "gqa": "probe_gqa.png",
           "length": "probe_length.png"}


def iv(mean, lo, hi, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return num(mean, digits) if lo is None else f"{num(mean, digits)} [{num(lo, digits)}, {num(hi, digits)}]"


def _row_iv(r: dict, key: str, digits: int = 3) -> str:
    return iv(r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi"), digits)


def _speed(r: dict) -> str:
    return iv(r["decode_tokens_per_s"], r["decode_tokens_per_s_lo"], r["decode_tokens_per_s_hi"], 1)


def _mib(n: int) -> str:
    return num(n / 2 ** 20, 2)


def _window_name(w) -> str:
    if isinstance(w, list):
        return f"{w[0]} / full, alternating"
    return "full" if w is None else str(w)


def markdown(r: dict, figures: dict[str, str]) -> str:
    c = r["config"]
    m = r["machine"]
    out = [f"# Probe of `{r['checkpoint']}`", "",
           f"{r['parameters']:,} parameters; n_layer {c['n_layer']}, n_head {c['n_head']}, n_embd {c['n_embd']}, "
           f"n_ctx {c['n_ctx']}, positions {c['pos_emb']}, kv heads {c['n_kv_head'] or c['n_head']}, window "
           f"{c['window']}. Evaluation text: {r['data'] or 'the built-in corpus'}, first {r['evaluation_tokens']:,} "
           f"tokens. Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
           f"load average {m.get('load_average', 'n/a')} at the start (timings are of one run, on a machine "
           "that may have been shared). Losses are mean nats per scored "
           "token; brackets are 95% intervals.", ""]
    if "context" in r:
        a = r["about"]["context"]
        out += ["## Context use", "", a["setting"] + ".", "",
                table(["k", "loss", f"loss(k) - loss({r['context'][-1]['k']})"],
                      [[str(x["k"]), _row_iv(x, "loss"), _row_iv(x, "minus_full")] for x in r["context"]]), ""]
        out += [f"![context use]({figures['context']})", ""] if "context" in figures else []
    if "window" in r:
        a, ref = r["about"]["window"], r["about"]["window"]["reference"]
        rows = [[f"as trained ({_window_name(ref['window'])})", _row_iv(ref, "loss"), "0", _speed(ref),
                 _mib(ref["kv_cache_bytes"])]]
        rows += [[_window_name(x["window"]), _row_iv(x, "loss"), _row_iv(x, "delta", 4), _speed(x),
                  _mib(x["kv_cache_bytes"])] for x in r["window"]]
        out += ["## A window at inference", "", a["setting"] + ".", "",
                table(["window", "loss", "delta vs as trained", "decode tokens/s", "KV cache MiB"], rows), ""]
        out += [f"![window]({figures['window']})", ""] if "window" in figures else []
    if "gqa" in r:
        a = r["about"]["gqa"]
        u = a["unconverted"]
        rows = [[f"{u['n_kv_head']} (unconverted)", "0", _row_iv(u, "loss"), _row_iv(u, "loss"), "0", _speed(u),
                 _mib(u["kv_cache_bytes"])]]
        rows += [[str(x["n_kv_head"]), str(x["steps"]), _row_iv(x, "loss"), _row_iv(x, "control_loss"),
                  _row_iv(x, "delta", 4), _speed(x), _mib(x["kv_cache_bytes"])] for x in r["gqa"]]
        out += ["## GQA by conversion", "", a["setting"] + ".", "",
                table(["kv heads", "steps", "loss", "control loss", "delta vs control", "decode tokens/s",
                       "KV cache MiB"], rows), ""]
        out += [f"![gqa]({figures['gqa']})", ""] if "gqa" in figures else []
    if "length" in r:
        L = r["length"]
        out += ["## Length", ""]
        if not L["applies"]:
            out += [f"Not measured: {L['reason']}.", ""]
        else:
            rows = [[name, f"[{b['positions'][0]}, {b['positions'][1]})", _row_iv(b, "long_loss"),
                     _row_iv(b, "sliding_loss"), _row_iv(b, "penalty", 4)]
                    for name, mm in L["models"].items() for b in mm["bins"]]
            out += [L["setting"] + ".", "",
                    table(["model", "positions", "one-pass loss", "sliding loss", "penalty"], rows), ""]
            out += [f"![length]({figures['length']})", ""] if "length" in figures else []
    if "samples" in r:
        s = r["samples"]
        sp = s["sampling"]
        out += ["## Samples", "", f"{s['new_tokens']} new tokens after each prompt; greedy, and sampled at "
                f"temperature {sp['temperature']}, top-k {sp['top_k']}, seed {sp['seed']}.", ""]
        for i, prompt in enumerate(s["prompts"]):
            out += [f"**Prompt {i + 1}:** `{_cell(prompt)}`", "",
                    table(["setting", "greedy", "sampled"],
                          [[name, _cell(v["greedy"][i]), _cell(v["sampled"][i])] for name, v in s["settings"].items()]),
                    ""]
    spent = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["elapsed_s"].items())
    guess = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["estimate_s"].items())
    out += ["## Cost", "", f"Measured: {spent}. Estimated before starting: {guess}.", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    """One table cell: newlines shown as ↵, long runs of spaces as ␣×N, so that code and
    whitespace-only continuations stay visible."""
    text = text.replace("|", "\\|").replace("`", "'").replace("\n", "↵").replace("\t", "⇥")
    return re.sub(r" {4,}", lambda m: f"␣×{len(m.group())}", text).strip() or "(nothing)"


def write_figures(r: dict, out: Path) -> dict[str, str]:
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("warning: matplotlib is not installed (pip install 'fgpt[plot]'): no figures", file=sys.stderr)
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(rows, key):
        return [[x[key] - x[f"{key}_lo"] if x[f"{key}_lo"] is not None else 0 for x in rows],
                [x[f"{key}_hi"] - x[key] if x[f"{key}_hi"] is not None else 0 for x in rows]]

    done = {}
    if "context" in r:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar([x["k"] for x in r["context"]], [x["loss"] for x in r["context"]], yerr=err(r["context"], "loss"),
                    marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context k (tokens)", ylabel="loss (nats)", title="Loss given the last k tokens")
        done["context"] = _save(fig, out / FIGURES["context"], plt)
    if "window" in r:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for pattern in ("all layers", "alternating local/global"):
            rows = [x for x in r["window"] if x["pattern"] == pattern]
            if rows:
                ws = [x["window"][0] if isinstance(x["window"], list) else x["window"] for x in rows]
                a1.errorbar(ws, [x["delta"] for x in rows], yerr=err(rows, "delta"), marker="o", capsize=3,
                            label=pattern)
                a2.plot([x["kv_cache_bytes"] / 2 ** 20 for x in rows], [x["decode_tokens_per_s"] for x in rows],
                        marker="o", label=pattern)
        a1.axhline(0, color="grey", ls=":")
        a1.set_xscale("log", base=2)
        a1.set(xlabel="window W (layers windowed: all, or every other)", ylabel="loss - loss as trained (nats)", title="Quality")
        a2.set(xlabel="KV cache (MiB)", ylabel="decode tokens/s", title="Memory and speed")
        a1.legend(fontsize=8)
        done["window"] = _save(fig, out / FIGURES["window"], plt)
    if "gqa" in r and r["gqa"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for steps in sorted({x["steps"] for x in r["gqa"]}):
            rows = [x for x in r["gqa"] if x["steps"] == steps]
            ax.errorbar([x["n_kv_head"] for x in rows], [x["delta"] for x in rows], yerr=err(rows, "delta"),
                        marker="o", capsize=3, label=f"after {steps} uptraining steps")
        ax.axhline(0, color="grey", ls=":")
        ax.set_xticks(sorted({x["n_kv_head"] for x in r["gqa"]}))
        ax.set(xlabel="kv heads", ylabel="loss - control's loss (nats)", title="GQA by mean-pooling")
        ax.legend(fontsize=8)
        done["gqa"] = _save(fig, out / FIGURES["gqa"], plt)
    if r.get("length", {}).get("applies"):
        L = r["length"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in L["models"].items():
            ax.plot([16 * i + 8 for i in range(len(m["curve"]))], m["curve"], label=name)
        ax.axvline(L["n_ctx"], color="grey", ls=":", label="n_ctx")
        ax.set(xlabel="position", ylabel="one pass - sliding (nats)", title="Past the training context")
        ax.legend(fontsize=8)
        done["length"] = _save(fig, out / FIGURES["length"], plt)
    return done


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_outputs(r: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(r, out)
    atomic_write_text(out / "results.json", json.dumps(json_safe(r), indent=1) + "\n")
    atomic_write_text(out / "probe.md", markdown(r, figures))
    return out
