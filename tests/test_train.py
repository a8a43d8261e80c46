"""The training loop: learning, accumulation, clipping, schedule, exact resume, atomic
checkpoints, and one-line errors for bad input. (The command line: test_train_cli.py.)"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import init_params, load_checkpoint, loss_fn, tree
from fgpt.checkpoint import latest_checkpoint
from fgpt.errors import FgptError
from fgpt.parallel.single import SingleDevice
from fgpt.training.metrics import measured_flops
from fgpt.training.train import TrainConfig, lr_at, train
from train_case import TINY, assert_reordered_losses_match, tiny_run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_falls(text_file, precision):
    result = train(tiny_run(text_file, steps=12, precision=precision))
    losses = [m["loss"] for m in result.metrics]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_grad_accumulation_matches_one_big_batch(text_file):
    whole = train(tiny_run(text_file, steps=2, batch_size=4, grad_accum=1))
    split = train(tiny_run(text_file, steps=2, batch_size=4, grad_accum=2))
    # two micro-batches against one batch: the same sums in another order
    assert_reordered_losses_match([m["loss"] for m in split.metrics], [m["loss"] for m in whole.metrics])
    for a, b in zip(whole.metrics, split.metrics):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam divides by sqrt(v): near-zero gradients amplify float noise, so compare the
    # parameters to a small fraction of one update (lr = 3e-3).
    for name, p in tree.flatten(whole.params).items():
        torch.testing.assert_close(tree.flatten(split.params)[name], p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_scales_grads_to_the_global_norm(max_norm):
    params = init_params(TINY, seed=1)
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    y = torch.randint(0, TINY.vocab_size, (2, 16))
    # Reference gradients by plain autograd on leaf tensors.
    leaves = tree.tree_map(lambda p: p.clone().requires_grad_(), params)
    loss_fn(leaves, x, y, TINY).backward()
    ref = {k: v.grad for k, v in tree.flatten(leaves).items()}
    ref_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref.values()))

    strategy = SingleDevice("cpu")
    strategy.setup(params, TINY, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), precision="fp32")
    strategy.forward_backward(x, y, scale=1.0, sync=True)
    assert strategy.clip_grad_norm(max_norm) == pytest.approx(ref_norm, rel=1e-5)
    factor = min(1.0, max_norm / ref_norm)
    for name, p in strategy.named.items():
        torch.testing.assert_close(p.grad, ref[name] * factor, rtol=1e-4, atol=1e-9)


def test_weight_decay_only_on_matrices():
    strategy = SingleDevice("cpu")
    strategy.setup(init_params(TINY), TINY, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), precision="fp32")
    for group in strategy.optimizer.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(g["params"]) for g in strategy.optimizer.param_groups) == len(strategy.named)


@given(warmup=st.integers(1, 10), rest=st.integers(1, 40), lr=st.floats(1e-5, 1.0),
       floor=st.floats(0.0, 0.5))
@settings(max_examples=20)
def test_schedule_matches_torch_warmup_then_cosine(warmup, rest, lr, floor):
    total, min_lr = warmup + rest + 1, lr * floor
    # Independent reference: torch's own schedulers, linear warmup then cosine annealing.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=max(1, warmup - 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rest, eta_min=min_lr)], milestones=[warmup])
    for step in range(total):
        ours = lr_at(step, lr=lr, min_lr=min_lr, warmup=warmup, total=total)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
        opt.step()
        sched.step()
    assert lr_at(total - 1, lr=lr, min_lr=min_lr, warmup=warmup, total=total) == pytest.approx(min_lr)


def test_the_loop_applies_the_schedule(text_file):
    result = train(tiny_run(text_file, steps=5, warmup=2, lr=1e-2, min_lr=1e-3))
    expected = [lr_at(s, lr=1e-2, min_lr=1e-3, warmup=2, total=5) for s in range(5)]
    assert [m["lr"] for m in result.metrics] == pytest.approx(expected)


def test_resume_continues_bit_for_bit(text_file, tmp_path):
    straight = train(tiny_run(text_file, out=str(tmp_path / "a"), eval_interval=3))
    first = train(tiny_run(text_file, out=str(tmp_path / "b"), eval_interval=3, stop_after=3))
    assert first.interrupted and first.step == 3
    second = train(tiny_run(text_file, out=str(tmp_path / "b"), eval_interval=3, resume=True))
    assert [m["loss"] for m in first.metrics + second.metrics] == [m["loss"] for m in straight.metrics]
    for name, p in tree.flatten(straight.params).items():
        assert torch.equal(tree.flatten(second.params)[name], p)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["val_loss"] for r in rows if "val_loss" in r] == \
        [m["val_loss"] for m in straight.metrics if "val_loss" in m]
    # What was written loads as an ordinary checkpoint.
    config, params = load_checkpoint(tmp_path / "b")
    assert config == TINY and torch.equal(params["wte"]["weight"], straight.params["wte"]["weight"])
    assert latest_checkpoint(tmp_path) == tmp_path / "b"  # the run, not its checkpoints/step-6


def test_resume_with_dropout_continues_bit_for_bit(text_file, tmp_path):
    """Dropout draws from torch's global RNG, whose state every checkpoint saves; nothing else
    in the loop may draw from it. Each call probes the device's speed as a fresh process does."""
    runs = []
    for kw in ({"out": str(tmp_path / "a")}, {"out": str(tmp_path / "b"), "stop_after": 3},
               {"out": str(tmp_path / "b"), "resume": True}):
        measured_flops.cache_clear()
        runs.append(train(tiny_run(text_file, model=TINY.replace(dropout=0.1), **kw)))
    straight, first, second = runs
    assert [m["loss"] for m in first.metrics + second.metrics] == [m["loss"] for m in straight.metrics]


