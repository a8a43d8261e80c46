"""From the study's measurements to its claims table: each claim the user asked about, the
source and its setting, the effect we measured with its interval and per-seed values, and a
verdict from the rule in fgpt.report.stats (fixed, with its thresholds in budget.RULES,
before the numbers existed).

`derive(results, budget)` adds `results["derived"]` (paired differences, slopes, ratios) and
`results["claims"]` (the table's rows); the writer only formats them.
"""

from __future__ import annotations

import statistics

from fgpt.report.budget import RULES, Budget
from fgpt.report.stats import (CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, SUPPORTED, loglog_slope,
                               paired_interval, t975, verdict)

SOURCES = {
    "rope": "Su et al. 2021, RoFormer (arXiv:2104.09864)",
    "alibi": "Press et al. 2022, ALiBi (arXiv:2108.12409)",
    "streaming": "Xiao et al. 2023, StreamingLLM (arXiv:2309.17453)",
    "gqa": "Ainslie et al. 2023, GQA (arXiv:2305.13245)",
    "longformer": "Beltagy et al. 2020, Longformer (arXiv:2004.05150)",
    "mistral": "Jiang et al. 2023, Mistral 7B (arXiv:2310.06825)",
}


def _paired(runs: dict, arm: str, ref: str, value) -> dict:
    mine = {r["seed"]: value(r) for r in runs[arm]}
    theirs = {r["seed"]: value(r) for r in runs[ref]}
    return paired_interval([mine[s] - theirs[s] for s in sorted(mine) if s in theirs])


def _curve_at(run: dict, step: int) -> float:
    return next(v for s, v in run["val_curve"] if s == step)


