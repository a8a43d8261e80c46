"""`just report --quick` end to end: every number in the markdown comes from results.json,
every plot exists; plus the pieces of the study whose maths can be checked alone."""

import json
import math
import re

import pytest
import torch
from hypothesis import given, strategies as st

from fgpt.config import GPTConfig
from fgpt.model import forward, init_params
from fgpt.report import recall
from fgpt.report.budget import FULL, QUICK
from fgpt.report.measure import decode_tokens_per_s, kv_bytes_per_token
from fgpt.report.study import parse_markdown_table
from fgpt.report.writer import PLOTS

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def numbers_in(value) -> list[float]:
    """Every number of a results leaf: the value itself, or the numbers written in a string."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(t) for t in NUMBER.findall(str(value))]


def flatten(tree) -> list[float]:
    """All numbers in the results tree (keys included: arm names like gqa-2 carry numbers)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in flatten(v)] + [x for k in tree for x in numbers_in(k)]
    if isinstance(tree, list):
        return [x for v in tree for x in flatten(v)]
    return numbers_in(tree)


def quoted_by_results(token: str, values: list[float]) -> bool:
    """Is `token`, as printed, some value of the results rounded to the token's digits?"""
    digits = len(token.split(".")[1]) if "." in token else 0
    tol = 10 ** -digits / 2 + 1e-9
    return any(math.isclose(round(v, digits), float(token), abs_tol=tol) for v in values)


def unquoted_numbers(markdown: str, results: dict) -> list[str]:
    values = flatten(results)
    return [t for t in NUMBER.findall(markdown) if not quoted_by_results(t, values)]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    from run.report import main
    out = tmp_path_factory.mktemp("report")
    main(["--quick", "--out", str(out), "--no-parallel"])
    markdown = (out / "report.md").read_text()
    results = json.loads((out / "report" / "results.json").read_text())
    return out, markdown, results


def test_every_number_in_the_report_comes_from_results(quick_report):
    _, markdown, results = quick_report
    assert len(NUMBER.findall(markdown)) > 50  # the report quotes its measurements
    assert unquoted_numbers(markdown, results) == []


def test_the_check_flags_a_number_not_in_results(quick_report):
    _, markdown, results = quick_report
    invented = f"{max(flatten(results)) + 1.234:.3f}"
    assert unquoted_numbers(markdown + f"\nan invented {invented} figure", results) == [invented]


def test_every_plot_exists_and_is_a_png(quick_report):
    out, markdown, _ = quick_report
    for name in PLOTS.values():
        path = out / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"report/{name}" in markdown


def test_results_hold_every_arm_and_section(quick_report):
    _, markdown, results = quick_report
    assert set(results["arms"]) == set(QUICK.arms())
    for arm in results["arms"].values():
        assert len(arm["runs"]) == len(QUICK.seeds)
        assert all(math.isfinite(r["final_loss"]) for r in arm["runs"])
    assert results["parallel"]["measured"] is False and "not measured in this run" in markdown.lower()
    assert [e["n_kv_head"] for e in results["gqa_efficiency"]] == list(QUICK.kv_heads)


def test_full_budget_arms_share_everything_but_the_variant():
    arms = FULL.arms()
    assert len(FULL.seeds) == 3 and FULL.kv_heads == (4, 2, 1)
    base = arms["baseline"]
    for config in arms.values():
        assert (config.n_layer, config.n_embd, config.n_ctx, config.vocab_size) == \
            (base.n_layer, base.n_embd, base.n_ctx, base.vocab_size)


# --- the recall probe ------------------------------------------------------------------

@given(distance=st.integers(1, 12), seed=st.integers(0, 1000))
def test_recall_target_is_the_symbol_at_the_asked_distance(distance, seed):
    task = recall.RecallTask(n_symbols=5, max_distance=12)
    tokens, targets, dist = task.batch(6, torch.Generator().manual_seed(seed))
    query_pos = task.seq_len - 1
    for row in range(6):
        d = int(dist[row])
        assert tokens[row, query_pos] == task.n_symbols + d - 1
        assert targets[row, query_pos] == tokens[row, query_pos - d]
        assert (targets[row, :query_pos] == -1).all()


@given(n_layer=st.integers(1, 4), window=st.integers(1, 8))
def test_receptive_field_matches_a_dependency_trace(n_layer, window):
    """Mark which positions can influence the last one through n_layer windowed layers."""
    T = 40
    reach = {T - 1}
    for _ in range(n_layer):
        reach |= {j for i in reach for j in range(max(0, i - window + 1), i + 1)}
    assert recall.receptive_field(n_layer, window, T) == (T - 1) - min(reach)


def test_a_windowed_model_cannot_see_past_its_receptive_field():
    """Changing a token beyond n_layer·(W−1) leaves the query's logits unchanged; within, it may not."""
    task = recall.RecallTask(n_symbols=6, max_distance=12)
    config = GPTConfig(vocab_size=task.vocab_size, n_ctx=task.seq_len, n_layer=2, n_head=2, n_embd=16, window=3)
    params = init_params(config, seed=0)
    tokens, _, _ = task.batch(1, torch.Generator().manual_seed(0))
    edge = recall.receptive_field(2, 3, task.seq_len)  # 4
    q = task.seq_len - 1
    base = forward(params, tokens, config)[0, -1]
    far, near = tokens.clone(), tokens.clone()
    far[0, q - edge - 1] = (far[0, q - edge - 1] + 1) % task.n_symbols
    near[0, q - edge] = (near[0, q - edge] + 1) % task.n_symbols
    torch.testing.assert_close(forward(params, far, config)[0, -1], base)
    assert not torch.allclose(forward(params, near, config)[0, -1], base)


def test_measured_edge():
    assert recall.measured_edge([1.0, 0.9, 0.4, 0.9], 0.5) == 2
    assert recall.measured_edge([0.1, 1.0], 0.5) == 0
    assert recall.measured_edge([1.0, 1.0], 0.5) == 2


# --- efficiency measurements ---------------------------------------------------------------

@given(n_kv=st.sampled_from([1, 2, 4]), window=st.sampled_from([None, 4]))
def test_kv_bytes_per_token_matches_the_formula(n_kv, window):
    config = GPTConfig(vocab_size=32, n_ctx=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=n_kv, window=window)
    capacity = 16
    slots = capacity if window is None else min(window, capacity)
    expected = 2 * config.n_layer * n_kv * config.head_dim * 4 * slots / capacity
    assert kv_bytes_per_token(config, capacity) == expected


def test_decode_speed_runs_on_a_rolling_window_cache():
    config = GPTConfig(vocab_size=32, n_ctx=16, n_layer=2, n_head=2, n_embd=16, window=4)
    assert decode_tokens_per_s(config, context=12, batch=2, new_tokens=2, repeats=1) > 0


def test_parallel_table_is_read_cell_by_cell():
    text = "note\n\n| strategy | step s |\n|---|---|\n| ddp | 1.47 |\n| fsdp | 1.77 |\n\ntrailer"
    assert parse_markdown_table(text) == {"header": ["strategy", "step s"],
                                          "rows": [["ddp", "1.47"], ["fsdp", "1.77"]]}