def test_crash_mid_write_leaves_the_last_checkpoint(text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_run(text_file, out=str(out), steps=2))
    _, before = load_checkpoint(out)
    import fgpt.checkpoint

    def crash(tensors, filename, **kw):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(fgpt.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_run(text_file, out=str(out), steps=4, resume=True))
    monkeypatch.undo()
    _, after = load_checkpoint(out)
    for name, p in tree.flatten(before).items():
        assert torch.equal(tree.flatten(after)[name], p)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # Step 4's optimizer file landed before the crash, uncommitted: resume ignores it and
    # continues from step 2 exactly as a run that never crashed.
    resumed = train(tiny_run(text_file, out=str(out), steps=4, resume=True))
    straight = train(tiny_run(text_file, steps=4))
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics[2:]]
    assert os.listdir(out / "checkpoints") == ["step-4"]


def test_resume_of_an_older_optimizer_layout_is_a_one_line_error(text_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_run(text_file, out=str(out), steps=2))
    rank_file = next((out / "checkpoints").glob("step-*/optimizer.rank0.pt"))
    saved = torch.load(rank_file, weights_only=True)
    saved["optimizer"] = {"state": {}, "param_groups": []}  # torch's own state_dict, as fgpt once saved
    torch.save(saved, rank_file)
    with pytest.raises(FgptError, match="older fgpt") as e:
        train(tiny_run(text_file, out=str(out), steps=4, resume=True))
    assert "\n" not in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = SingleDevice.forward_backward
    calls = []

    def poisoned(self, *a, **k):
        calls.append(1)
        loss = real(self, *a, **k)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(SingleDevice, "forward_backward", poisoned)
    with pytest.raises(FgptError, match="loss is nan at step 3"):
        train(tiny_run(text_file, out=str(out), checkpoint_interval=1))
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert load_checkpoint(out)[0] == TINY
    calls.clear()  # a run that fails before its first checkpoint says it has none
    with pytest.raises(FgptError, match="loss is nan at step 3: training stopped; no checkpoint had been written"):
        train(tiny_run(text_file, out=str(tmp_path / "fresh"), checkpoint_interval=0))


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(text_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_run(text_file, out=str(out), stop_after=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1')  # the kill came mid-write
    train(tiny_run(text_file, out=str(out), resume=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path`, from /proc/self/maps."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_resumed_optimizer_state_does_not_live_in_the_mapped_checkpoint_file(tmp_path):
    """Rank files are memory-mapped on resume; the live AdamW state must be copied out, or a
    later save's removal of that step directory would keep its disk blocks for the run."""
    from fgpt.parallel.optimizer_state import SavedOptimizer
    first = SingleDevice()
    first.setup(init_params(TINY), TINY, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), precision="fp32")
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    first.forward_backward(x, x, scale=1.0, sync=True)
    first.step()
    path = tmp_path / "optimizer.rank0.pt"
    torch.save(first.optimizer_state(), path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    second = SingleDevice()
    second.setup(init_params(TINY), TINY, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), precision="fp32")
    second.load_optimizer_state(SavedOptimizer(1, lambda q: mapped))
    ranges = mapped_ranges(path)
    assert ranges  # the file is mapped
    for state in second.optimizer.state.values():
        for t in state.values():
            assert not any(lo <= t.data_ptr() < hi for lo, hi in ranges)


@given(warmup=st.integers(0, 5), stable=st.integers(0, 30), decay=st.integers(1, 20), lr=st.floats(1e-5, 1.0))
def test_wsd_schedule_is_constant_then_decays_linearly_to_the_floor(warmup, stable, decay, lr):
    total = warmup + stable + decay
    cooldown = decay / total
    rates = [lr_at(s, lr=lr, min_lr=lr / 10, warmup=warmup, total=total, schedule="wsd", cooldown=cooldown)
             for s in range(total)]
    start = total - round(cooldown * total)
    assert all(r == lr for r in rates[warmup:start])  # flat: mid-run evaluations share one lr
    assert rates[-1] == pytest.approx(lr / 10)
    tail = rates[max(start, warmup):]
    assert all(a >= b for a, b in zip(tail, tail[1:]))


def test_resume_with_precision_auto_keeps_the_saved_choice():
    from fgpt.training.run_config import resumed
    saved = TrainConfig(model=TINY, precision="bf16", steps=6)
    assert resumed(TrainConfig(precision="auto", steps=6), saved, TINY).precision == "bf16"
    with pytest.raises(FgptError, match="precision = 'fp32' contradicts"):
        resumed(TrainConfig(precision="fp32", steps=6), saved, TINY)
