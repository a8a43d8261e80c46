"""From the study's measurements to its claims table: each claim the user asked about, the
source and its setting, the effect we measured with its interval and per-seed values, and a
verdict from the rule in fgpt.report.stats (fixed, with its thresholds in budget.RULES,
before the numbers existed).

`derive(results, budget)` adds `results["derived"]` (paired differences, slopes, ratios) and
`results["claims"]` (the table's rows: one `Row` per claim, stored as a dict); the writer only
formats them.
"""

from __future__ import annotations

import dataclasses
import statistics
from operator import itemgetter
from typing import NamedTuple

from fgpt.report.budget import RULES, Budget
from fgpt.report.stats import (CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, SUPPORTED, loglog_slope,
                               paired_interval, t975)
from fgpt.report.stats import verdict as interval_verdict

SOURCES = {
    "rope": "Su et al. 2021, RoFormer (arXiv:2104.09864)",
    "alibi": "Press et al. 2022, ALiBi (arXiv:2108.12409)",
    "streaming": "Xiao et al. 2023, StreamingLLM (arXiv:2309.17453)",
    "gqa": "Ainslie et al. 2023, GQA (arXiv:2305.13245)",
    "longformer": "Beltagy et al. 2020, Longformer (arXiv:2004.05150)",
    "mistral": "Jiang et al. 2023, Mistral 7B (arXiv:2310.06825)",
}


def _gqa_arm(budget: Budget) -> str:
    return f"gqa-{budget.main_kv_head}"


def _swa_arm(budget: Budget) -> str:
    return f"rope+swa-{budget.window}"


# --- derived numbers ---------------------------------------------------------------------------

def derive(results: dict, budget: Budget) -> None:
    """Add results["derived"], each relay model's "status" and, from them, results["claims"]."""
    runs, efficiency = results["runs"], results["efficiency"]
    half_step = results["pilot"]["steps"] // 2
    decode = efficiency["decode"]
    results["derived"] = {
        "half_step": half_step,
        **_arm_comparisons(runs, half_step, budget),
        "uptrain": _uptrain_gaps(results["uptrain"], runs[_gqa_arm(budget)]),
        **_kernel_slopes(efficiency["kernels"]["rows"]),
        "step_long": _long_step_ratios(efficiency["steps"]),
        "decode_vs_mha": _decode_vs_mha(decode),
        **_kv_cache_ratios(efficiency["kv_cache"]),
        "t_quantile": t975(len(budget.seeds) - 1) if len(budget.seeds) > 1 else None,
        "decode_widest_spread": max(row["tokens_per_s"]["max"] / row["tokens_per_s"]["min"]
                                    for rows in decode.values() for row in rows),
    }
    for model in results["relay"]["models"]:
        model["status"] = relay_status(model, results["relay"]["chance"])
    results["claims"] = claims(results, budget)


def _by_seed(arm_runs: list[dict], value) -> dict:
    return {run["seed"]: value(run) for run in arm_runs}


def _paired(runs: dict, arm: str, ref: str, value) -> dict:
    """The interval of arm − ref over the seeds both ran."""
    mine, theirs = _by_seed(runs[arm], value), _by_seed(runs[ref], value)
    return paired_interval([mine[seed] - theirs[seed] for seed in sorted(mine) if seed in theirs])


