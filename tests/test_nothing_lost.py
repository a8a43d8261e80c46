"""Nothing lost, whatever a user types: an output is never an input (prepare, convert,
train refuse it, --force or not), and a directory has one writer at a time (an OS lock
that a killed holder does not leave behind)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fgpt import init_params, save_checkpoint
from fgpt.outdir import LOCK_FILE
from run import prepare as run_prepare, train as run_train
from run._cli import main_guard
from train_case import ROOT, TINY

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-ctx", "16", "--steps", "1",
               "--batch-size", "2", "--eval-interval", "0", "--no-progress", "--precision", "fp32"]


def run_main(main, argv, capsys, monkeypatch) -> tuple[int, str]:
    """An entry point as `python -m` runs it, in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(main)
    return exit_info.value.code, capsys.readouterr().err


def one_error(code, stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, stderr)
    for f in fragments:
        assert f in lines[0], (f, stderr)
    return lines[0]


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# --- 1. an output is never an input -----------------------------------------------------------

def test_prepare_never_writes_over_or_into_its_source(tmp_path, capsys, monkeypatch):
    src = tmp_path / "v.jsonl"
    src.write_text('{"text": "hello there"}\n' * 20)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 50)
    (tmp_path / "link").symlink_to(corpus)
    monkeypatch.chdir(tmp_path)
    cases = [  # (--data, --val, --out, what the error says)
        (str(src), None, str(src), "is the input --data"),
        ("v.jsonl", None, "./sub/../v.jsonl", "is the input --data"),      # relative spellings
        (str(corpus), None, str(corpus), "is the input --data"),
        (str(corpus), None, str(tmp_path / "link"), "is the input --data"),  # a symlink to it
        (str(corpus), None, str(corpus / "prepared"), "lies inside the input --data"),
        (str(corpus / "a.txt"), None, str(corpus), "contains the input --data"),
        (str(tmp_path / "corpus" / "*.txt"), None, str(corpus), "contains the input --data"),
        (str(corpus), str(src), str(src), "is the input --val"),
    ]
    before = snapshot(tmp_path)
    for data, val, out, msg in cases:
        for force in ([], ["--force"]):
            argv = ["--data", data, "--out", out, "--quiet", *force, *(["--val", val] if val else [])]
            one_error(*run_main(run_prepare.main, argv, capsys, monkeypatch), msg)
            assert snapshot(tmp_path) == before, (data, out)


def test_convert_and_train_never_write_over_their_inputs(tmp_path, text_file, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, TINY, init_params(TINY))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "code.txt").write_text(text_file.read_text())
    before = snapshot(tmp_path)
    from run import convert as run_convert
    code, err = run_main(run_convert.main, ["--checkpoint", str(ckpt / "model.safetensors"), "--to-gqa", "1",
                                           "--out", str(ckpt), "--force"], capsys, monkeypatch)
    one_error(code, err, "contains the input --checkpoint")
    for argv, msg in [(["--data", str(data_dir), "--out", str(data_dir)], "is the input --data"),
                      (["--data", str(data_dir), "--out", str(data_dir / "run")], "lies inside the input --data"),
                      (["--data", str(data_dir / "code.txt"), "--out", str(data_dir)], "contains the input --data"),
                      (["--data", str(text_file), "--init-from", str(ckpt), "--out", str(ckpt / "ft")],
                       "lies inside the input --init-from")]:
        one_error(*run_main(run_train.main, [*TRAIN_FLAGS, *argv], capsys, monkeypatch), msg)
    assert snapshot(tmp_path) == before


# --- 2. one writer per directory --------------------------------------------------------------

