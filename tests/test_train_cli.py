"""`python -m run.train` as a user runs it: flag parsing, one-line errors before any rank
starts, signals, the torchrun re-launch, strategy changes on resume and restarts after a
killed rank. (The loop itself: test_train.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fgpt import GPTConfig, init_params, load_checkpoint, tree
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.training import run_dir
from fgpt.training.train import TrainConfig, train
from run import train as run_train
from run._cli import main_guard
from run.train import expand_launcher_tokens, window_arg
from helpers import assert_same_tree, children_of
from train_case import ROOT, TINY, assert_reordered_losses_match, tiny_run

pytestmark = pytest.mark.slow  # subprocess and torchrun launches: `just test-fast` leaves it out



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


# fp32 explicitly: the command line's default, auto, picks bf16 on a CPU whose bf16 matmul is faster,
# and the references below are fp32 runs
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-ctx", "16", "--steps", "2",
              "--precision", "fp32"]


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
        "--stop-after 1: the run is already at step 1": ["--resume", "--out", str(trained), "--steps", "3",
                                                         "--stop-after", "1"],
        "--lr must be positive and finite, got inf": ["--data", str(text_file), "--lr", "inf"],
        "--weight-decay must be at least 0 and finite, got nan": ["--data", str(text_file), "--weight-decay", "nan"],
        "--grad-clip must be at least 0 (0: no clipping), got -1.0": ["--data", str(text_file), "--grad-clip", "-1"],
        "--seed must be in [0, 2**63), got -1": ["--data", str(text_file), "--seed", "-1"],
        "--seed must be in [0, 2**63), got 99999999999999999999": ["--data", str(text_file), "--seed",
                                                                   "99999999999999999999"],
    }
    for i, (msg, args) in enumerate(cases.items()):
        if "--out" not in args:
            args = [*TINY_FLAGS, *args, "--out", str(tmp_path / f"out{i}")]
        assert_one_line_error(*run_cli_inprocess(args, capsys, monkeypatch), msg)


def test_a_fresh_run_never_writes_over_a_checkpoint_or_reads_a_damaged_state(text_file, tmp_path, capsys,
                                                                              monkeypatch):
    """--out naming a checkpoint folder (an --init-from's own, say) is refused with its files
    unchanged; a truncated train_state.pt is one line naming it, on resume and on a fresh run."""
    from fgpt.checkpoint import save_checkpoint
    hf = tmp_path / "hf"
    save_checkpoint(hf, TINY, init_params(TINY))
    before = {f: (hf / f).read_bytes() for f in ("model.safetensors", "config.json")}
    clash = "already holds a checkpoint (model.safetensors, config.json)"
    for args, msg in ((["--init-from", str(hf), "--out", str(hf)], f"is the input --init-from {hf}"),
                      ([*TINY_FLAGS, "--out", str(hf)], clash)):
        flags = ["--data", str(text_file), "--steps", "1", *args]
        assert_one_line_error(*run_cli_inprocess(flags, capsys, monkeypatch), msg)
    assert {f: (hf / f).read_bytes() for f in before} == before
    trained = tmp_path / "trained"
    train(tiny_run(text_file, out=str(trained), steps=1))
    state = trained / run_dir.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    for args in (["--resume", "--out", str(trained), "--steps", "2"], [*TINY_FLAGS, "--out", str(trained)]):
        assert_one_line_error(*run_cli_inprocess(["--data", str(text_file), *args], capsys, monkeypatch),
                              f"{state} is damaged or not a file torch saved")


def test_a_run_given_a_relative_data_path_resumes_from_anywhere(text_file, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.chdir(text_file.parent)
    args = [*TINY_FLAGS, "--data", text_file.name, "--out", out, "--stop-after", "1", "--eval-interval", "0"]
    assert run_cli_inprocess(args, capsys, monkeypatch)[0] == 0
    assert run_dir.saved_run(out)[0].data == str(text_file)  # recorded absolute
    monkeypatch.chdir(tmp_path)
    code, err = run_cli_inprocess(["--resume", "--out", out], capsys, monkeypatch)
    assert code == 0, err
    same_file = f"{text_file.parent}/./{text_file.name}"  # spelled otherwise: not a contradiction
    code, err = run_cli_inprocess(["--resume", "--out", out, "--steps", "3", "--data", same_file], capsys, monkeypatch)
    assert code == 0, err
    assert run_dir.train_state(out)["step"] == 3


def test_text_field_names_the_jsonl_field_to_train_on(tmp_path, capsys, monkeypatch):
    """--text-field reaches the tokeniser: the run trains on the named field's documents, a
    missing field is a one-line error that names the flag, and a resume keeps the field."""
    from fgpt import data
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    docs = [f"def f_{i}(x):\n    return x * {i}\n" * 4 for i in range(60)]
    records = tmp_path / "docs.jsonl"
    records.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "run"
    args = [*TINY_FLAGS, "--data", str(records), "--out", str(out), "--batch-size", "2", "--eval-interval", "0"]
    assert_one_line_error(*run_cli_inprocess(args, capsys, monkeypatch), "no 'text' field (its fields: id, body)")
    code, err = run_cli_inprocess([*args, "--text-field", "body"], capsys, monkeypatch)
    assert code == 0, err
    corpus = data.load_corpus(str(records), text_field="body", progress=False)  # the run's cache
    text = gpt2_encoding().decode([int(t) for t in [*corpus.train, *corpus.val]])
    assert "return x * 7\n" in text and '"body"' not in text and '"id"' not in text  # the field, not the JSON
    saved, _ = run_dir.saved_run(str(out))
    assert saved.text_field == "body"
    resume = ["--resume", "--out", str(out), "--steps", "3", "--text-field", "id"]
    assert_one_line_error(*run_cli_inprocess(resume, capsys, monkeypatch), "text_field = 'id' contradicts")


def test_bad_input_to_a_distributed_run_fails_before_any_rank_starts(text_file, tmp_path, capsys, monkeypatch):
    """The launcher checks every flag, the run directory and the data itself: a bad one is
    one line from it, not an error from each rank and torchrun's traceback."""
    monkeypatch.setattr(run_train, "relaunch", lambda *a: pytest.fail("ranks were started"))
    trained = tmp_path / "trained"
    train(tiny_run(text_file, out=str(trained), steps=1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = {
        "invalid choice: 'bogus'": ["strategy=bogus"],
        "invalid int value: 'two'": ["strategy=ddp", "nproc=two"],
        "nproc must be at least 1": ["strategy=ddp", "nproc=0"],
        "on each of 2 ranks": ["strategy=ddp", "nproc=2", "--batch-size", "6", "--grad-accum", "2"],
        "invalid choice: 'fp16'": ["strategy=custom-fsdp", "--precision", "fp16"],
        "invalid choice: 'step'": ["strategy=fsdp", "--schedule", "step"],
        "--cooldown must be": ["strategy=fsdp", "--schedule", "wsd", "--cooldown", "0"],
        "strategy=single reduces no gradients": ["--reduce-dtype", "bf16"],
        **({} if gpus else {"allows only on CUDA with NCCL": ["strategy=ddp", "--reduce-dtype", "bf16"]}),
        ("CUDA devices" if gpus else "no CUDA device"): ["strategy=ddp", f"nproc={gpus + 1}", "--device", "cuda"],
        "n_embd (32) must be divisible by n_head (3)": ["strategy=ddp", "--n-head", "3"],
        "no such file": ["strategy=ddp", "--data", str(tmp_path / "missing.txt")],
        "too few for a context": ["strategy=ddp", "--n-ctx", "100000"],
        "already holds a run": ["strategy=ddp", "--out", str(trained)],
        "n_layer = 3 contradicts": ["strategy=ddp", "--resume", "--out", str(trained), "--n-layer", "3"],
    }
    for i, (msg, args) in enumerate(cases.items()):
        flags = [*TINY_FLAGS, "--data", str(text_file), *args]
        flags += [] if "--out" in args else ["--out", str(tmp_path / f"out{i}")]
        assert_one_line_error(*run_cli_inprocess(flags, capsys, monkeypatch), msg)


def test_bad_input_from_a_real_process(text_file, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    cases = {"binary": ["--data", str(tmp_path / "blob.bin")],
             "--steps must be": ["--data", str(text_file), "--steps", "0"],
             # as `just train strategy=bogus` runs it: refused before torchrun starts
             "invalid choice: 'bogus'": ["strategy=bogus", "--data", str(text_file)],
             "on each of 2 ranks": ["strategy=ddp", "--batch-size", "3", "--data", str(text_file)]}
    procs = {msg: subprocess.Popen(
        [sys.executable, "-m", "run.train", *TINY_FLAGS, *args, "--out", str(tmp_path / f"out{i}")], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        for i, (msg, args) in enumerate(cases.items())}
    for msg, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert_one_line_error(proc.returncode, stderr, msg)


def test_an_error_inside_the_ranks_ends_without_torchruns_traceback(text_file, tmp_path):
    """Bad input only the ranks can see (a loss that turns NaN mid-run): each rank's one-line
    error, then exit 2 from the launcher, not torchrun's ChildFailedError traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "run.train", "strategy=ddp", "nproc=2", *TINY_FLAGS, "--steps", "20",
         "--lr", "1e6", "--batch-size", "4", "--eval-interval", "0", "--data", str(text_file),
         "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: loss is nan at step" in proc.stderr, proc.stderr[-3000:]


def test_sigint_finishes_the_step_checkpoints_and_resumes(text_file, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, "-m", "run.train", "--no-progress", *TINY_FLAGS, "--steps", "100000",
            "--data", str(text_file), "--out", str(out), "--compile", "off"]  # auto would compile 100000 steps
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
    # the command line's --precision is auto (bf16 on a CPU whose bf16 matmul is faster), which
    # a resume under auto keeps
    resumed = train(TrainConfig(out=str(out), resume=True, steps=100000, stop_after=done + 1, precision="auto",
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
    # ranks of half a batch (one thread each under torchrun) against the whole batch: reordered sums
    assert_reordered_losses_match([r["loss"] for r in rows], [m["loss"] for m in reference.metrics])
    for name, p in tree.flatten(reference.params).items():
        torch.testing.assert_close(tree.flatten(last.params)[name], p, rtol=1e-4, atol=5e-5)


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
    # ranks of half a batch (one thread each under torchrun) against the whole batch: reordered sums
    assert_reordered_losses_match([r["loss"] for r in rows], [m["loss"] for m in reference.metrics])


def test_a_restart_resumes_only_a_checkpoint_of_its_own_torchrun_job(text_file, tmp_path, monkeypatch):
    """--max-restarts auto-resume keys on torchrun's job id: a new job pointed at an old run's
    directory is refused as before, never silently continued."""
    out = str(tmp_path / "run")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    train(tiny_run(text_file, out=out, steps=2))
    assert run_dir.saved_by_this_job(out)["step"] == 2
    for other in ("job-2", "none"):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", other)
        assert run_dir.saved_by_this_job(out) is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert run_dir.saved_by_this_job(out) is None


def test_torchrun_launch_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert_one_line_error(*run_cli_inprocess(["--strategy", "ddp", "--max-restarts", "2"], capsys, monkeypatch),
                          "torchrun's own option")
    assert_one_line_error(*run_cli_inprocess(["--strategy", "ddp"], capsys, monkeypatch), "pass --out DIR")


def test_cli_resume_of_a_run_with_the_default_model(text_file, tmp_path, capsys, monkeypatch):
    """`just train`, Ctrl-C, `--resume`: the default model is recorded as 'none given'."""
    out = str(tmp_path / "run")
    common = ["--data", str(text_file), "--batch-size", "2", "--eval-interval", "0", "--no-progress",
              "--out", out]
    code, err = run_cli_inprocess(["--steps", "2", "--stop-after", "1", *common], capsys, monkeypatch)
    assert code == 0 and "stopped at step 1" in err, err
    assert_one_line_error(*run_cli_inprocess(["--resume", "--n-layer", "3", *common], capsys, monkeypatch),
                          "n_layer = 3 contradicts the checkpoint's 4")
    code, err = run_cli_inprocess(["--resume", *common], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert load_checkpoint(out)[0] == GPTConfig.preset("tiny")



def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_weights_bit_for_bit(text_file, tmp_path):
    """SIGKILL at random moments of a run (mid-step, mid-checkpoint, mid-metrics line), then
    `--resume` (or, killed before its first checkpoint, the same command afresh), until it
    finishes: its weights and losses equal an uninterrupted run's bit for bit. Single device,
    fp32, one thread in every process: nothing differs between the two, so nothing may."""
    import random
    import signal
    import time
    steps = 10
    flags = [*TINY_FLAGS, "--steps", str(steps), "--batch-size", "4", "--eval-interval", "0",
             "--checkpoint-interval", "1", "--data", str(text_file), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = lambda out, *extra: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "run.train", *flags, "--out", str(out), *extra], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = train(TrainConfig(model=TINY, steps=steps, batch_size=4, eval_interval=0, precision="fp32",
                                     data=str(text_file), progress=False))
    finally:
        torch.set_num_threads(threads)

    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    metrics = out / "metrics.jsonl"
    for _ in range(20):  # each round makes progress or finishes: bounded
        done = run_dir.train_state(out)["step"] if (out / run_dir.STATE_FILE).exists() else 0
        proc = start(out, *(["--resume"] if done else []))
        # kill once a random later step has begun, a random fraction of a step into it
        target, deadline = rng.randint(done, steps - 1), time.time() + 120
        while proc.poll() is None and time.time() < deadline and (
                not metrics.exists() or metrics.read_text().count("\n") < target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None and kills < 4:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=240) in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
        if proc.returncode == 0:
            break
    assert kills >= 2 and proc.returncode == 0
    assert metrics.read_text().count("\n") == steps
    assert_same_tree(load_checkpoint(out)[1], straight.params)
    assert [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] == \
        [m["loss"] for m in straight.metrics]