def derive(r: dict, budget: Budget) -> None:
    runs, steps = r["runs"], r["pilot"]["steps"]
    half = steps // 2
    main_gqa, swa = f"gqa-{budget.main_kv_head}", f"rope+swa-{budget.window}"
    d = {"half_step": half}
    d["final"] = {arm: {"mean": statistics.fmean(x["final_loss"] for x in runs[arm]),
                        "per_seed": [x["final_loss"] for x in runs[arm]]} for arm in runs}
    d["vs"] = {"rope": ("baseline", _paired(runs, "rope", "baseline", lambda x: x["final_loss"])),
               main_gqa: ("baseline", _paired(runs, main_gqa, "baseline", lambda x: x["final_loss"])),
               swa: ("rope", _paired(runs, swa, "rope", lambda x: x["final_loss"]))}
    d["vs"] = {k: {"ref": ref, **iv} for k, (ref, iv) in d["vs"].items()}
    d["half"] = {arm: {"ref": ref, **_paired(runs, arm, ref, lambda x: _curve_at(x, half))}
                 for arm, ref in (("rope", "baseline"), (main_gqa, "baseline"), (swa, "rope"))}
    d["speed"] = {arm: _paired(runs, arm, "baseline", lambda x: x["tokens_per_s"]) for arm in runs if arm != "baseline"}
    base_speed = {x["seed"]: x["tokens_per_s"] for x in runs["baseline"]}
    d["speed_ratio"] = {arm: statistics.fmean(x["tokens_per_s"] / base_speed[x["seed"]] for x in runs[arm])
                        for arm in runs}

    up = r["uptrain"]
    gaps = [[c - m for c, m in zip(conv["curve"], ctrl["curve"])] for conv, ctrl in zip(up["converted"], up["control"])]
    d["uptrain"] = {"gap": [paired_interval([g[k] for g in gaps]) for k in [0] + up["ladder_steps"]],
                    "points": [0.0] + up["percents"]}
    scratch = {x["seed"]: x["final_loss"] for x in runs[main_gqa]}
    d["uptrain"]["vs_scratch"] = paired_interval([c["final_loss"] - scratch[c["seed"]] for c in up["converted"]])
    d["uptrain"]["final"] = {kind: statistics.fmean(c["final_loss"] for c in up[kind]) for kind in ("converted", "control")}

    k = r["efficiency"]["kernels"]["rows"]
    long_rows = [row for row in k if row["seq_len"] >= RULES["slope_from_len"]] or k
    d["slopes"] = {name: {key: loglog_slope([row["seq_len"] for row in long_rows if name in row["kernels"]],
                                            [row["kernels"][name][key] for row in long_rows if name in row["kernels"]])
                          for key in ("fwd_ms", "fwd_bwd_ms", "fwd_mib", "fwd_bwd_mib")}
                   for name in k[0]["kernels"]}
    d["slope_from"] = long_rows[0]["seq_len"]
    steps_eff = r["efficiency"]["steps"]
    last = {name: rows[-1] for name, rows in steps_eff.items()}
    full = last["rope"]
    d["step_long"] = {name: {"seq_len": row["seq_len"], "time_ratio": full["step_s"]["median"] / row["step_s"]["median"],
                             "time_ratio_lo": full["step_s"]["min"] / row["step_s"]["max"],
                             "time_ratio_hi": full["step_s"]["max"] / row["step_s"]["min"],
                             "memory_ratio": full["mib"] / row["mib"] if row["mib"] else None}
                      for name, row in last.items()}
    dec = r["efficiency"]["decode"]
    mha = {(row["context"], row["batch"]): row for row in dec["MHA"]}
    d["decode_vs_mha"] = {name: [{"context": row["context"], "batch": row["batch"],
                                  "ratio": row["tokens_per_s"]["median"] / mha[row["context"], row["batch"]]["tokens_per_s"]["median"],
                                  "lo": row["tokens_per_s"]["min"] / mha[row["context"], row["batch"]]["tokens_per_s"]["max"],
                                  "hi": row["tokens_per_s"]["max"] / mha[row["context"], row["batch"]]["tokens_per_s"]["min"],
                                  "of_bound": row["tokens_per_s"]["median"] / row["bound_tokens_per_s"]}
                                 for row in rows] for name, rows in dec.items()}
    kv = r["efficiency"]["kv_cache"]
    ref = kv["GPT-2 124M (MHA)"]
    d["kv_vs_mha"] = {name: [e["bytes"] / m["bytes"] for e, m in zip(rows, ref)] for name, rows in kv.items()}
    d["kv_exact"] = all(e["bytes"] == e["formula"] for rows in kv.values() for e in rows)
    d["t_quantile"] = t975(len(budget.seeds) - 1) if len(budget.seeds) > 1 else None
    spreads = [row["tokens_per_s"]["max"] / row["tokens_per_s"]["min"] for rows in dec.values() for row in rows]
    d["decode_widest_spread"] = max(spreads)
    for mdl in r["relay"]["models"]:
        mdl["status"] = relay_status(mdl, r["relay"]["chance"])
    r["derived"] = d
    r["claims"] = claims(r, budget)


def _iv(interval: dict | None) -> dict:
    return interval or {"mean": None, "lo": None, "hi": None, "values": []}