def _arm_comparisons(runs: dict, half_step: int, budget: Budget) -> dict:
    """Each arm's final loss; the claimed arms against their references at the end and half way
    (before the cooldown, at one learning rate); every arm's speed against the baseline."""
    claimed = (("rope", "baseline"), (_gqa_arm(budget), "baseline"), (_swa_arm(budget), "rope"))
    final_loss, speed = itemgetter("final_loss"), itemgetter("tokens_per_s")
    final_losses = {arm: [run["final_loss"] for run in arm_runs] for arm, arm_runs in runs.items()}
    base_speed = _by_seed(runs["baseline"], speed)

    def loss_half_way(run: dict) -> float:
        return next(loss for step, loss in run["val_curve"] if step == half_step)
    return {
        "final": {arm: {"mean": statistics.fmean(losses), "per_seed": losses} for arm, losses in final_losses.items()},
        "vs": {arm: {"ref": ref, **_paired(runs, arm, ref, final_loss)} for arm, ref in claimed},
        "half": {arm: {"ref": ref, **_paired(runs, arm, ref, loss_half_way)} for arm, ref in claimed},
        "speed": {arm: _paired(runs, arm, "baseline", speed) for arm in runs if arm != "baseline"},
        "speed_ratio": {arm: statistics.fmean(run["tokens_per_s"] / base_speed[run["seed"]] for run in arm_runs)
                        for arm, arm_runs in runs.items()},
    }


def _uptrain_gaps(uptrain: dict, scratch_runs: list[dict]) -> dict:
    """Converted − control loss, pair by pair, at each ladder point (0: before uptraining), and the
    converted models against the same shape trained from scratch."""
    gap_curves = [[converted - control for converted, control in zip(conv["curve"], ctrl["curve"])]
                  for conv, ctrl in zip(uptrain["converted"], uptrain["control"])]
    scratch = _by_seed(scratch_runs, itemgetter("final_loss"))
    converted_vs_scratch = [conv["final_loss"] - scratch[conv["seed"]] for conv in uptrain["converted"]]
    return {"gap": [paired_interval([curve[k] for curve in gap_curves]) for k in [0] + uptrain["ladder_steps"]],
            "points": [0.0] + uptrain["percents"],
            "vs_scratch": paired_interval(converted_vs_scratch),
            "final": {kind: statistics.fmean(run["final_loss"] for run in uptrain[kind])
                      for kind in ("converted", "control")}}


def _kernel_slopes(rows: list[dict]) -> dict:
    """Each kernel's log-log slopes of time and memory against T, from RULES["slope_from_len"] up
    (shorter lengths measure overhead), or over all lengths where none is that long."""
    long_rows = [row for row in rows if row["seq_len"] >= RULES["slope_from_len"]] or rows

    def slope(kernel: str, measure: str) -> float | None:
        measured = [row for row in long_rows if kernel in row["kernels"]]
        return loglog_slope([row["seq_len"] for row in measured], [row["kernels"][kernel][measure] for row in measured])
    measures = ("fwd_ms", "fwd_bwd_ms", "fwd_mib", "fwd_bwd_mib")
    return {"slopes": {kernel: {measure: slope(kernel, measure) for measure in measures}
                       for kernel in rows[0]["kernels"]},
            "slope_from": long_rows[0]["seq_len"]}


def _ratio(top: dict, bottom: dict) -> tuple[float, float, float]:
    """top / bottom of two timings ({median, min, max}): the medians', and the range of the runs."""
    return top["median"] / bottom["median"], top["min"] / bottom["max"], top["max"] / bottom["min"]


def _long_step_ratios(steps: dict) -> dict:
    """Full attention (rope) over each arm at the longest length: step time and memory."""
    longest = {name: rows[-1] for name, rows in steps.items()}
    full = longest["rope"]
    ratios = {}
    for name, row in longest.items():
        time, time_lo, time_hi = _ratio(full["step_s"], row["step_s"])
        ratios[name] = {"seq_len": row["seq_len"], "time_ratio": time, "time_ratio_lo": time_lo,
                        "time_ratio_hi": time_hi, "memory_ratio": full["mib"] / row["mib"] if row["mib"] else None}
    return ratios


def _decode_vs_mha(decode: dict) -> dict:
    """Each cache's decode tokens/s over MHA's at the same context and batch, and over its own bound."""
    mha = {(row["context"], row["batch"]): row["tokens_per_s"] for row in decode["MHA"]}

    def compared(row: dict) -> dict:
        ratio, lo, hi = _ratio(row["tokens_per_s"], mha[row["context"], row["batch"]])
        return {"context": row["context"], "batch": row["batch"], "ratio": ratio, "lo": lo, "hi": hi,
                "of_bound": row["tokens_per_s"]["median"] / row["bound_tokens_per_s"]}
    return {name: [compared(row) for row in rows] for name, rows in decode.items()}


