"""`just report --budget quick` end to end, through ddp on 2 gloo ranks (every number in the
markdown comes from results.json, every figure is a real plot, every claim has a verdict from
the rule; stopped and rerun it ends where an uninterrupted run does), the budgets and their
plans, plus the pieces of the study whose maths can be checked alone against independent
references."""

import dataclasses
import json
import math
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt.config import GPTConfig
from fgpt.data import Corpus
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError
from fgpt.inference.kv_cache import KVCache
from fgpt.model import forward, init_params
from fgpt.report import efficiency, probes, relay, stats
from fgpt.report.budget import FULL, PRESETS, QUICK, RULES, choose_window
from fgpt.report.vocab import restrict
from fgpt.report.writer import PLOTS

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def numbers_in(value) -> list[float]:
    """Every number of a results leaf: the value itself, or the numbers written in a string."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(t) for t in NUMBER.findall(str(value))]


SAMPLE_KEYS = {"prompts", "truth", "greedy", "sampled"}  # generated and quoted text: numbers in it are random


def flatten(tree) -> list[float]:
    """All numbers in the results tree (keys included: arm names like gqa-2 carry numbers),
    except those inside text samples."""
    if isinstance(tree, dict):
        return ([x for k, v in tree.items() if k not in SAMPLE_KEYS for x in flatten(v)]
                + [x for k in tree for x in numbers_in(k)])
    if isinstance(tree, list):
        return [x for v in tree for x in flatten(v)]
    return numbers_in(tree)


def quoted_by_results(token: str, values: list[float]) -> bool:
    """Is `token`, as printed, some value of the results rounded to the token's digits?"""
    digits = len(token.split(".")[1]) if "." in token else 0
    return any(math.isclose(round(v, digits), float(token), rel_tol=0.0, abs_tol=1e-9) for v in values)


def without_samples(markdown: str) -> str:
    """The report less its generation samples (the prompts' tables), whose text is quoted."""
    return re.sub(r"\*\*Prompt \d+\*\*.*?(?=\n## |\Z)", "", markdown, flags=re.S)