def claims(r: dict, budget: Budget) -> list[dict]:
    d, m = r["derived"], RULES["margin_nats"]
    main_gqa, swa = f"gqa-{budget.main_kv_head}", f"rope+swa-{budget.window}"
    ctx = r["context"]["arms"]
    rows = []

    def add(variant, aspect, claim, source, setting, effect, interval, kind, *, why=None, unit="nats", values=None):
        v = NOT_TESTABLE if why else verdict(interval, kind, RULES["ratio_margin"] if unit == "ratio" else m)
        rows.append({"variant": variant, "aspect": aspect, "claim": claim, "source": source, "setting": setting,
                     "effect": effect, "interval": _iv(interval), "kind": kind, "verdict": v, "why": why,
                     "unit": unit, "values": values if values is not None else _iv(interval).get("values", [])})

    def uses_context(arm: str, k: int) -> tuple[bool, dict]:
        g = ctx[arm][str(k)]
        return (g["lo"] is not None and g["lo"] > 0 and g["mean"] > RULES["context_use_nats"]), g

    # --- RoPE ------------------------------------------------------------------------------
    add("RoPE", "quality", "rotary positions reach a lower validation loss than learned absolute positions",
        SOURCES["rope"], "BERT-size encoders and GPT-style LMs, pre-training loss",
        "final loss, rope − baseline", d["vs"]["rope"], "negative")
    add("RoPE", "convergence speed", "rotary positions converge faster (lower loss at the same step)",
        SOURCES["rope"], "pre-training curves (RoFormer Fig. 3)",
        f"loss at step {d['half_step']} (before the cooldown), rope − baseline", d["half"]["rope"], "negative")
    L = r["length"]
    bins = L["models"]["rope"]["bins"]
    add("RoPE", "long-range: past the training length",
        "rotary positions degrade past the training length", SOURCES["alibi"],
        "Fig. 1: 247M-1.3B LMs trained at L=512/1024, perplexity rises past L",
        f"per-token loss penalty over positions {L['bin_names'][0]} against a sliding-n_ctx evaluation",
        bins[0], "positive")
    inf = L["models"][f"rope, window {L['n_ctx']} at inference only"]["bins"]
    add("RoPE", "long-range: a window at inference",
        "applying a window of n_ctx at inference keeps the loss flat past the training length "
        f"(StreamingLLM predicts the opposite once the first tokens leave the window)",
        f"{SOURCES['mistral']}; {SOURCES['streaming']}", "StreamingLLM Fig. 3: Llama-2 window attention",
        "worst bin's penalty against the sliding evaluation", _worst_bin(inf), "at_most")
    reach = budget.n_layer * (budget.window - 1)
    add("RoPE + SWA", "long-range: past the training length",
        "a model trained with a window stays flat past the training length", SOURCES["mistral"], "W=4096, 32 layers",
        "worst bin's penalty", _worst_bin(L["models"][swa]["bins"]), "at_most",
        why=(f"holds by construction: its reach {budget.n_layer}·(W−1) = {reach} < n_ctx − stride = "
             f"{L['n_ctx'] - L['stride']}, so both passes compute the same thing (the measurement checks the "
             "implementation, not a property of learning)") if reach < L["n_ctx"] - L["stride"] else None)

    # --- GQA -------------------------------------------------------------------------------
    ok, g = uses_context("baseline", budget.context_cuts[0])
    add("GQA", "quality", f"{budget.main_kv_head} KV heads cost little quality against {budget.n_head} (MHA)",
        SOURCES["gqa"], "T5-XXL, GQA-8 uptrained from MHA, close to MHA on summarisation / QA",
        f"final loss, {main_gqa} − baseline (margin {m})", d["vs"][main_gqa], "at_most",
        why=None if ok else (f"the baseline gains only {g['mean']:.3f} nats from context beyond "
                             f"{budget.context_cuts[0]} tokens: attention hardly matters to it"))
    gap5 = _ladder_point(d, 5.0)
    add("GQA", "conversion", "mean-pooled K/V heads, uptrained with ~5% of the pre-training steps, reach the "
        "quality of the MHA model trained the same extra steps", SOURCES["gqa"], "T5-XXL, 5% uptraining",
        f"loss gap converted − MHA control after {gap5[0]}% uptraining", gap5[1], "at_most")
    dec = d["decode_vs_mha"]["GQA-4"]
    longest = max(dec, key=lambda e: (e["context"], e["batch"]))
    speed = {"mean": longest["ratio"] - 1, "lo": longest["lo"] - 1, "hi": longest["hi"] - 1, "values": [],
             "range": True}
    add("GQA", "decode speed", "fewer KV heads decode faster at long context", SOURCES["gqa"],
        "TPUv4 inference time per sample", f"GQA-4 / MHA tokens/s − 1 at {longest['context']} cached tokens, "
        f"batch {longest['batch']} (range: slowest vs fastest of the runs)", speed, "positive", unit="ratio")

    kv = d["kv_vs_mha"]["GQA-4"][-1]
    rows.append({"variant": "GQA", "aspect": "KV-cache size", "claim": "the KV cache shrinks by n_kv_head / n_head",
                 "source": SOURCES["gqa"], "setting": "arithmetic of the cache's shape", "unit": "ratio",
                 "effect": f"GQA-4 / MHA bytes, GPT-2 124M shapes, {r['efficiency']['kv_cache']['GQA-4'][-1]['context']} "
                           "tokens, measured on the allocation (expected 4/12)",
                 "interval": {"mean": kv, "lo": None, "hi": None}, "kind": "exact", "values": [],
                 "verdict": SUPPORTED if d["kv_exact"] and abs(kv - 4 / 12) < 1e-9 else CONTRADICTED,
                 "why": None})

    # --- SWA -------------------------------------------------------------------------------
    ok, g = uses_context("rope", budget.window)
    add("SWA", "quality", f"a window of {budget.window} costs little quality against full attention "
        f"(n_ctx {budget.n_ctx})", f"{SOURCES['longformer']}; {SOURCES['mistral']}",
        "W=4096 against a 8k-32k context", f"final loss, {swa} − rope (margin {m})", d["vs"][swa], "at_most",
        why=None if ok else (f"the full-attention rope model gains only {g['mean']:.3f} nats from context "
                             f"beyond {budget.window} tokens, so the setting of the claim (a model that needs "
                             "context past its window) is not reached; the measured difference is shown, "
                             "not judged"))
    slopes = d["slopes"]
    band, flash = slopes["sliding window"]["fwd_bwd_ms"], slopes["flash causal"]["fwd_bwd_ms"]
    cost_why = None
    if flash is None or flash < RULES["quadratic_slope_min"]:
        cost_why = "the causal reference does not grow quadratically at these lengths: the fit cannot tell"
    slope_iv = {"mean": band, "lo": None, "hi": None, "values": []}
    rows.append({"variant": "SWA", "aspect": "compute and memory",
                 "claim": "windowed attention costs O(n·W), not O(n²)", "source": SOURCES["longformer"],
                 "setting": "CUDA kernels, n up to 32k", "unit": "slope",
                 "effect": f"log-log slope of forward+backward time against T (T ≥ {d['slope_from']}); "
                           f"flash causal {flash:.2f}" if flash is not None else "log-log slope",
                 "interval": slope_iv, "kind": "slope", "values": [],
                 "verdict": NOT_TESTABLE if cost_why else (SUPPORTED if band <= RULES["linear_slope_max"]
                                                           else CONTRADICTED if band >= RULES["quadratic_slope_min"]
                                                           else INCONCLUSIVE),
                 "why": cost_why})
    st = d["step_long"][swa]
    add("SWA", "training speed at long T", f"training with a window is faster than full attention at "
        f"T = {st['seq_len']}", SOURCES["longformer"], "character LMs to 23k tokens",
        f"full / {swa} step time − 1, batch 1 (range: slowest vs fastest of {budget.step_repeats} steps)",
        {"mean": st["time_ratio"] - 1, "lo": st["time_ratio_lo"] - 1, "hi": st["time_ratio_hi"] - 1, "values": [],
         "range": True},
        "positive", unit="ratio")
    rows.append(_relay_claim(r, budget))
    rows.append(_copy_claim(r, budget))
    rows.append({"variant": "all", "aspect": "generation quality", "claim": "the variants generate text as well as "
                 "the baseline", "source": "-", "setting": "-", "effect": "greedy tokens equal to the text's own, "
                 "repeated 4-grams (descriptive)", "interval": _iv(None), "kind": "-", "values": [], "unit": "-",
                 "verdict": NOT_TESTABLE, "why": "no judge of text quality here (no human rating, no larger "
                 "model); samples are shown side by side with two descriptive numbers"})
    return rows