def _kv_cache_ratios(kv_cache: dict) -> dict:
    """Each cache's bytes over GPT-2 MHA's, context by context; whether every allocation met its formula."""
    mha = kv_cache["GPT-2 124M (MHA)"]
    return {"kv_vs_mha": {name: [entry["bytes"] / ref["bytes"] for entry, ref in zip(rows, mha)]
                          for name, rows in kv_cache.items()},
            "kv_exact": all(entry["bytes"] == entry["formula"] for rows in kv_cache.values() for entry in rows)}


def relay_status(model: dict, chance: float) -> str:
    """One relay model's outcome, from its measured edge (fgpt.report.relay.measured_edge)."""
    edge, measured, window = model["predicted_edge"], model["measured_edge"], model["window"]
    if window is None:
        return "learned" if measured >= edge - RULES["relay_edge_slack"] else "not learned"
    if model["beyond_edge"] is not None and model["beyond_edge"] > chance + RULES["relay_beyond_above_chance"]:
        return "passes the edge (impossible by the masks)"
    if measured >= edge - RULES["relay_edge_slack"]:
        return "reaches the edge"
    if measured == 0:
        return "not learned"
    return "one window only" if measured <= window - 1 else "part of the way"


# --- the claims table --------------------------------------------------------------------------

class Claim(NamedTuple):
    """A claim as its source makes it."""
    variant: str  # the attention variant, or "all"
    aspect: str  # quality, decode speed, ...
    claim: str
    source: str  # the paper(s)
    setting: str  # where the paper saw it


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the claims table; results.json stores it as a dict, in this field order."""
    variant: str
    aspect: str
    claim: str
    source: str
    setting: str
    effect: str  # what we measured, in words
    interval: dict  # mean, lo, hi: a confidence interval, or with "range" the range of the runs
    kind: str  # what the claim says of the effect, for stats.verdict: negative, positive, at_most, ...
    verdict: str
    why: str | None  # why the verdict is not the interval's own
    unit: str  # nats, ratio, slope or "-"
    values: list  # the per-seed values, where the effect has seeds


def row(claim: Claim, effect: str, interval: dict | None = None, kind: str = "-", *, unit: str = "nats",
        verdict: str | None = None, why: str | None = None) -> Row:
    """The one way to build a row. Unless given, the verdict is the interval's by the pre-registered
    rule (stats.verdict), or "not testable here" where `why` says the claim's setting is not reached."""
    interval = interval or {"mean": None, "lo": None, "hi": None, "values": []}
    if verdict is None:
        margin = RULES["ratio_margin"] if unit == "ratio" else RULES["margin_nats"]
        verdict = NOT_TESTABLE if why else interval_verdict(interval, kind, margin)
    return Row(*claim, effect, interval, kind, verdict, why, unit, interval.get("values", []))


def claims(results: dict, budget: Budget) -> list[dict]:
    """The table's rows, in the report's order."""
    return [dataclasses.asdict(make_row(results, budget)) for make_row in (
        _rope_quality, _rope_convergence, _rope_past_training_length, _rope_window_at_inference,
        _swa_model_past_training_length, _gqa_quality, _gqa_conversion, _gqa_decode_speed, _gqa_kv_cache,
        _swa_quality, _swa_cost, _swa_training_speed, _swa_relay_reach, _swa_copy_reach, _generation_quality)]


def _rope_quality(results: dict, budget: Budget) -> Row:
    claim = Claim("RoPE", "quality", "rotary positions reach a lower validation loss than learned absolute positions",
                  SOURCES["rope"], "BERT-size encoders and GPT-style LMs, pre-training loss")
    return row(claim, "final loss, rope − baseline", results["derived"]["vs"]["rope"], "negative")