def hold_lock(lock: Path) -> subprocess.Popen:
    """Another process holding `lock` as a writer would, until killed."""
    code = ("import sys, time\nfrom fgpt.outdir import exclusive\n"
            "with exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_train_has_one_writer_per_run_directory(tmp_path, text_file, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = hold_lock(out / LOCK_FILE)
    try:
        argv = [*TRAIN_FLAGS, "--data", str(text_file), "--out", str(out)]
        one_error(*run_main(run_train.main, argv, capsys, monkeypatch),
                  f"is being written by process {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        kill_9(holder)
    assert (out / LOCK_FILE).exists()  # a SIGKILL leaves the file, but not the lock
    code, err = run_main(run_train.main, argv, capsys, monkeypatch)
    assert code == 0, err
    assert (out / "metrics.jsonl").read_text().count("\n") == 1 and not (out / LOCK_FILE).exists()


def test_prepare_has_one_writer_per_output(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    out = tmp_path / "prepared"
    holder = hold_lock(tmp_path / ".prepared.lock")
    argv = ["--data", str(tmp_path / "a.txt"), "--out", str(out), "--quiet"]
    try:
        one_error(*run_main(run_prepare.main, argv, capsys, monkeypatch),
                  f"--out {out} is being written by process {holder.pid}")
        assert not out.exists()
    finally:
        kill_9(holder)
    code, err = run_main(run_prepare.main, argv, capsys, monkeypatch)
    assert code == 0, err
    assert (out / "manifest.json").exists()


@pytest.mark.slow  # a subprocess run
def test_the_study_has_one_writer_per_output(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    holder = hold_lock(out / LOCK_FILE)
    try:
        proc = subprocess.run([sys.executable, "-m", "run.report", "--quick", "--out", str(out)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        one_error(proc.returncode, proc.stderr, f"is being written by process {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        kill_9(holder)


# --- 3. the first int8 run says what it measures, and the next one reuses it ----------------------

@pytest.mark.slow  # a subprocess run
def test_the_first_int8_run_says_it_measures_and_where_it_caches(tmp_path):
    from fgpt import GPTConfig
    save_checkpoint(tmp_path / "m", GPTConfig(n_ctx=32, n_layer=1, n_head=2, n_embd=32), init_params(
        GPTConfig(n_ctx=32, n_layer=1, n_head=2, n_embd=32)))
    env = {**ENV, "FGPT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "run.generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi",
           "--max-new-tokens", "2", "--dtype", "int8", "--temperature", "0"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "cache" / "measured.json"
    said = [line for line in first.stderr.splitlines() if line.startswith("measuring")]
    assert said and all(str(cache) in line and "once per machine" in line for line in said), first.stderr
    assert any("int8 kernels" in line for line in said) or not __import__("fgpt.inference.int8").int8.FBGEMM_AVAILABLE
    assert cache.exists()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "measuring" not in second.stderr, second.stderr
    assert second.stdout == first.stdout


# --- 4. costs a user can see coming ----------------------------------------------------------------

def test_eval_says_how_many_tokens_it_will_score_before_scoring(tmp_path, capsys):
    import json
    from fgpt import GPTConfig
    from run import eval as run_eval
    config = GPTConfig(n_ctx=16, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "m", config, init_params(config))
    (tmp_path / "t.txt").write_text("one two three four five six seven. " * 12)
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: run_eval.main(["--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                                          "--batch-size", "2"]))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    result = json.loads(out.splitlines()[-1])  # the count it then scored: the reference
    lines = err.splitlines()
    [plan] = [i for i, line in enumerate(lines) if line.startswith("scoring ")]
    assert lines[plan].startswith(f"scoring {result['tokens']:,} tokens"), lines[plan]
    assert "about" in lines[plan] and "--max-tokens N" in lines[plan]
    assert plan < next(i for i, line in enumerate(lines) if line.startswith("scored "))


def test_generate_names_its_max_new_tokens_default(capsys):
    from run import generate as run_generate
    default = run_generate.parse_args(["--prompt", "x"]).max_new_tokens
    with pytest.raises(SystemExit):
        run_generate.parse_args(["--help"])
    assert f"(default {default})" in " ".join(capsys.readouterr().out.split())
    assert f"`--max-new-tokens` defaults to {default}" in (ROOT / "docs" / "inference.md").read_text()


# --- 5. misleading or silent cases ---------------------------------------------------------------

def test_sources_name_what_they_are(tmp_path, capsys, monkeypatch):
    """A FIFO is not 'no such file', UTF-16 is not 'binary', a UTF-8 BOM is read (and dropped)."""
    import codecs
    from fgpt.data.pipeline import encode
    from fgpt.data.shards import open_shards
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "u16.txt").write_text("hello in sixteen bits " * 20, encoding="utf-16")
    (tmp_path / "u16be.txt").write_bytes(("hello big end " * 20).encode("utf-16-be"))
    for name, msg in [("pipe", "not a regular file (a FIFO)"), ("u16.txt", "is UTF-16 text"),
                      ("u16be.txt", "is UTF-16 text")]:
        argv = ["--data", str(tmp_path / name), "--out", str(tmp_path / f"o-{name}"), "--quiet"]
        one_error(*run_main(run_prepare.main, argv, capsys, monkeypatch), msg)
        assert not (tmp_path / f"o-{name}").exists()
    body = "caf\u00e9 text with a byte-order mark. " * 30
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "a.txt").write_bytes(codecs.BOM_UTF8 + body.encode())
    (tmp_path / "bom" / "b.jsonl").write_bytes(codecs.BOM_UTF8 + ('{"text": "%s"}\n' % body).encode() * 2)
    argv = ["--data", str(tmp_path / "bom"), "--out", str(tmp_path / "p"), "--quiet", "--val-fraction", "0"]
    code, err = run_main(run_prepare.main, argv, capsys, monkeypatch)
    assert code == 0, err
    train, _, _ = open_shards(tmp_path / "p")
    expected = np.concatenate([encode(body), [50256], encode(body), [50256], encode(body)])
    np.testing.assert_array_equal(np.asarray(train[0:len(train)]), expected)  # tiktoken, no BOM token


def test_text_field_with_token_shards_and_mc_mistakes_are_one_line(tmp_path, text_file, capsys, monkeypatch):
    import json
    from run import eval as run_eval
    from fgpt import GPTConfig
    (tmp_path / "a.txt").write_text(text_file.read_text())
    code, err = run_main(run_prepare.main, ["--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "shards"),
                                            "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    config = GPTConfig(n_ctx=16, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "m", config, init_params(config))
    one_error(*run_main(run_train.main, [*TRAIN_FLAGS, "--data", str(tmp_path / "shards"), "--text-field", "body",
                                         "--out", str(tmp_path / "run")], capsys, monkeypatch),
              "--text-field body: --data", "holds token shards")
    assert not (tmp_path / "run").exists()
    ckpt = ["--checkpoint", str(tmp_path / "m")]
    one_error(*run_main(lambda: run_eval.main([*ckpt, "--data", str(tmp_path / "shards"), "--text-field", "body"]),
                        [], capsys, monkeypatch), "holds token shards")
    one_error(*run_main(lambda: run_eval.main([*ckpt, "--task", "mc", "--data", str(tmp_path)]), [], capsys,
                        monkeypatch), f"--data {tmp_path} is a directory")
    q = {"ctx": "The cat", "endings": ["sat down", "", "ran"], "label": 0}
    (tmp_path / "mc.jsonl").write_text(json.dumps(q) + "\n")
    one_error(*run_main(lambda: run_eval.main([*ckpt, "--task", "mc", "--data", str(tmp_path / "mc.jsonl")]), [],
                        capsys, monkeypatch), "mc.jsonl:1: ending 1 is empty")


def test_flags_are_named_one_at_a_time(tmp_path, text_file, capsys, monkeypatch):
    from run import generate as run_generate
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, TINY, init_params(TINY))
    line = one_error(*run_main(run_train.main, ["--data", str(text_file), "--init-from", str(ckpt), "--n-layer", "3",
                                                "--n-head", str(TINY.n_head), "--out", str(tmp_path / "run"),
                                                "--no-progress"], capsys, monkeypatch),
                     f"n_layer=3 (the checkpoint's: {TINY.n_layer})")
    assert "n_head" not in line  # the flag that agrees is not named
    line = one_error(*run_main(run_generate.main, ["--checkpoint", str(ckpt), "--prompt", "x", "--num-samples", "0"],
                               capsys, monkeypatch), "--num-samples must be at least 1")
    assert "--max-new-tokens" not in line


# --- 6. the default checkpoint is the newest training run ---------------------------------------

def test_the_default_checkpoint_is_the_newest_training_run(tmp_path, text_file, capsys, monkeypatch):
    from fgpt.training.train import train
    from run import generate as run_generate
    from train_case import tiny_run
    train(tiny_run(text_file, out=str(tmp_path / "out" / "run"), steps=1))
    converted = tmp_path / "out" / "converted"  # newer, but a run.convert output, not a run
    save_checkpoint(converted, TINY, init_params(TINY, seed=5))
    os.utime(converted / "model.safetensors", (time.time() + 60, time.time() + 60))
    monkeypatch.chdir(tmp_path)
    prompt = ["--prompt", "def add", "--max-new-tokens", "4", "--temperature", "0"]
    outputs = []
    for checkpoint in ([], ["--checkpoint", "out/run"]):  # the default, and the run named
        code, err = run_main(lambda: run_generate.main([*checkpoint, *prompt]), [], capsys, monkeypatch)
        assert code == 0, err
        outputs.append(err)
    assert f"no --checkpoint: using the newest training run, {Path('out') / 'run'}" in outputs[0]
    loaded = [line for line in outputs[0].splitlines() if line.startswith("loaded ")]
    assert loaded and loaded[0].startswith(f"loaded {Path('out') / 'run'} ")


# --- 7. an install that is right on any machine ----------------------------------------------------

def test_the_readme_install_is_cpu_gpu_venv_and_names_the_minimum_python():
    import re
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("<!-- section: install -->"):readme.index("<!-- /section: install -->")]
    [minimum] = re.findall(r'^requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert f"Python {minimum.removeprefix('>=')} or newer" in install
    [pin] = re.findall(r"torch==[\d.]+", (ROOT / ".ci" / "run").read_text())  # what CI installs
    assert f"pip install {pin} --index-url https://download.pytorch.org/whl/cpu" in install
    assert re.search(rf"^pip install {re.escape(pin)}$", install, re.M)  # the GPU (PyPI CUDA) line
    assert "python3 -m venv" in install