def _worst_bin(bins: list[dict]) -> dict:
    """The bin with the highest upper end; a bin without an interval counts as the worst."""
    return max(bins, key=lambda b: b["hi"] if b["hi"] is not None else float("inf"))


def _ladder_point(d: dict, percent: float) -> tuple[float, dict]:
    """The first ladder point at or past `percent` (else the last)."""
    points = d["uptrain"]["points"]
    i = next((j for j, p in enumerate(points) if p >= percent), len(points) - 1)
    return points[i], d["uptrain"]["gap"][i]


def relay_status(model: dict, chance: float) -> str:
    """One relay model's outcome, from its measured edge (fgpt.report.relay.measured_edge)."""
    edge, measured, W = model["predicted_edge"], model["measured_edge"], model["window"]
    if W is None:
        return "learned" if measured >= edge - RULES["relay_edge_slack"] else "not learned"
    if model["beyond_edge"] is not None and model["beyond_edge"] > chance + RULES["relay_beyond_above_chance"]:
        return "passes the edge (impossible by the masks)"
    if measured >= edge - RULES["relay_edge_slack"]:
        return "reaches the edge"
    if measured == 0:
        return "not learned"
    return "one window only" if measured <= W - 1 else "part of the way"


def _relay_claim(r: dict, budget: Budget) -> dict:
    rel = r["relay"]
    windowed = [mdl["status"] for mdl in rel["models"] if mdl["window"] is not None]
    full_ok = all(mdl["status"] == "learned" for mdl in rel["models"] if mdl["window"] is None)
    why = None
    if any(s.startswith("passes") for s in windowed):
        v = CONTRADICTED
    elif not full_ok or not windowed:
        v, why = NOT_TESTABLE, "the full-attention control did not learn the task"
    elif all(s == "reaches the edge" for s in windowed):
        v = SUPPORTED
    elif all(s == "one window only" for s in windowed):
        v, why = CONTRADICTED, "full attention learns the task, but no windowed model relays past one window"
    else:
        v = INCONCLUSIVE
    reached = windowed.count("reaches the edge")
    return {"variant": "SWA", "aspect": "long-range: L·(W−1) reach (synthetic)",
            "claim": "L stacked layers of window W carry information L·(W−1) positions",
            "source": f"{SOURCES['longformer']}; {SOURCES['mistral']}", "setting": "receptive-field argument",
            "effect": f"relay probe: {reached} of {len(windowed)} windowed models reach their predicted edge",
            "interval": _iv(None), "kind": "relay", "values": [], "unit": "-", "verdict": v, "why": why}