def _rope_convergence(results: dict, budget: Budget) -> Row:
    claim = Claim("RoPE", "convergence speed", "rotary positions converge faster (lower loss at the same step)",
                  SOURCES["rope"], "pre-training curves (RoFormer Fig. 3)")
    derived = results["derived"]
    return row(claim, f"loss at step {derived['half_step']} (before the cooldown), rope − baseline",
               derived["half"]["rope"], "negative")


def _rope_past_training_length(results: dict, budget: Budget) -> Row:
    claim = Claim("RoPE", "long-range: past the training length", "rotary positions degrade past the training length",
                  SOURCES["alibi"], "Fig. 1: 247M-1.3B LMs trained at L=512/1024, perplexity rises past L")
    length = results["length"]
    return row(claim, f"per-token loss penalty over positions {length['bin_names'][0]} against a sliding-n_ctx "
               "evaluation", length["models"]["rope"]["bins"][0], "positive")


def _rope_window_at_inference(results: dict, budget: Budget) -> Row:
    claim = Claim("RoPE", "long-range: a window at inference",
                  "applying a window of n_ctx at inference keeps the loss flat past the training length "
                  "(StreamingLLM predicts the opposite once the first tokens leave the window)",
                  f"{SOURCES['mistral']}; {SOURCES['streaming']}", "StreamingLLM Fig. 3: Llama-2 window attention")
    length = results["length"]
    bins = length["models"][f"rope, window {length['n_ctx']} at inference only"]["bins"]
    return row(claim, "worst bin's penalty against the sliding evaluation", _worst_bin(bins), "at_most")


def _swa_model_past_training_length(results: dict, budget: Budget) -> Row:
    claim = Claim("RoPE + SWA", "long-range: past the training length",
                  "a model trained with a window stays flat past the training length", SOURCES["mistral"],
                  "W=4096, 32 layers")
    length = results["length"]
    reach, compared_from = budget.n_layer * (budget.window - 1), length["n_ctx"] - length["stride"]
    why = None
    if reach < compared_from:
        why = (f"holds by construction: its reach {budget.n_layer}·(W−1) = {reach} < n_ctx − stride = "
               f"{compared_from}, so both passes compute the same thing (the measurement checks the "
               "implementation, not a property of learning)")
    return row(claim, "worst bin's penalty", _worst_bin(length["models"][_swa_arm(budget)]["bins"]), "at_most", why=why)


def _worst_bin(bins: list[dict]) -> dict:
    """The bin with the highest upper end; a bin without an interval counts as the worst."""
    return max(bins, key=lambda one: one["hi"] if one["hi"] is not None else float("inf"))


def _unused_context(results: dict, arm: str, beyond: int) -> float | None:
    """What context beyond `beyond` tokens is worth to `arm` (nats) where that is too little to count as
    used (RULES["context_use_nats"], interval above 0); None where the arm uses it."""
    gain = results["context"]["arms"][arm][str(beyond)]
    used = gain["lo"] is not None and gain["lo"] > 0 and gain["mean"] > RULES["context_use_nats"]
    return None if used else gain["mean"]


def _gqa_quality(results: dict, budget: Budget) -> Row:
    claim = Claim("GQA", "quality", f"{budget.main_kv_head} KV heads cost little quality against {budget.n_head} (MHA)",
                  SOURCES["gqa"], "T5-XXL, GQA-8 uptrained from MHA, close to MHA on summarisation / QA")
    gqa, cut = _gqa_arm(budget), budget.context_cuts[0]
    gain = _unused_context(results, "baseline", cut)
    why = None if gain is None else (f"the baseline gains only {gain:.3f} nats from context beyond "
                                     f"{cut} tokens: attention hardly matters to it")
    return row(claim, f"final loss, {gqa} − baseline (margin {RULES['margin_nats']})", results["derived"]["vs"][gqa],
               "at_most", why=why)


