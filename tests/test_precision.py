"""--precision auto: the choice follows the measured bf16/fp32 matmul speed, is recorded in
the run config, trains exactly as that precision given explicitly, and a resume keeps it."""

from __future__ import annotations

import pytest
import torch

from fgpt import GPTConfig, measure
from fgpt.errors import FgptError
from fgpt.training import precision
from fgpt.training.run_dir import saved_run
from fgpt.training.train import TrainConfig, train
from train_case import TEXT

TINY = GPTConfig(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "code.txt"
    data.write_text(TEXT)

    def config(**kw) -> TrainConfig:
        base = dict(model=TINY.replace(vocab_size=50257), data=str(data), steps=3, batch_size=2, lr=3e-3,
                    warmup=1, eval_interval=0, checkpoint_interval=0, progress=False)
        return TrainConfig(**{**base, **kw})
    return config


@pytest.mark.parametrize("speedup,expected", [(0.01, "fp32"), (1.1, "fp32"), (1.5, "bf16"), (6.0, "bf16")])
def test_auto_picks_bf16_only_when_its_matmul_is_measurably_faster(speedup, expected, monkeypatch):
    monkeypatch.setattr(precision, "measured_speedup", lambda device: speedup)
    assert precision.choose("cpu") == expected


@pytest.mark.parametrize("speedup", [0.5, 3.0])
def test_auto_records_the_choice_and_trains_as_that_precision_given_explicitly(speedup, run, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "measured_speedup", lambda device: speedup)
    chosen = precision.choose("cpu")
    auto = train(run(precision="auto", out=str(tmp_path / "auto")))
    assert saved_run(tmp_path / "auto")[0].precision == chosen
    explicit = train(run(precision=chosen))
    assert [m["loss"] for m in auto.metrics] == [m["loss"] for m in explicit.metrics]


def test_a_resume_under_auto_keeps_the_runs_own_precision(run, tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    train(run(precision="bf16", out=out, stop_after=2))
    monkeypatch.setattr(precision, "measured_speedup", lambda device: 0.01)  # auto would say fp32 now
    resumed = train(run(precision="auto", out=out, resume=True))
    assert saved_run(out)[0].precision == "bf16" and resumed.step == 3


# Synthetic matmul times (x a base time), warm-up first: each dtype's best round is neither
# its first nor (for fp32) its last, as on a machine whose load comes and goes.
R = precision._ROUNDS
FP32_FACTORS = [10.0, 1.5, 1.0] + [1.5] * (R - 2)
BF16_FACTORS = [10.0] + [1.2] * (R - 1) + [1.0]


@pytest.mark.parametrize("fp32_s, bf16_s, rounds", [(2.0, 1.0, R), (1.0, 1.5, R), (1.0, 1.1, R),
                                                     (1.0, 4.0, 1)])  # bf16 > 3x slower: one round only
def test_measured_speedup_is_the_ratio_of_the_best_times(fp32_s, bf16_s, rounds, monkeypatch):
    calls = {torch.float32: 0, torch.bfloat16: 0}

    def timer(device, dtype, n):
        def seconds():
            calls[dtype] += 1
            if dtype == torch.float32:
                return fp32_s * FP32_FACTORS[calls[dtype] - 1]
            return bf16_s * BF16_FACTORS[calls[dtype] - 1]
        return seconds
    monkeypatch.setattr(precision, "_matmul", timer)
    monkeypatch.setattr(measure, "best_time", lambda fn, repeats=3, **_: fn())  # a fake call's "seconds"
    precision.measured_speedup.cache_clear()
    try:
        speedup, chosen = precision.measured_speedup("cpu"), precision.choose("cpu")
    finally:
        precision.measured_speedup.cache_clear()  # later callers measure for real
    expected = fp32_s * min(FP32_FACTORS[1:rounds + 1]) / (bf16_s * min(BF16_FACTORS[1:rounds + 1]))
    assert speedup == pytest.approx(expected)
    assert calls == {torch.float32: 1 + rounds, torch.bfloat16: 1 + rounds}
    assert chosen == ("bf16" if expected >= precision.FASTER else "fp32")


def test_unknown_precision_is_refused():
    with pytest.raises(FgptError, match="--precision must be one of auto, fp32, bf16"):
        train(TrainConfig(model=TINY, precision="fp16", steps=1))