def _copy_claim(r: dict, budget: Budget) -> dict:
    cp = r["copy"]
    reach, W = cp["reach"], budget.window
    inside = [i for i, D in enumerate(cp["distances"]) if W < D and D - 1 <= reach]
    swa, full = cp["models"][f"rope+swa-{W}"], cp["models"]["rope"]
    base = {"variant": "SWA", "aspect": "long-range: L·(W−1) reach (language model)",
            "claim": "a windowed LM uses text beyond one window but within L·(W−1)",
            "source": SOURCES["mistral"], "setting": "receptive-field argument", "kind": "negative", "unit": "nats"}
    if not inside:
        return base | {"effect": "copy probe", "interval": _iv(None), "values": [], "verdict": NOT_TESTABLE,
                       "why": "no probed distance lies between W and the reach"}
    i = inside[-1]
    D = cp["distances"][i]
    effect = f"copy probe at distance {D}: loss on the second copy − the first, {f'rope+swa-{W}'}"
    if full[i] is None or full[i]["hi"] is None or full[i]["hi"] >= 0:
        return base | {"effect": effect, "interval": _iv(swa[i]), "values": [], "verdict": NOT_TESTABLE,
                       "why": f"the full-attention rope model does not copy at distance {D} either"}
    return base | {"effect": effect, "interval": swa[i], "values": [],
                   "verdict": verdict(swa[i], "negative", RULES["margin_nats"]), "why": None}
