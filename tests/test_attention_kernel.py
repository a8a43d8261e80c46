"""The causal attention kernel a training run measures and uses (fgpt/training/attention_kernel.py)."""

import pytest
import torch

from fgpt import GPTConfig, attention
from fgpt.training import attention_kernel
from fgpt.training.train import train
from train_case import TINY, tiny_run

SMALL = ((2, 4, 32, 8), (2, 4, 32, 8))


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """A private machine cache and the kernel memo as it was."""
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    saved = dict(attention._causal_kernels)
    yield
    attention._causal_kernels.clear()
    attention._causal_kernels.update(saved)


@pytest.fixture
def measurements(monkeypatch):
    calls = []

    def measure(*args):
        calls.append(args)
        return "scores"
    monkeypatch.setattr(attention_kernel, "_measure", measure)
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
    assert attention_kernel.choose(*SMALL, torch.bfloat16, torch.device("cpu")) == "scores"
    assert attention_kernel.choose(*SMALL, torch.bfloat16, torch.device("cpu")) == "scores"
    assert len(measurements) == 1
    attention_kernel.choose((1, 4, 32, 8), (1, 4, 32, 8), torch.bfloat16, torch.device("cpu"))
    assert len(measurements) == 2


def test_the_measurement_picks_one_of_the_kernels():
    """The real timing, on a small GQA shape: whichever wins, it names a kernel."""
    assert attention_kernel._measure((1, 4, 16, 8), (1, 2, 16, 8), torch.bfloat16, torch.device("cpu")) \
        in attention.CAUSAL_KERNELS


def test_use_fastest_registers_the_agreed_kernel_for_the_step_shapes(measurements):
    config = TINY
    kernel = attention_kernel.use_fastest(config, 3, 32, torch.bfloat16, "cpu", agree=lambda k: "sdpa")
    assert kernel == "sdpa"  # the ranks' vote overrides this rank's measurement
    key = attention.causal_key((3, config.n_head, 32, config.head_dim), (3, config.kv_heads, 32, config.head_dim),
                               torch.bfloat16, "cpu")
    assert attention._causal_kernels[key] == "sdpa"
    assert attention_kernel.use_fastest(config, 3, 32, torch.bfloat16, "cpu") == "scores"
    assert attention._causal_kernels[key] == "scores"


def test_a_model_with_no_full_causal_layer_measures_nothing(measurements):
    windowed = GPTConfig(n_layer=2, n_head=2, n_embd=16, n_ctx=32, vocab_size=64, pos_emb="rope", window=8)
    assert attention_kernel.use_fastest(windowed, 2, 32, torch.bfloat16, "cpu") == "sdpa"
    assert measurements == []


@pytest.mark.parametrize("kernel", ["scores", "sdpa"])
def test_a_bf16_training_run_uses_the_chosen_kernel(text_file, monkeypatch, kernel):
    """A run whose measurement picks a kernel runs its steps with that kernel, and the
    scores kernel trains as SDPA does (bf16 losses within bf16 rounding)."""
    monkeypatch.setattr(attention_kernel, "_measure", lambda *a: kernel)
    used = []
    monkeypatch.setattr(attention, "scores_causal_attention",
                        lambda *a: used.append(1) or attention_kernel.scores_causal_attention(*a))
    losses = [m["loss"] for m in train(tiny_run(text_file, precision="bf16", steps=4)).metrics]
    assert bool(used) == (kernel == "scores")
    if kernel == "sdpa":
        return
    monkeypatch.setattr(attention_kernel, "_measure", lambda *a: "sdpa")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(
        [m["loss"] for m in train(tiny_run(text_file, precision="bf16", steps=4)).metrics]), rtol=2e-2, atol=0)
