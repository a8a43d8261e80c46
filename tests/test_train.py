"""The training loop: learning, accumulation, clipping, schedule, exact resume, atomic
checkpoints, and one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import GPTConfig, init_params, load_checkpoint, loss_fn, tree
from fgpt.checkpoint import latest_checkpoint
from fgpt.errors import FgptError
from fgpt.parallel.single import SingleDevice
from fgpt.train import TrainConfig, lr_at, train
from run import train as run_train
from run._cli import main_guard
from run.train import expand_launcher_tokens, window_arg

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32)
TEXT = "".join(f"def add_{i % 7}(x):\n    return x + {i % 7}\n\n" for i in range(400))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    # One cache for the whole session, shared with subprocesses through the environment.
    cache = tmp_path_factory.getbasetemp() / "fgpt-cache"
    monkeypatch.setenv("FGPT_CACHE", str(cache))
    return cache


def tiny_run(text_file, **kw) -> TrainConfig:
    base = dict(model=TINY, data=str(text_file), steps=6, batch_size=4, lr=3e-3, warmup=2,
                seed=0, eval_interval=0, checkpoint_interval=0, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_falls(text_file, precision):
    result = train(tiny_run(text_file, steps=12, precision=precision))
    losses = [m["loss"] for m in result.metrics]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_grad_accumulation_matches_one_big_batch(text_file):
    whole = train(tiny_run(text_file, steps=2, batch_size=4, grad_accum=1))
    split = train(tiny_run(text_file, steps=2, batch_size=4, grad_accum=2))
    for a, b in zip(whole.metrics, split.metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
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


def test_launcher_tokens_and_window_lists():
    argv = ["--steps", "5", "strategy=custom-fsdp", "--lr", "1e-3", "nproc=2"]
    assert expand_launcher_tokens(argv) == ["--steps", "5", "--strategy", "custom-fsdp", "--lr",
                                            "1e-3", "--nproc", "2"]
    assert window_arg("64") == 64 and window_arg("64,64,none,64") == (64, 64, None, 64)


def run_cli_inprocess(args, capsys, monkeypatch) -> tuple[int, str]:
    """The entry point exactly as `python -m run.train` runs it, minus the process start."""
    monkeypatch.setattr(sys, "argv", ["run.train", "--no-progress", *args])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(run_train.main)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, stderr, msg):
    assert code == 2, (msg, stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (msg, stderr)


TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-ctx", "16", "--steps", "2"]


def test_bad_input_is_one_line_error(text_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    trained = tmp_path / "trained"
    train(tiny_run(text_file, out=str(trained), steps=1))
    cases = {
        "no such file": ["--data", str(tmp_path / "missing.txt")],
        "hold no text": ["--data", str(tmp_path / "empty.txt")],
        "too few for a context": ["--data", str(text_file), "--n-ctx", "100000"],
        "too few to fill a batch": ["--data", str(text_file), "--batch-size", "4096"],
        "does not split": ["--data", str(text_file), "--batch-size", "5", "--grad-accum", "2"],
        "no training checkpoint": ["--resume", "--out", str(tmp_path / "nothing")],
        "n_layer = 3 contradicts": ["--resume", "--out", str(trained), "--n-layer", "3"],
    }
    for i, (msg, args) in enumerate(cases.items()):
        if "--out" not in args:
            args = [*TINY_FLAGS, *args, "--out", str(tmp_path / f"out{i}")]
        assert_one_line_error(*run_cli_inprocess(args, capsys, monkeypatch), msg)


def test_bad_input_from_a_real_process(text_file, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    cases = {"binary": ["--data", str(tmp_path / "blob.bin")],
             "--steps must be": ["--data", str(text_file), "--steps", "0"]}
    procs = {msg: subprocess.Popen(
        [sys.executable, "-m", "run.train", *TINY_FLAGS, *args, "--out", str(tmp_path / msg)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        for msg, args in cases.items()}
    for msg, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert_one_line_error(proc.returncode, stderr, msg)


def test_sigint_finishes_the_step_checkpoints_and_resumes(text_file, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, "-m", "run.train", "--no-progress", *TINY_FLAGS, "--steps", "100000",
            "--data", str(text_file), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    done = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert done == metrics.read_text().count("\n") >= 2
    resumed = train(TrainConfig(out=str(out), resume=True, steps=100000, stop_after=done + 1,
                                progress=False, data=str(text_file), model=TINY))
    assert resumed.metrics[0]["step"] == done + 1


def test_launcher_runs_a_distributed_strategy_end_to_end(text_file, tmp_path):
    """`strategy=X nproc=N` as `just train` passes them: torchrun re-launch, checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "run.train", "strategy=custom-fsdp", *TINY_FLAGS, "nproc=2", "--steps", "2",
         "--data", str(text_file), "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    config, _ = load_checkpoint(out)
    assert config.n_layer == TINY.n_layer


