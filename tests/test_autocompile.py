"""--compile auto|on|off (fgpt/training/autocompile.py, fgpt/parallel/single.py): the estimate against
its formula, the stderr line, and a failing compiler that leaves the run eager with one
warning. Nothing here compiles for real: torch.compile is replaced by stand-ins."""

from __future__ import annotations

import sys

import pytest

from fgpt.parallel import single
from fgpt.training import autocompile
from fgpt.training.run_config import TrainConfig
from fgpt.training.train import train
from run import train as run_train
from run._cli import main_guard
from train_case import tiny_run


def decide(steps_left: int, *, strategy="single", recompute="none", precision="bf16", flops=None):
    flops = flops or autocompile.REFERENCE_FLOPS[precision]
    # step_flops / (EAGER_SHARE * flops) = 1 s of eager step
    return autocompile.choose(strategy=strategy, recompute=recompute, precision=precision, steps_left=steps_left,
                              step_flops=autocompile.EAGER_SHARE * flops, matmul_flops=lambda: flops)


@pytest.mark.parametrize("slower", [1, 4])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_compiles_exactly_when_the_saving_exceeds_the_compile(precision, slower):
    """On the reference machine, and on one whose matmul runs `slower` times slower (loaded):
    there the compile is expected to take as much longer; a 1-second step either way."""
    saving = autocompile.SAVING[precision]  # seconds saved per 1-second step
    flops = autocompile.REFERENCE_FLOPS[precision] / slower
    breakeven = autocompile.COMPILE_S * slower / saving
    decide_here = lambda steps, **kw: decide(steps, flops=flops, **kw)  # noqa: E731
    short, long = int(breakeven) - 1, int(breakeven) + 2
    assert not decide_here(short, precision=precision).on and decide_here(long, precision=precision).on
    assert decide_here(long, precision=precision).reason.startswith("--compile auto: on (")
    assert decide_here(short, precision=precision).reason.startswith("--compile auto: off (")
    assert "\n" not in decide_here(long, precision=precision).reason
    faster = decide(int(autocompile.COMPILE_S / saving) + 2, precision=precision,
                    flops=autocompile.REFERENCE_FLOPS[precision] * 4)  # a 1-second step on a faster matmul:
    assert faster.on  # the compile is not assumed any quicker


def test_other_strategies_and_recompute_stay_eager_without_measuring():
    def never():
        raise AssertionError("measured the matmul for a run that cannot compile")
    for kw in (dict(strategy="ddp"), dict(recompute="full")):
        d = autocompile.choose(precision="bf16", steps_left=10**9, step_flops=1e15, matmul_flops=never,
                               **{"strategy": "single", "recompute": "none", **kw})
        assert not d.on and "off" in d.reason


def losses(result) -> list[float]:
    return [row["loss"] for row in result.metrics]


@pytest.mark.slow  # training runs
@pytest.mark.parametrize("where", ["wrap", "first call"])
def test_a_failing_compiler_is_one_warning_and_the_run_continues_eagerly(text_file, monkeypatch, capsys, where):
    """torch.compile refusing at once (an unsupported Python), or the compiled function failing
    at its first call (no C++ compiler): one line, then the same losses as an eager run."""
    eager = losses(train(tiny_run(text_file, steps=3, compile="off")))
    capsys.readouterr()

    def broken_compile(fn, *a, **k):
        if where == "wrap":
            raise RuntimeError("torch.compile is not supported on this Python")

        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nsecond line")
        return compiled
    monkeypatch.setattr(single.torch, "compile", broken_compile)
    got = losses(train(tiny_run(text_file, steps=3, compile="on")))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "Traceback" not in err
    assert "second line" not in err
    assert got == eager


@pytest.mark.slow  # training runs
def test_auto_compiles_a_long_run_and_says_so(text_file, monkeypatch, capsys):
    """With the compile estimated free, auto turns compiling on (a stand-in that runs the same
    function is called); with it estimated dear, off. The run config keeps `auto`."""
    calls = []

    def fake_compile(fn, *a, **k):
        calls.append(fn)
        return fn
    monkeypatch.setattr(single.torch, "compile", fake_compile)
    monkeypatch.setattr(autocompile, "COMPILE_S", 0.0)
    train(tiny_run(text_file, steps=2, compile="auto"))
    assert len(calls) == 1
    assert capsys.readouterr().err.count("--compile auto: on (") == 1
    monkeypatch.setattr(autocompile, "COMPILE_S", 1e12)
    train(tiny_run(text_file, steps=2, compile="auto"))
    assert len(calls) == 1 and capsys.readouterr().err.count("--compile auto: off (") == 1


def test_cli_spellings_and_old_records():
    parse = lambda *a: run_train.build_config(run_train.parser().parse_args(list(a)))  # noqa: E731
    assert parse().compile == "auto"
    assert parse("--compile").compile == "on"
    assert parse("--compile", "off").compile == "off"
    for old, new in ((True, "on"), (False, "off")):  # train_state.pt written before --compile auto
        assert TrainConfig.from_dict({**TrainConfig().to_dict(), "compile": old}).compile == new


def test_bad_value_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run.train", "--compile", "sometimes"])
    with pytest.raises(SystemExit) as e:
        main_guard(run_train.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error:")