def unquoted_numbers(markdown: str, results: dict) -> list[str]:
    values = flatten(results)
    return [t for t in NUMBER.findall(without_samples(markdown)) if not quoted_by_results(t, values)]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    from run.report import main
    out = tmp_path_factory.mktemp("report")
    # fp32: --precision auto measures which is faster, and the two runs compared must agree on it
    main(["--budget", "quick", "--strategy", "ddp", "--nproc", "2", "--precision", "fp32", "--out", str(out)])
    markdown = (out / "report.md").read_text()
    results = json.loads((out / "report" / "results.json").read_text())
    return out, markdown, results


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_every_number_in_the_report_comes_from_results(quick_report):
    _, markdown, results = quick_report
    assert len(NUMBER.findall(markdown)) > 200  # the report quotes its measurements
    assert unquoted_numbers(markdown, results) == []


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_the_check_flags_a_number_not_in_results(quick_report):
    _, markdown, results = quick_report
    values = flatten(results)
    # a plausible loss-sized number that no result rounds to
    invented = next(t for t in (f"{1 + k / 1000:.3f}" for k in range(1000)) if not quoted_by_results(t, values))
    assert unquoted_numbers(markdown + f"\nan invented {invented} figure", results) == [invented]


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_every_figure_is_a_real_plot_linked_from_the_report(quick_report):
    out, markdown, _ = quick_report
    sizes = set()
    for name in PLOTS.values():
        path = out / "report" / name
        w, h = png_size(path)
        assert w >= 400 and h >= 300, name
        assert path.stat().st_size > 10_000, name  # axes, lines and labels, not an empty canvas
        sizes.add(path.stat().st_size)
        assert f"report/{name}" in markdown
    assert len(sizes) == len(PLOTS)  # no figure is a copy of another


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_every_claim_has_a_verdict_from_the_rule(quick_report):
    _, markdown, results = quick_report
    claims = results["claims"]
    aspects = {c["variant"] + ": " + c["aspect"] for c in claims}
    for needed in ("RoPE: quality", "RoPE: convergence speed", "GQA: quality", "GQA: conversion", "GQA: decode speed",
                   "SWA: quality", "SWA: compute and memory", "all: generation quality"):
        assert needed in aspects
    rules = results["rules"]
    for c in claims:
        assert c["verdict"] in stats.VERDICTS
        if c["kind"] in ("negative", "positive", "at_most"):
            assert (c["verdict"] == stats.NOT_TESTABLE) == bool(c["why"])
            if not c["why"]:
                margin = rules["ratio_margin"] if c["unit"] == "ratio" else rules["margin_nats"]
                assert c["verdict"] == stats.verdict(c["interval"], c["kind"], margin)
        elif c["kind"] == "slope":  # the rule on the fitted slope, unless the reference could not tell
            assert (c["verdict"] == stats.NOT_TESTABLE) == bool(c["why"])
            slope = c["interval"]["mean"]
            if not c["why"]:
                assert c["verdict"] == (stats.SUPPORTED if slope <= rules["linear_slope_max"] else
                                        stats.CONTRADICTED if slope >= rules["quadratic_slope_min"] else
                                        stats.INCONCLUSIVE)
        elif c["kind"] == "relay":  # recomputed from the relay models' statuses
            statuses = [m["status"] for m in results["relay"]["models"] if m["window"] is not None]
            full_ok = all(m["status"] == "learned" for m in results["relay"]["models"] if m["window"] is None)
            expected = (stats.CONTRADICTED if any(st.startswith("passes") for st in statuses) else
                        stats.NOT_TESTABLE if not full_ok else
                        stats.SUPPORTED if all(st == "reaches the edge" for st in statuses) else
                        stats.CONTRADICTED if all(st == "one window only" for st in statuses) else
                        stats.INCONCLUSIVE)
            assert c["verdict"] == expected
            assert bool(c["why"]) == (expected == stats.NOT_TESTABLE or (
                expected == stats.CONTRADICTED and not any(st.startswith("passes") for st in statuses)))
        elif c["kind"] == "exact":  # the KV cache's bytes, measured on the allocation: GQA-4 holds 4/12 of MHA's
            kv = results["efficiency"]["kv_cache"]
            ratio = kv["GQA-4"][-1]["bytes"] / kv["GPT-2 124M (MHA)"][-1]["bytes"]
            assert c["interval"]["mean"] == pytest.approx(ratio)
            assert c["verdict"] == (stats.SUPPORTED if abs(ratio - 4 / 12) < 1e-9 else stats.CONTRADICTED)
        else:  # descriptive only (generation): no rule, so no verdict but "not testable" with its reason
            assert c["verdict"] == stats.NOT_TESTABLE and c["why"], c
        assert f"**{c['verdict']}**" in markdown
    assert "agrees" not in markdown  # the old report's word for a null result


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_results_hold_every_arm_on_its_seeds(quick_report):
    _, _, results = quick_report
    window = results["window_rule"]["window"]
    assert results["budget"]["window"] == window and QUICK.window is None  # the rule chose it
    assert set(results["runs"]) == set(dataclasses.replace(QUICK, window=window).arms())
    for arm, runs in results["runs"].items():
        assert [r["seed"] for r in runs] == list(QUICK.seeds_of(arm))
        assert all(math.isfinite(r["final_loss"]) for r in runs)
    # paired differences are differences of the per-seed values
    d = results["derived"]["vs"]["rope"]
    expected = [r["final_loss"] - b["final_loss"] for r, b in zip(results["runs"]["rope"], results["runs"]["baseline"])]
    assert d["values"] == pytest.approx(expected)
    # the length probe's passes agree exactly where they see the same context
    assert all(m["inside_max_abs"] < 1e-4 for m in results["length"]["models"].values())


def test_full_budget_arms_differ_from_their_reference_in_one_field():
    full = dataclasses.replace(FULL, window=32)  # the cpu budget's window comes from the rule
    arms = full.arms()
    base, rope = arms["baseline"], arms["rope"]
    assert len(full.seeds) >= 3
    assert rope == base.replace(pos_emb="rope")
    assert arms[f"gqa-{full.main_kv_head}"] == base.replace(n_kv_head=full.main_kv_head)
    assert arms["rope+swa-32"] == rope.replace(window=32)
    assert set(full.sweep_kv_heads) | {full.main_kv_head, full.n_head} == {8, 4, 2, 1}


# --- statistics ---------------------------------------------------------------------------

