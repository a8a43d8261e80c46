"""`python -m run.eval`: the JSON line it ends with, against transformers on the same tokens,
and its one-line refusals of bad input (exit 2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError
from hf_reference import hf_model
from run import eval as eval_cli
from run._cli import main_guard
from run.bench.eval import hf_guide_nll
from test_multiple_choice import hf_ending_logprob

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The café's naïve owner said: «bonjour» — then 日本語 and an emoji 🐕.\n"
        "def f(x):\n    return x ** 2  # squares\n") * 6


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory):
    """A tiny random GPT-2 over the real vocabulary, so real text can be scored."""
    model = hf_model(50257, 32, 1, 2, 16, init=0.3)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return model, path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run_inprocess(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: eval_cli.main(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.slow  # a subprocess
def test_perplexity_of_a_text_file_from_the_command_line(gpt2_vocab_model, text_file):
    model, ckpt = gpt2_vocab_model
    proc = subprocess.run([sys.executable, "-m", "run.eval", "--checkpoint", str(ckpt), "--data", str(text_file),
                           "--stride", "12", "--batch-size", "3", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert set(result) == {"loss", "ppl", "tokens", "bits_per_byte"}
    assert "perplexity" in proc.stderr  # the progress bar

    import torch
    tokens = gpt2_encoding().encode_ordinary(TEXT)
    nll, count = hf_guide_nll(model, torch.tensor(tokens), 32, 12)
    assert result["tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    first_token_bytes = len(gpt2_encoding().decode_single_token_bytes(tokens[0]))
    scored_bytes = len(TEXT.encode("utf-8")) - first_token_bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / scored_bytes, rel=1e-4)


def test_a_corpus_is_scored_on_its_validation_split(gpt2_vocab_model, tmp_path, monkeypatch, capsys):
    from fgpt.data import load_corpus
    import torch
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    corpus_dir = tmp_path / "docs"
    corpus_dir.mkdir()
    for i in range(30):
        (corpus_dir / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT[: 40 + 7 * i])
    model, ckpt = gpt2_vocab_model
    code, out, err = run_inprocess(["--checkpoint", str(ckpt), "--data", str(corpus_dir), "--n-ctx", "24",
                                    "--stride", "10"], capsys)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    val = [int(t) for t in load_corpus(str(corpus_dir), progress=False).val]
    nll, count = hf_guide_nll(model, torch.tensor(val), 24, 10)
    assert result["tokens"] == count == len(val) - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-4)
    # bytes: the validation documents' text, separators (<|endoftext|>) counting none
    enc = gpt2_encoding()
    assert enc.eot_token in val  # several documents
    text_bytes = sum(len(enc.decode_single_token_bytes(t)) for t in val[1:] if t != enc.eot_token)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-4)


def test_a_single_file_is_a_corpus_only_in_a_record_format(tmp_path, monkeypatch):
    from fgpt.data import VAL_FRACTION, is_val
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    docs = [f"Document {i}. " + TEXT[:40 + 7 * i] for i in range(30)]
    records = tmp_path / "docs.jsonl"
    records.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # a .jsonl file: its validation documents (named docs#<line>), joined by <|endoftext|>
    enc = gpt2_encoding()
    val = [d for i, d in enumerate(docs) if is_val(f"docs#{i}", VAL_FRACTION)]
    assert val
    expected = sum(([enc.eot_token] * bool(i) + enc.encode_ordinary(d) for i, d in enumerate(val)), [])
    assert np.asarray(eval_cli.load_tokens(str(records))).tolist() == expected
    renamed = tmp_path / "renamed.jsonl"  # the same documents under another field (--text-field)
    renamed.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    val = [d for i, d in enumerate(docs) if is_val(f"renamed#{i}", VAL_FRACTION)]
    expected = sum(([enc.eot_token] * bool(i) + enc.encode_ordinary(d) for i, d in enumerate(val)), [])
    assert np.asarray(eval_cli.load_tokens(str(renamed), "body")).tolist() == expected
    with pytest.raises(FgptError, match="no 'text' field .* choose one with --text-field"):
        eval_cli.load_tokens(str(renamed))
    as_text = tmp_path / "docs.json"  # not a record format: one text, scored whole
    as_text.write_text(records.read_text())
    assert np.asarray(eval_cli.load_tokens(str(as_text))).tolist() == enc.encode_ordinary(records.read_text())


def test_multiple_choice_from_the_command_line(gpt2_vocab_model, tmp_path, capsys):
    model, ckpt = gpt2_vocab_model
    rows = [{"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.",
             "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing."], "label": 3},
            {"ctx": "The cat", "endings": ["sat.", "flew over the moon and away"], "label": 0},
            {"ctx": "Numbers: 1, 2, 3,", "endings": ["4", "five", "cat"], "label": "0"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_inprocess(["--checkpoint", str(ckpt), "--task", "mc", "--data", str(path),
                                    "--batch-size", "2"], capsys)
    assert code == 0, err
    enc = gpt2_encoding()
    acc = acc_norm = 0
    for r in rows:
        endings = [enc.encode_ordinary(" " + e) for e in r["endings"]]
        sums = [hf_ending_logprob(model, enc.encode_ordinary(r["ctx"]), e) for e in endings]
        means = [s / len(e) for s, e in zip(sums, endings)]
        acc += sums.index(max(sums)) == int(r["label"])
        acc_norm += means.index(max(means)) == int(r["label"])
    assert json.loads(out.splitlines()[-1]) == {"acc": acc / 3, "acc_norm": acc_norm / 3, "n": 3}


@pytest.mark.parametrize("args, message", [
    (["--stride", "0"], "--stride must be between 1 and --n-ctx, got 0"),
    (["--stride", "-4"], "--stride must be between 1 and --n-ctx, got -4"),
    (["--n-ctx", "16", "--stride", "17"], r"--stride must be between 1 and --n-ctx \(16\), got 17"),
    (["--stride", "33"], r"--stride must be between 1 and --n-ctx \(32\)"),  # the model's n_ctx
    (["--n-ctx", "1"], "--n-ctx must be at least 2"),
    (["--n-ctx", "64"], "exceeds the model's n_ctx=32"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    (["--limit", "3"], "--limit applies to --task mc only"),
    (["--task", "mc", "--stride", "4", "--n-ctx", "8"], "--n-ctx, --stride: only for --task ppl"),
])
def test_bad_flags_are_one_line_errors(args, message, gpt2_vocab_model, text_file, capsys):
    _, ckpt = gpt2_vocab_model
    argv = ["--checkpoint", str(ckpt), "--data", str(text_file), *args]
    code, out, err = run_inprocess(argv, capsys)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("content, task, name, message", [
    (b"", "ppl", "data.txt", "the text has 0 token"),
    (b"a", "ppl", "data.txt", "the text has 1 token"),
    (b"\xff\xfe not utf-8", "ppl", "data.txt", "is not UTF-8 text"),
    (np.arange(300, dtype=np.uint16).tobytes(), "ppl", "train_000000.bin", "give the directory that holds them"),
    (b"", "mc", "data.jsonl", "holds no questions"),
    (b'{"ctx": "c", "endings": ["a", "b"], "label": 5}\n', "mc", "data.jsonl", "label 5 is out of range"),
    (b'{"ctx": "c", "label": 0}\n', "mc", "data.jsonl", "missing field endings"),
])
def test_bad_data_is_a_one_line_error(content, task, name, message, gpt2_vocab_model, tmp_path, capsys):
    _, ckpt = gpt2_vocab_model
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_inprocess(["--checkpoint", str(ckpt), "--task", task, "--data", str(path)], capsys)
    assert_one_line_error(code, err, message)


def test_missing_inputs_are_one_line_errors(gpt2_vocab_model, tmp_path, capsys):
    _, ckpt = gpt2_vocab_model
    code, _, err = run_inprocess(["--checkpoint", str(ckpt), "--task", "mc"], capsys)
    assert_one_line_error(code, err, "--task mc needs --data FILE.jsonl")
    code, _, err = run_inprocess(["--checkpoint", str(tmp_path / "nothing"), "--data", "x.txt"], capsys)
    assert_one_line_error(code, err, "checkpoint not found")


def assert_one_line_error(code, stderr, message):
    import re
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), stderr
    assert "Traceback" not in stderr