def _gqa_conversion(results: dict, budget: Budget) -> Row:
    claim = Claim("GQA", "conversion", "mean-pooled K/V heads, uptrained with ~5% of the pre-training steps, reach "
                  "the quality of the MHA model trained the same extra steps", SOURCES["gqa"], "T5-XXL, 5% uptraining")
    uptrain = results["derived"]["uptrain"]
    points = uptrain["points"]
    at = next((i for i, point in enumerate(points) if point >= 5.0), len(points) - 1)  # 5%, or the last point
    return row(claim, f"loss gap converted − MHA control after {points[at]}% uptraining", uptrain["gap"][at],
               "at_most")


def _range_gain(ratio: float, lo: float, hi: float) -> dict:
    """A speed ratio as a gain (ratio − 1), with the range of the runs where an interval would be."""
    return {"mean": ratio - 1, "lo": lo - 1, "hi": hi - 1, "values": [], "range": True}


def _gqa_decode_speed(results: dict, budget: Budget) -> Row:
    claim = Claim("GQA", "decode speed", "fewer KV heads decode faster at long context", SOURCES["gqa"],
                  "TPUv4 inference time per sample")
    longest = max(results["derived"]["decode_vs_mha"]["GQA-4"], key=lambda point: (point["context"], point["batch"]))
    return row(claim, f"GQA-4 / MHA tokens/s − 1 at {longest['context']} cached tokens, batch {longest['batch']} "
               "(range: slowest vs fastest of the runs)",
               _range_gain(longest["ratio"], longest["lo"], longest["hi"]), "positive", unit="ratio")


def _gqa_kv_cache(results: dict, budget: Budget) -> Row:
    claim = Claim("GQA", "KV-cache size", "the KV cache shrinks by n_kv_head / n_head", SOURCES["gqa"],
                  "arithmetic of the cache's shape")
    ratio = results["derived"]["kv_vs_mha"]["GQA-4"][-1]
    exact = results["derived"]["kv_exact"] and abs(ratio - 4 / 12) < 1e-9
    context = results["efficiency"]["kv_cache"]["GQA-4"][-1]["context"]
    return row(claim, f"GQA-4 / MHA bytes, GPT-2 124M shapes, {context} tokens, measured on the allocation "
               "(expected 4/12)", {"mean": ratio, "lo": None, "hi": None}, "exact", unit="ratio",
               verdict=SUPPORTED if exact else CONTRADICTED)


def _swa_quality(results: dict, budget: Budget) -> Row:
    claim = Claim("SWA", "quality", f"a window of {budget.window} costs little quality against full attention "
                  f"(n_ctx {budget.n_ctx})", f"{SOURCES['longformer']}; {SOURCES['mistral']}",
                  "W=4096 against a 8k-32k context")
    swa = _swa_arm(budget)
    gain = _unused_context(results, "rope", budget.window)
    why = None if gain is None else (f"the full-attention rope model gains only {gain:.3f} nats from context "
                                     f"beyond {budget.window} tokens, so the setting of the claim (a model that "
                                     "needs context past its window) is not reached; the measured difference is "
                                     "shown, not judged")
    return row(claim, f"final loss, {swa} − rope (margin {RULES['margin_nats']})", results["derived"]["vs"][swa],
               "at_most", why=why)


def _swa_cost(results: dict, budget: Budget) -> Row:
    claim = Claim("SWA", "compute and memory", "windowed attention costs O(n·W), not O(n²)", SOURCES["longformer"],
                  "CUDA kernels, n up to 32k")
    derived = results["derived"]
    band, flash = (derived["slopes"][kernel]["fwd_bwd_ms"] for kernel in ("sliding window", "flash causal"))
    effect = "log-log slope"
    if flash is not None:
        effect = (f"log-log slope of forward+backward time against T (T ≥ {derived['slope_from']}); "
                  f"flash causal {flash:.2f}")
    slope_verdict, why = _slope_verdict(band, flash)
    return row(claim, effect, {"mean": band, "lo": None, "hi": None, "values": []}, "slope", unit="slope",
               verdict=slope_verdict, why=why)