def t_cdf(x: float, df: int, steps: int = 200_000) -> float:
    """Student t CDF by the trapezoid rule over its density (an independent reference)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    grid = np.linspace(0.0, x, steps)
    pdf = c * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.trapezoid(pdf, grid))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_quantiles_match_the_t_distribution(df):
    assert t_cdf(stats.t975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        iv = stats.bootstrap_interval(rng.normal(1.0, 1.0, size=60), resamples=400, seed=trial)
        hits += iv["lo"] <= 1.0 <= iv["hi"]
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_interval_is_a_t_interval():
    iv = stats.paired_interval([0.1, 0.3, 0.2])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (iv["lo"], iv["mean"], iv["hi"]) == pytest.approx((0.2 - half, 0.2, 0.2 + half))
    assert stats.paired_interval([0.5])["lo"] is None


@settings(max_examples=200)
@given(lo=st.floats(-1, 1), width=st.floats(0, 1), shift=st.floats(0, 1))
def test_verdicts_move_the_right_way_when_the_effect_shifts(lo, width, shift):
    rank = {stats.CONTRADICTED: 0, stats.INCONCLUSIVE: 1, stats.NOT_DETECTED: 1, stats.SUPPORTED: 2}
    iv = {"lo": lo, "hi": lo + width}
    lower = {"lo": lo - shift, "hi": lo + width - shift}
    for kind in ("negative", "at_most"):  # lower effects can only help these claims
        assert rank[stats.verdict(lower, kind, 0.02)] >= rank[stats.verdict(iv, kind, 0.02)]
    assert stats.verdict(iv, "positive", 0.02) == stats.verdict({"lo": -iv["hi"], "hi": -iv["lo"]}, "negative", 0.02)


def test_verdict_cases():
    v = stats.verdict
    assert v({"lo": -0.3, "hi": -0.1}, "negative", 0.02) == stats.SUPPORTED
    assert v({"lo": 0.1, "hi": 0.3}, "negative", 0.02) == stats.CONTRADICTED
    assert v({"lo": -0.01, "hi": 0.01}, "negative", 0.02) == stats.NOT_DETECTED
    assert v({"lo": -0.05, "hi": 0.01}, "negative", 0.02) == stats.INCONCLUSIVE
    assert v({"lo": -0.05, "hi": 0.01}, "at_most", 0.02) == stats.SUPPORTED
    assert v({"lo": 0.03, "hi": 0.05}, "at_most", 0.02) == stats.CONTRADICTED
    assert v({"lo": 0.0, "hi": 0.05}, "at_most", 0.02) == stats.INCONCLUSIVE
    assert v({"lo": None, "hi": None}, "negative", 0.02) == stats.INCONCLUSIVE


@given(slope=st.floats(0.5, 2.5), scale=st.floats(0.1, 100))
def test_loglog_slope_recovers_a_power_law(slope, scale):
    xs = [512, 1024, 4096, 16384]
    assert stats.loglog_slope(xs, [scale * x ** slope for x in xs]) == pytest.approx(slope)


# --- the restricted vocabulary -------------------------------------------------------------

def test_restricted_vocabulary_keeps_the_most_frequent_ids_and_decodes_them_back():
    enc = gpt2_encoding()
    text = "the cat sat on the mat. the cat ran. a dog!" * 5
    ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
    corpus = Corpus(train=ids, val=ids[:20], cache_dir=None, description="toy")
    restricted, vocab = restrict(corpus, 6)
    counts = np.bincount(ids)
    assert sorted(counts[vocab.kept].tolist(), reverse=True) == counts[vocab.kept].tolist()
    assert counts[vocab.kept].min() >= np.sort(counts)[-5]  # no dropped id is more frequent than a kept one
    assert restricted.ignore_id == vocab.unk == 5
    kept = np.isin(ids, vocab.kept)
    assert (restricted.train[~kept] == vocab.unk).all()
    assert (vocab.kept[restricted.train[kept]] == ids[kept]).all()
    assert vocab.coverage_train == pytest.approx(kept.mean())
    only_kept = [int(i) for i in restricted.train[kept][:12]]
    assert vocab.decode(only_kept) == enc.decode([int(vocab.kept[i]) for i in only_kept])
    assert "\u2047" in vocab.decode([vocab.unk])


# --- the probes -----------------------------------------------------------------------------

def tiny(**kw) -> tuple[GPTConfig, dict]:
    config = GPTConfig(vocab_size=23, n_ctx=16, n_layer=2, n_head=2, n_embd=16, pos_emb="rope", **kw)
    params = init_params(config, seed=3)
    return config, {k: v for k, v in params.items()}


@given(stride=st.sampled_from([2, 4, 5, 6, 8, 16]), seed=st.integers(0, 50))
@settings(max_examples=15, deadline=None)
def test_sliding_evaluation_scores_every_token_once_with_its_window(stride, seed):
    config, params = tiny()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 23, (2, 49), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    got = probes.sliding_losses(params, config, x, y, stride, None)
    # reference: each position t >= n_ctx scored by a fresh forward of the n_ctx window ending at
    # the end of the stride-aligned window that first covers it
    n = config.n_ctx
    for t in (0, n - 1, n, n + stride - 1, 44, 45, 46, 47):  # strides 5, 6: the last window is short
        end = n if t < n else min(48, n + stride * math.ceil((t + 1 - n) / stride))
        logits = forward(params, x[:, end - n:end], config)[:, t - (end - n)]
        ref = torch.nn.functional.cross_entropy(logits, y[:, t], reduction="none").double().numpy()
        assert got[:, t] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_a_window_model_within_reach_loses_nothing_to_the_sliding_evaluation():
    config, params = tiny(window=3)  # reach 2 * 2 = 4 < n_ctx - stride
    tokens = torch.randint(0, 23, (2, 49), generator=torch.Generator().manual_seed(0))
    out = probes.length_penalty(params, config, tokens[:, :-1], tokens[:, 1:], 4, None)
    assert np.abs(out["penalty"]).max() < 1e-4


def test_context_losses_equal_the_full_forward_at_the_last_position():
    config, params = tiny()
    val = np.random.default_rng(0).integers(0, 23, size=200).astype(np.uint16)
    targets = probes.context_targets(val, 16, 5, ignore_id=None)
    got = probes.context_losses(params, config, val, targets, (4, 16))
    for k in (4, 16):
        for i, t in enumerate(targets):
            x = torch.from_numpy(val[t - k:t].astype(np.int64))[None]
            ref = torch.nn.functional.cross_entropy(forward(params, x, config)[0, -1:], torch.tensor([int(val[t])]))
            assert got[k][i] == pytest.approx(float(ref), rel=1e-5)


def test_copy_sequences_repeat_the_span_at_the_distance():
    val = np.arange(500, dtype=np.uint16) % 50
    rows, first, second = probes.copy_sequences(val, 40, 6, 3, alphabet=20, seed=0, avoid=7)
    assert second - first == 40
    assert torch.equal(rows[:, first:first + 6], rows[:, second:second + 6])
    assert not (rows[:, first:first + 6] == 7).any()


# --- the relay probe --------------------------------------------------------------------------

@given(seed=st.integers(0, 1000))
def test_relay_targets_are_the_value_which_never_reappears(seed):
    task = relay.RelayTask(seq_len=40)
    tokens, targets, distance = task.batch(5, torch.Generator().manual_seed(seed))
    for row in range(5):
        pos = int((distance[row] == 0).nonzero())
        value = int(tokens[row, pos])
        assert value < task.n_values
        assert (tokens[row, pos + 1:] >= task.n_values).all()  # only noise and reads after it
        reads = tokens[row] == task.read
        assert (targets[row][reads] == value).all() and (targets[row][~reads] == -1).all()
        assert (distance[row][reads] > 0).all()


@given(n_layer=st.integers(1, 4), window=st.integers(1, 8))
def test_receptive_field_matches_a_dependency_trace(n_layer, window):
    """Mark which positions can influence the last one through n_layer windowed layers."""
    T = 40
    reach = {T - 1}
    for _ in range(n_layer):
        reach |= {j for i in reach for j in range(max(0, i - window + 1), i + 1)}
    assert relay.receptive_field(n_layer, window, T) == (T - 1) - min(reach)


def test_a_windowed_model_cannot_see_past_its_receptive_field():
    """Changing a token beyond n_layer·(W−1) leaves a position's logits unchanged; within, it may not."""
    task = relay.RelayTask(seq_len=20)
    config = relay.relay_config(task, 2, 3)
    params = init_params(config, seed=0)
    tokens, _, _ = task.batch(1, torch.Generator().manual_seed(0))
    edge = relay.receptive_field(2, 3, task.seq_len)  # 4
    q = task.seq_len - 1
    base = forward(params, tokens, config)[0, -1]
    far, near = tokens.clone(), tokens.clone()
    far[0, q - edge - 1] = task.n_values + (far[0, q - edge - 1] - task.n_values + 1) % task.n_noise
    near[0, q - edge] = task.n_values + (near[0, q - edge] - task.n_values + 1) % task.n_noise
    torch.testing.assert_close(forward(params, far, config)[0, -1], base)
    assert not torch.allclose(forward(params, near, config)[0, -1], base)


