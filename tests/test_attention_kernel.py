"""`--attention-kernel`: the causal attention kernel a training run measures (or is told) and
uses (fgpt/training/attention_kernel.py)."""

import math

import pytest
import torch

from fgpt import GPTConfig, attention
from fgpt.errors import FgptError
from fgpt.training import attention_kernel
from fgpt.training.train import train
from train_case import TINY, tiny_run

SMALL = ((2, 4, 32, 8), (2, 4, 32, 8))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def measurements(monkeypatch):
    """The timings replaced: the scores 2x as fast, every call counted."""
    calls = []

    def timings(*args):
        calls.append(args)
        return {"sdpa": 2.0, "scores": 1.0}
    monkeypatch.setattr(attention_kernel, "timings", timings)
    return calls


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32),  # fp32 keeps one kernel everywhere
    dict(device="meta"),  # not a CPU
    dict(dropout_p=0.1),  # the scores path has no dropout
    dict(shapes=((8, 12, 1024, 64), (8, 12, 1024, 64))),  # 604 MB of kept scores a layer
])
def test_only_candidates_that_can_win_are_measured(measurements, case):
    q_shape, k_shape = case.get("shapes", SMALL)
    kernel = attention_kernel.choose(q_shape, k_shape, case.get("dtype", torch.bfloat16),
                                     torch.device(case.get("device", "cpu")), case.get("dropout_p", 0.0))
    assert kernel == "sdpa" and measurements == []


def test_a_choice_is_measured_once_per_machine_and_shape(measurements):
    assert attention_kernel.choose(*SMALL, torch.bfloat16, "cpu") == "scores"
    assert attention_kernel.choose(*SMALL, torch.bfloat16, "cpu") == "scores"
    assert len(measurements) == 1
    attention_kernel.choose((1, 4, 32, 8), (1, 4, 32, 8), torch.bfloat16, "cpu")
    assert len(measurements) == 2


@pytest.mark.parametrize("sdpa, scores, picked", [(1.0, 0.5, "scores"), (1.0, 0.95, "sdpa"), (1.0, 1.5, "sdpa")])
def test_the_scores_must_win_by_the_margin(sdpa, scores, picked):
    assert attention_kernel.pick({"sdpa": sdpa, "scores": scores}) == picked


def test_both_kernels_are_timed_on_the_models_layout():
    """Real timings, on a small GQA shape (q, k, v as strided views of one projection)."""
    seconds = attention_kernel.timings((1, 4, 16, 8), (1, 2, 16, 8), torch.bfloat16, torch.device("cpu"))
    assert set(seconds) == set(attention.CAUSAL_KERNELS) and all(0 < t < math.inf for t in seconds.values())


def test_a_model_with_no_full_causal_layer_measures_nothing(measurements):
    windowed = GPTConfig(n_layer=2, n_head=2, n_embd=16, n_ctx=32, vocab_size=64, pos_emb="rope", window=8)
    assert attention_kernel.fastest(windowed, 2, 32, torch.bfloat16, "cpu") == "sdpa"
    assert measurements == []


@pytest.mark.parametrize("flag, measured, used", [("auto", "scores", True), ("auto", "sdpa", False),
                                                   ("scores", "sdpa", True), ("sdpa", "scores", False)])
def test_a_bf16_training_run_uses_its_kernel_and_only_during_the_run(text_file, monkeypatch, flag, measured, used):
    monkeypatch.setattr(attention_kernel, "timings", lambda *a: {"sdpa": 1.0, "scores": 1.0, measured: 0.1})
    calls = []
    monkeypatch.setattr(attention, "scores_causal_attention",
                        lambda *a: calls.append(1) or attention_kernel.CAUSAL_KERNELS["scores"](*a))
    train(tiny_run(text_file, precision="bf16", steps=2, attention_kernel=flag))
    assert bool(calls) == used
    assert attention._causal_kernels == {}  # nothing chosen outlives the run


def test_the_scores_kernel_trains_as_sdpa_does(text_file):
    """bf16 losses of the two kernels within bf16 rounding of each other."""
    losses = {kernel: torch.tensor([m["loss"] for m in train(
        tiny_run(text_file, precision="bf16", steps=4, attention_kernel=kernel)).metrics]) for kernel in ("scores", "sdpa")}
    torch.testing.assert_close(losses["scores"], losses["sdpa"], rtol=2e-2, atol=0)


def test_scores_with_attention_dropout_is_refused_in_one_line(text_file):
    with pytest.raises(FgptError, match="no attention dropout"):
        train(tiny_run(text_file, model=TINY.replace(dropout=0.1), precision="bf16", steps=1,
                       attention_kernel="scores"))


def test_an_unknown_kernel_is_refused(text_file):
    with pytest.raises(FgptError, match="--attention-kernel must be one of"):
        train(tiny_run(text_file, attention_kernel="flash"))