def _slope_verdict(band: float | None, flash: float | None) -> tuple[str, str | None]:
    """Linear in T (supported) or quadratic (contradicted), where the causal reference shows quadratic
    growth, so that the fit can tell the two apart."""
    if flash is None or flash < RULES["quadratic_slope_min"]:
        return NOT_TESTABLE, "the causal reference does not grow quadratically at these lengths: the fit cannot tell"
    if band <= RULES["linear_slope_max"]:
        return SUPPORTED, None
    return (CONTRADICTED if band >= RULES["quadratic_slope_min"] else INCONCLUSIVE), None


def _swa_training_speed(results: dict, budget: Budget) -> Row:
    swa = _swa_arm(budget)
    step = results["derived"]["step_long"][swa]
    claim = Claim("SWA", "training speed at long T",
                  f"training with a window is faster than full attention at T = {step['seq_len']}",
                  SOURCES["longformer"], "character LMs to 23k tokens")
    return row(claim, f"full / {swa} step time − 1, batch 1 (range: slowest vs fastest of "
               f"{budget.step_repeats} steps)",
               _range_gain(step["time_ratio"], step["time_ratio_lo"], step["time_ratio_hi"]), "positive", unit="ratio")


def _swa_relay_reach(results: dict, budget: Budget) -> Row:
    claim = Claim("SWA", "long-range: L·(W−1) reach (synthetic)",
                  "L stacked layers of window W carry information L·(W−1) positions",
                  f"{SOURCES['longformer']}; {SOURCES['mistral']}", "receptive-field argument")
    models = results["relay"]["models"]
    windowed = [model["status"] for model in models if model["window"] is not None]
    full_learned = all(model["status"] == "learned" for model in models if model["window"] is None)
    relay_verdict, why = _relay_verdict(windowed, full_learned)
    return row(claim, f"relay probe: {windowed.count('reaches the edge')} of {len(windowed)} windowed models reach "
               "their predicted edge", kind="relay", unit="-", verdict=relay_verdict, why=why)


def _relay_verdict(windowed: list[str], full_learned: bool) -> tuple[str, str | None]:
    """From the windowed models' relay statuses, given whether full attention learned the task."""
    if any(status.startswith("passes") for status in windowed):
        return CONTRADICTED, None  # a leak through the masks
    if not full_learned or not windowed:
        return NOT_TESTABLE, "the full-attention control did not learn the task"
    if all(status == "reaches the edge" for status in windowed):
        return SUPPORTED, None
    if all(status == "one window only" for status in windowed):
        return CONTRADICTED, "full attention learns the task, but no windowed model relays past one window"
    return INCONCLUSIVE, None


def _swa_copy_reach(results: dict, budget: Budget) -> Row:
    claim = Claim("SWA", "long-range: L·(W−1) reach (language model)",
                  "a windowed LM uses text beyond one window but within L·(W−1)", SOURCES["mistral"],
                  "receptive-field argument")
    copy, swa = results["copy"], _swa_arm(budget)
    between = [i for i, distance in enumerate(copy["distances"])
               if budget.window < distance and distance - 1 <= copy["reach"]]
    if not between:
        return row(claim, "copy probe", kind="negative", why="no probed distance lies between W and the reach")
    farthest = between[-1]
    distance, full = copy["distances"][farthest], copy["models"]["rope"][farthest]
    effect = f"copy probe at distance {distance}: loss on the second copy − the first, {swa}"
    # the claim can only be tested at a distance where full attention copies
    why = None
    if full is None or full["hi"] is None or full["hi"] >= 0:
        why = f"the full-attention rope model does not copy at distance {distance} either"
    return row(claim, effect, copy["models"][swa][farthest], "negative", why=why)


def _generation_quality(results: dict, budget: Budget) -> Row:
    claim = Claim("all", "generation quality", "the variants generate text as well as the baseline", "-", "-")
    return row(claim, "greedy tokens equal to the text's own, repeated 4-grams (descriptive)", unit="-",
               why="no judge of text quality here (no human rating, no larger model); samples are shown side by "
                   "side with two descriptive numbers")