def test_measured_edge():
    assert relay.measured_edge([1.0, 0.9, 0.4, 0.9], 0.5) == 2
    assert relay.measured_edge([0.1, 1.0], 0.5) == 0
    assert relay.measured_edge([1.0, None, 1.0], 0.5) == 3


# --- efficiency -------------------------------------------------------------------------------

@given(n_kv=st.sampled_from([1, 2, 4]), window=st.sampled_from([None, 4, 100]), context=st.integers(1, 40))
def test_kv_cache_bytes_on_meta_equal_the_real_allocation_and_the_formula(n_kv, window, context):
    config = GPTConfig(vocab_size=32, n_ctx=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=n_kv, window=window)
    real = KVCache.allocate(config, 1, context).nbytes()
    assert efficiency.kv_cache_bytes(config, context) == real == efficiency.kv_cache_formula(config, context)


def test_decode_runs_on_a_rolling_window_cache(monkeypatch):
    """Each timed run decodes new_tokens steps through a rolling cache filled to `context`
    (it ends there + new_tokens, its window-sized buffers holding the last positions), and
    its speed is batch x new_tokens over its time."""
    config = GPTConfig(vocab_size=32, n_ctx=16, n_layer=2, n_head=2, n_embd=16, window=4, pos_emb="rope")
    caches, times = [], [0.5, 0.25]

    def fake_repeat_times(fn, runs, setup):
        for _ in range(runs):
            cache = setup()
            assert cache.length == 12
            fn(cache)
            caches.append(cache)
        return times

    monkeypatch.setattr(efficiency, "repeat_times", fake_repeat_times)
    speeds = efficiency.decode_runs(config, context=12, batch=2, new_tokens=2, runs=2)
    assert speeds == [2 * 2 / t for t in times]
    assert [c.length for c in caches] == [14, 14]
    for slots in caches[0].slot_pos:  # a rolling buffer of the window's size holds positions 10..13
        assert sorted(slots.tolist()) == list(range(14 - slots.numel(), 14))