def test_resume_continues_with_the_saved_strategy_or_another(text_file, tmp_path):
    """custom-fsdp on 2 ranks stops after step 2; `--resume` with no strategy continues it as
    custom-fsdp on 2 ranks; then one process (strategy single) finishes it. Every loss equals
    the uninterrupted single-device run's."""
    out = tmp_path / "run"
    settings = [*TINY_FLAGS, "--steps", "6", "--batch-size", "4", "--eval-interval", "0", "--data", str(text_file),
                "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["strategy=custom-fsdp", "nproc=2", "--stop-after", "2"], ["--resume", "--stop-after", "4"]):
        proc = subprocess.run([sys.executable, "-m", "run.train", *args, *settings], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert (state["strategy"], state["world_size"]) == ("custom-fsdp", 2)
    run = dict(model=TINY, steps=6, batch_size=4, eval_interval=0, data=str(text_file), progress=False)
    last = train(TrainConfig(**run, out=str(out), resume=True, strategy="single"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = train(TrainConfig(**run))
    assert [r["step"] for r in rows] == list(range(1, 7)) and last.step == 6
    assert [r["loss"] for r in rows] == pytest.approx([m["loss"] for m in reference.metrics], rel=1e-5)
    for name, p in tree.flatten(reference.params).items():
        torch.testing.assert_close(tree.flatten(last.params)[name], p, rtol=1e-4, atol=5e-5)


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_max_restarts_resumes_a_killed_run_from_its_last_checkpoint(text_file, tmp_path):
    """One rank SIGKILLed mid-run: torchrun restarts both, they resume from the last checkpoint,
    and the run logs the same losses as one that was never interrupted."""
    import signal
    import time
    out, steps = tmp_path / "run", 40
    settings = ["--steps", str(steps), "--batch-size", "4", "--eval-interval", "0", "--data", str(text_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "run.train", "strategy=custom-fsdp", "nproc=2", "--max-restarts", "1",
         *TINY_FLAGS, *settings, "--checkpoint-interval", "3", "--out", str(out), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 4) and time.time() < deadline:
        time.sleep(0.01)
    torchrun = children_of(proc.pid)
    workers = [w for t in torchrun for w in children_of(t)]
    assert len(workers) == 2, (torchrun, workers)
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr and "restart 1: resuming from step" in stderr, stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    reference = train(TrainConfig(model=TINY, steps=steps, batch_size=4, eval_interval=0,
                                  data=str(text_file), progress=False))
    for row, ref in zip(rows, reference.metrics):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), row["step"]


def test_a_restart_resumes_only_a_checkpoint_of_its_own_torchrun_job(text_file, tmp_path, monkeypatch):
    """--max-restarts auto-resume keys on torchrun's job id: a new job pointed at an old run's
    directory is refused as before, never silently continued."""
    out = str(tmp_path / "run")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    train(tiny_run(text_file, out=out, steps=2))
    assert run_train.saved_by_this_job(out)["step"] == 2
    for other in ("job-2", "none"):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", other)
        assert run_train.saved_by_this_job(out) is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert run_train.saved_by_this_job(out) is None


def test_torchrun_launch_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert_one_line_error(*run_cli_inprocess(["--strategy", "ddp", "--max-restarts", "2"], capsys, monkeypatch),
                          "torchrun's own option")
    assert_one_line_error(*run_cli_inprocess(["--strategy", "ddp"], capsys, monkeypatch), "pass --out DIR")


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


def test_cli_resume_of_a_run_with_the_default_model(text_file, tmp_path, capsys, monkeypatch):
    """`just train`, Ctrl-C, `--resume`: the default model is recorded as 'none given'."""
    out = str(tmp_path / "run")
    common = ["--data", str(text_file), "--batch-size", "2", "--eval-interval", "0", "--no-progress",
              "--out", out]
    code, err = run_cli_inprocess(["--steps", "2", "--stop-after", "1", *common], capsys, monkeypatch)
    assert code == 0 and "stopped at step 1" in err, err
    code, err = run_cli_inprocess(["--resume", *common], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert load_checkpoint(out)[0] == GPTConfig.preset("tiny")


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