def test_relay_status_reads_the_measured_edge_not_a_mean():
    from fgpt.report.claims import relay_status
    chance = 0.125

    def model(measured, beyond=chance, window=8, edge=14):
        return {"predicted_edge": edge, "measured_edge": measured, "window": window, "beyond_edge": beyond}

    assert relay_status(model(14), chance) == "reaches the edge"
    assert relay_status(model(13), chance) == "reaches the edge"  # RULES["relay_edge_slack"] = 1
    assert relay_status(model(12), chance) == "part of the way"  # a high mean over 1..edge is not enough
    assert relay_status(model(7), chance) == "one window only"
    assert relay_status(model(0), chance) == "not learned"
    assert relay_status(model(14, beyond=0.5), chance).startswith("passes the edge")
    assert relay_status(model(111, window=None, edge=111), chance) == "learned"
    assert relay_status(model(60, window=None, edge=111), chance) == "not learned"


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_results_json_is_strict_json_even_where_a_number_is_nan(tmp_path):
    from run.report import save_results
    save_results(tmp_path, {"spread": float("nan"), "ratios": [1.5, float("inf")]})
    text = (tmp_path / "results.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict == {"spread": None, "ratios": [1.5, None]}


def test_render_rebuilds_the_same_report_from_results_json(quick_report, tmp_path):
    from run.report import main
    out, markdown, _ = quick_report
    main(["--render", str(out / "report" / "results.json"), "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == markdown
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in (out / "report").iterdir())


def test_pinned_steps_replace_the_pilot_and_name_themselves_in_the_setup():
    from fgpt.report.study import Progress, pilot_steps
    from fgpt.report.writer import schedule
    budget = dataclasses.replace(QUICK, steps=6)
    pilot = pilot_steps(budget, corpus=None, arms={}, progress=Progress())  # no arm to time: none is trained
    assert pilot == {"tokens_per_s": None, "steps": 6, "tokens_per_run": 6 * QUICK.batch_size * QUICK.n_ctx,
                     "pinned": True}
    assert schedule(budget.to_dict(), pilot) == (
        f"Each run trained 6 steps ({6 * QUICK.batch_size * QUICK.n_ctx} tokens), pinned by the budget "
        "(`--steps` or its tokens_per_run).")


@pytest.mark.parametrize("argv,message", [
    (["--quick", "--steps", "3"], "--steps 3: the quick budget evaluates 2 times a run, so the steps must be"),
    (["--quick", "--steps", "0"], "--steps 0: the quick budget evaluates 2 times a run"),
    (["--render", "results.json", "--steps", "4"], "--steps: --render measures nothing")])
def test_steps_that_cannot_be_pinned_are_one_error_before_anything_runs(argv, message, tmp_path):
    from run.report import main
    with pytest.raises(FgptError, match=re.escape(message)):
        main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# --- budgets, plans, resumable runs ---------------------------------------------------------

TIMINGS = {"tokens_per_s", "efficiency", "meta", "wall_min", "train_wall_min", "invocations", "pilot", "claims",
           "derived"}


def without_timings(results: dict) -> dict:
    """Everything but the timings (and what is derived from them)."""
    return {k: v for k, v in results.items() if k not in TIMINGS} | {
        "runs": {arm: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in runs]
                 for arm, runs in results["runs"].items()}}


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_a_study_stopped_after_its_first_run_and_rerun_ends_as_an_uninterrupted_one(quick_report, tmp_path):
    from fgpt.training import run_dir
    from run.report import main
    full_out, _, full = quick_report
    argv = ["--budget", "quick", "strategy=ddp", "nproc=2", "--precision", "fp32", "--out", str(tmp_path)]
    main([*argv, "--stop-after-runs", "1"])
    runs = tmp_path / "runs"
    assert run_dir.train_state(runs / "baseline-seed0")["step"] == full["pilot"]["steps"]  # an ordinary run dir
    assert run_dir.saved_run(runs / "baseline-seed0")[0].strategy == "ddp"
    assert not (runs / "rope-seed0").exists() and not (tmp_path / "report" / "results.json").exists()
    # the timing measurements are not compared (timings aside): the uninterrupted run's are put
    # in place as a finished section, which the rerun must read back, not measure again
    shutil.copy(full_out / "runs" / "sections" / "efficiency.json", runs / "sections" / "efficiency.json")
    main(argv)
    resumed = json.loads((tmp_path / "report" / "results.json").read_text())
    assert without_timings(resumed) | {"launch": None} == without_timings(full) | {"launch": None}
    assert resumed["efficiency"] == full["efficiency"]  # read back
    assert resumed["launch"]["strategy"] == "ddp" and resumed["launch"]["world_size"] == 2
    assert resumed["invocations"] == 2 and full["invocations"] == 1
    finals = [r["final_loss"] for rs in resumed["runs"].values() for r in rs]
    assert finals == [r["final_loss"] for rs in full["runs"].values() for r in rs]
    # nothing left to do: a third run trains nothing and writes the same numbers
    stamp = (runs / "rope-seed1" / "train_state.pt").stat().st_mtime_ns
    main(argv)
    assert (runs / "rope-seed1" / "train_state.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_a_rerun_with_another_budget_or_data_into_the_same_output_is_refused(quick_report, tmp_path, text_file):
    from run.report import main
    out, _, _ = quick_report
    budget_file = tmp_path / "b.toml"
    budget_file.write_text("lr = 0.001\n")
    with pytest.raises(FgptError, match=r"holds a study of budget quick with lr = 0\.003, not 0\.001: use another --out"):
        main(["--budget", "quick", "--budget-file", str(budget_file), "--out", str(out)])
    with pytest.raises(FgptError, match="holds a study of data built-in, not .*code.txt"):
        main(["--budget", "quick", "--data", str(text_file), "--out", str(out)])
    with pytest.raises(FgptError, match="holds a study of budget quick, not cpu"):
        main(["--budget", "cpu", "--out", str(out)])


@pytest.mark.parametrize("budget,text,message", [
    ("quick", "lr = 0.1\nwarmup_steps = 3\n", "unknown field 'warmup_steps'"),
    ("quick", "window = 12\n", "budget quick: window 12 does not divide n_ctx 32"),
    ("cpu", "seeds = [0, 1]\n", "budget cpu: seeds [0, 1]: paired t-intervals over seeds need at least 3"),
    ("quick", "n_layer = 'four'\n", "n_layer = 'four' is not a int"),
    ("quick", "lr = [\n", "not TOML")])
def test_a_bad_budget_file_is_one_error_line_before_anything_trains(budget, text, message, tmp_path):
    from run.report import main
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(FgptError, match=re.escape(message)) as e:
        main(["--budget", budget, "--budget-file", str(path), "--out", str(tmp_path / "out")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_budget_file_overrides_fields_of_its_preset(tmp_path):
    from fgpt.report.budget import with_file
    path = tmp_path / "b.toml"
    path.write_text('seeds = [3, 4, 5]\nwindow = "rule"\nlr = 1\nrelay_models = [[2, 8]]\n')
    b = with_file(PRESETS["gpu"], str(path))
    assert b == dataclasses.replace(PRESETS["gpu"], seeds=(3, 4, 5), window=None, lr=1.0, relay_models=((2, 8),))
    b.check()


def param_count(V, T, L, d, h, kv, learned):
    """GPT-2's parameters from its shapes: tied embedding (+ learned positions), per block two
    layer norms, QKV (q: d, k and v: kv heads of d/h each) and output projections with biases,
    a 4d MLP with biases; a final layer norm."""
    hd = d // h
    qkv = d * (d + 2 * kv * hd) + (d + 2 * kv * hd)
    block = 2 * d + qkv + d * d + d + 2 * d + d * 4 * d + 4 * d + 4 * d * d + d
    return V * d + (T * d if learned else 0) + L * block + 2 * d


PLAN_ROW = re.compile(r"^(\S+)\s+([\d,]+)\s+(\d+)\s+([\d,]+)\s+([\d.]+e[+-]\d+)$", re.M)


@pytest.mark.parametrize("preset", ["gpu", "gpt2", "gpu-smoke"])
def test_dry_run_plans_match_six_n_d_plus_attention(preset, capsys, monkeypatch, tmp_path):
    from fgpt.report import plan
    from run.report import main
    monkeypatch.setattr(plan, "pilot_flops_per_s", lambda budget, launch: 1e13)  # no 124M step on a CPU
    main(["--budget", preset, "--dry-run", "--device", "cpu", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    b = PRESETS[preset]
    steps = round(b.tokens_per_run / (b.batch_size * b.n_ctx) / b.evals_per_run) * b.evals_per_run
    top = round(max(b.uptrain_percents) / 100 * steps)
    V, T, L, d, h = 50257, b.n_ctx, b.n_layer, b.n_embd, b.n_head
    kvs = {"baseline": h, "rope": h, f"gqa-{b.main_kv_head}": b.main_kv_head, f"rope+swa-{b.window}": h}
    kvs |= {f"gqa-{k}": k for k in (6, 3, 2, 1) if h % k == 0 and k not in (h, b.main_kv_head) and k in b.sweep_kv_heads}
    expected = {}
    for arm, kv in kvs.items():
        learned = not arm.startswith("rope")
        keys = b.window if "swa" in arm else T
        per_token = 6 * param_count(V, T, L, d, h, kv, learned) + 12 * L * d * keys
        for seed in (b.seeds if arm in ("baseline", "rope", f"gqa-{b.main_kv_head}", f"rope+swa-{b.window}")
                     else b.sweep_seeds):
            expected[f"{arm}-seed{seed}"] = (steps, per_token * steps * b.batch_size * T)
    for seed in b.seeds:
        for kind, kv in (("converted", b.main_kv_head), ("control", h)):
            expected[f"uptrain-{kind}-seed{seed}"] = (
                top, (6 * param_count(V, T, L, d, h, kv, True) + 12 * L * d * T) * top * b.batch_size * T)
    rows = {m[1]: m for m in PLAN_ROW.finditer(text)}
    assert set(rows) == set(expected)
    for name, (st, flops) in expected.items():
        assert int(rows[name][3]) == st and int(rows[name][4].replace(",", "")) == st * b.batch_size * T
        assert float(rows[name][5]) == pytest.approx(flops, rel=1e-3), name
    total = float(re.search(r"total: [\d,]+ tokens, ([\d.e+]+) FLOPs", text)[1])
    assert total == pytest.approx(sum(f for _, f in expected.values()), rel=1e-3)
    assert "estimated training time: " in text and "(estimate: a pilot measured 10 TFLOP/s" in text
    assert re.search(r"estimated disk: [\d.]+ GiB", text)


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_dry_run_of_the_quick_budget_times_a_pilot_here(capsys, tmp_path):
    from run.report import main
    main(["--budget", "quick", "--dry-run", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert re.search(r"estimated training time: [\d.]+ (s|min|h) \(estimate: a pilot measured [\d.e+-]+ TFLOP/s", text)
    assert len(PLAN_ROW.findall(text)) == 9 + 2 * len(QUICK.seeds)  # 4 arms x 2 seeds, 1 sweep arm; the ladder
    assert not (tmp_path / "out").exists()


def test_the_window_rule_picks_the_largest_cut_the_baseline_still_uses():
    b = PRESETS["cpu"]
    t = RULES["context_use_nats"]

    def gains(used):
        return {k: {"mean": 2 * t if k in used else t / 2, "lo": t if k in used else -t} for k in b.context_cuts}
    assert choose_window(b, gains({16, 32})) == 32
    assert choose_window(b, gains({16, 32, 64, 128})) == 128
    assert choose_window(b, gains(set())) == 16
    iffy = gains({16}) | {64: {"mean": 2 * t, "lo": -t}}  # a mean above the threshold, an interval reaching 0
    assert choose_window(b, iffy) == 16


def test_every_preset_is_consistent():
    for b in PRESETS.values():
        b.check()
        assert b.smoke or len(b.seeds) >= 3
    assert PRESETS["gpt2"].base_config().replace(vocab_size=50257) == GPTConfig.preset("gpt2")
    assert not PRESETS["gpt2"].restrict_vocab and PRESETS["cpu"].restrict_vocab


@pytest.mark.slow  # the quick study through ddp on 2 gloo ranks
def test_train_runs_resumes_a_half_trained_run_and_skips_a_finished_one(tmp_path):
    """A study run is a run.train run directory: stopped halfway, train_runs resumes it from
    its checkpoint to the same weights as an uninterrupted run; a finished one is skipped.
    The corpus it reads is the restricted one written as shards, UNK left out of the loss."""
    from fgpt import data
    from fgpt.training import run_dir
    from fgpt.checkpoint import load_checkpoint
    from fgpt.report.runs import Launch, run_config, train_runs, write_corpus
    from fgpt.training.train import train
    from fgpt.tree import flatten
    rng = np.random.default_rng(0)
    corpus = Corpus(train=rng.integers(0, 64, 4000).astype(np.uint16), val=rng.integers(0, 64, 600).astype(np.uint16),
                    cache_dir=None, description="random", ignore_id=63)
    directory = write_corpus(corpus, tmp_path / "corpus")
    opened = data.load_corpus(str(directory))
    assert opened.ignore_id == 63 and np.array_equal(np.asarray(opened.train), corpus.train)
    config = GPTConfig(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, n_embd=32)
    launch = Launch(device="cpu", precision="fp32")
    settings = dict(batch_size=4, lr=3e-3, warmup=1, eval_interval=2, eval_iters=1, checkpoint_interval=1)

    def run(name):
        return run_config(config, seed=0, steps=4, out=tmp_path / name, data_dir=directory, launch=launch,
                          settings=settings)
    train(dataclasses.replace(run("half"), stop_after=2))
    assert run_dir.train_state(tmp_path / "half")["step"] == 2
    train_runs([run("half"), run("whole")], launch, tmp_path, log=lambda m: None)
    half, whole = (load_checkpoint(tmp_path / n)[1] for n in ("half", "whole"))
    flat_half, flat_whole = flatten(half), flatten(whole)
    assert flat_half.keys() == flat_whole.keys()
    assert all(torch.equal(flat_half[k], flat_whole[k]) for k in flat_half)
    rows = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    stamp = (tmp_path / "whole" / "train_state.pt").stat().st_mtime_ns
    train_runs([run("whole")], launch, tmp_path, log=lambda m: None)
    assert (tmp_path / "whole" / "train_state.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("batch,micro,nproc,expected", [
    (512, 16, 1, 32), (512, 16, 8, 4), (256, 64, 8, 1), (64, None, 2, 1), (24, 5, 2, 3), (12, 1, 3, 4)])
def test_gradient_accumulation_keeps_each_forward_within_the_micro_batch(batch, micro, nproc, expected):
    from fgpt.report.runs import grad_accum
    k = grad_accum(batch, micro, nproc)
    assert k == expected
    assert (batch // nproc) % k == 0 and (micro is None or batch // nproc // k <= micro)


def test_a_batch_that_does_not_split_over_the_ranks_is_one_error():
    from fgpt.report.runs import grad_accum
    with pytest.raises(FgptError, match="batch_size 10 does not split evenly into 4 ranks"):
        grad_accum(10, None, 4)
