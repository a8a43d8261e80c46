"""`python -m run.probe`: each section against an independent computation on the same tokens
(run.eval, run.convert + run.eval, fgpt.evaluation.perplexity's windows, a sliding strided evaluation),
and its one-line refusals of bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fgpt import GPTConfig, init_params, load_checkpoint, save_checkpoint
from fgpt.data.sources import stdlib_files
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.evaluation.perplexity import Window, strided_nll, window_nlls
from fgpt.evaluation.probe import ProbeOptions, run_probe
from fgpt.evaluation.probe_report import write_outputs
from fgpt.report import probes
from hf_reference import hf_model
from run import convert as convert_cli, eval as eval_cli, probe as probe_cli
from run._cli import main_guard

FAST = dict(decode_tokens=2, decode_runs=1, context_targets=6, prompts=1, new_tokens=4, resamples=200)


def _text(n_chars: int) -> str:
    files = sorted(stdlib_files(), key=lambda f: f.name)
    return "".join(open(f.path, encoding="utf-8", errors="replace").read() for f in files[:3])[:n_chars]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(_text(6000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rope_ckpt(tmp_path_factory):
    """A random rotary model with a wide init, so attention (and so a window) matters."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, n_ctx=32, pos_emb="rope")
    params = init_params(config, seed=1)
    for block in params["h"]:
        block["attn"]["c_attn"]["weight"] *= 10
    path = tmp_path_factory.mktemp("rope")
    save_checkpoint(path, config, params)
    return path


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A tiny random GPT-2 (learned positions) written by transformers."""
    path = tmp_path_factory.mktemp("gpt2")
    hf_model(50257, 32, 2, 4, 32, init=0.3).save_pretrained(path)
    return path


def run_cli(module, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: module.main(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def eval_loss(ckpt, data, capsys, *extra) -> dict:
    code, out, err = run_cli(eval_cli, ["--checkpoint", str(ckpt), "--data", str(data), *extra], capsys)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def tokens_of(path) -> np.ndarray:
    return np.asarray(gpt2_encoding().encode_ordinary(path.read_text(encoding="utf-8")), dtype=np.int64)


def test_context_and_window_curves_equal_direct_evaluations(rope_ckpt, text_file, tmp_path, capsys):
    config, params = load_checkpoint(rope_ckpt)
    tokens = tokens_of(text_file)[:300]
    opts = ProbeOptions(settings=("context", "window"), windows=(4, 32), max_tokens=300, **FAST)
    r = run_probe(config, params, tokens, opts, progress=False)

    # context: each target given exactly k tokens, as a window of fgpt.evaluation.perplexity scoring it alone
    targets = r["about"]["context"]["target_positions"]
    assert [row["k"] for row in r["context"]] == [8, 16, 32]
    for row in r["context"]:
        k = row["k"]
        nll, count = window_nlls(params, config, tokens, [Window(t - k, t + 1, t) for t in targets])
        assert count.tolist() == [1] * len(targets)
        assert row["loss"] == pytest.approx(nll.mean(), rel=1e-5)
        assert row["loss_lo"] <= row["loss"] <= row["loss_hi"]

    # window: run.eval of the checkpoint saved with that window, on the same tokens
    full = eval_loss(rope_ckpt, text_file, capsys, "--max-tokens", "300")
    assert r["about"]["window"]["reference"]["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert r["about"]["window"]["reference"]["tokens"] == full["tokens"]
    losses = {}
    for row in r["window"]:
        windowed = tmp_path / f"w{row['window']}"
        save_checkpoint(windowed, config.replace(window=row["window"]), params)
        ref = eval_loss(windowed, text_file, capsys, "--max-tokens", "300")
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), row["window"]
        assert row["delta"] == pytest.approx(ref["loss"] - full["loss"], abs=1e-5)
        losses[json.dumps(row["window"])] = row["loss"]
    assert losses["32"] == r["about"]["window"]["reference"]["loss"]  # a window of n_ctx is full attention
    assert abs(losses["4"] - losses["32"]) > 1e-3  # a window this small changes this model's loss
    assert losses["[4, null]"] != losses["4"]  # alternating local / global is its own setting
    bytes_ = {json.dumps(row["window"]): row["kv_cache_bytes"] for row in r["window"]}
    assert bytes_["4"] < bytes_["[4, null]"] < bytes_["32"]


def test_gqa_at_zero_steps_equals_convert_then_eval(gpt2_ckpt, tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"  # a corpus: probe and run.eval both score its validation split
    text = _text(40000)
    corpus.write_text("".join(json.dumps({"text": text[i:i + 800]}) + "\n" for i in range(0, len(text), 800)))
    out = tmp_path / "probe"
    code, _, err = run_cli(probe_cli, ["--checkpoint", str(gpt2_ckpt), "--data", str(corpus), "--out", str(out),
                                       "--settings", "gqa", "--uptrain-steps", "2", "--uptrain-batch", "2",
                                       "--max-tokens", "200", "--decode-tokens", "2", "--decode-runs", "1",
                                       "--no-progress"], capsys)
    assert code == 0, err
    assert "probe: gqa ~" in err  # the estimate, printed before starting
    r = json.loads((out / "results.json").read_text())
    rows = {(row["n_kv_head"], row["steps"]): row for row in r["gqa"]}
    assert set(rows) == {(2, 0), (2, 2), (1, 0), (1, 2)}
    base = eval_loss(gpt2_ckpt, corpus, capsys, "--max-tokens", "200")
    for g in (2, 1):
        converted = tmp_path / f"gqa{g}"
        code, _, err = run_cli(convert_cli, ["--checkpoint", str(gpt2_ckpt), "--to-gqa", str(g),
                                             "--out", str(converted)], capsys)
        assert code == 0, err
        ref = eval_loss(converted, corpus, capsys, "--max-tokens", "200")
        assert rows[g, 0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert rows[g, 0]["control_loss"] == pytest.approx(base["loss"], rel=1e-6)
        assert rows[g, 0]["loss"] != rows[g, 2]["loss"]  # the uptraining moved it
        # one control for every conversion: the unconverted model uptrained the same 2 steps
        assert rows[g, 2]["control_loss"] == rows[1, 2]["control_loss"] != base["loss"]
    assert rows[2, 0]["kv_cache_bytes"] == 2 * rows[1, 0]["kv_cache_bytes"]
    assert (out / "probe.md").is_file() and "GQA by conversion" in (out / "probe.md").read_text()


def test_uptraining_is_the_training_loop_on_the_same_batches(rope_ckpt, tmp_path):
    """At seq = n_ctx the probe's uptraining (converted model and control alike) is run.train's
    loop from --init-from with a constant lr after the warmup: the same weights."""
    from fgpt.data import load_corpus
    from fgpt.evaluation.probe_gqa import uptrain
    from fgpt.training.train import TrainConfig, train

    corpus_dir = tmp_path / "docs"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text(_text(8000))
    corpus = load_corpus(str(corpus_dir), progress=False)
    config, params = load_checkpoint(rope_ckpt)
    before = {k: v.clone() for k, v in params["h"][0]["attn"]["c_attn"].items()}
    ours = uptrain(params, config, corpus.train, steps=3, batch=2, seq=config.n_ctx, lr=1e-3, seed=5)
    ref = train(TrainConfig(init_from=str(rope_ckpt), steps=3, batch_size=2, lr=1e-3, min_lr=1e-3, warmup=1,
                            seed=5, eval_interval=0, checkpoint_interval=0, device="cpu", progress=False),
                corpus=corpus).params
    for name in ("weight", "bias"):
        assert torch.equal(params["h"][0]["attn"]["c_attn"][name], before[name])  # the input is left alone
        torch.testing.assert_close(ours["h"][0]["attn"]["c_attn"][name], ref["h"][0]["attn"]["c_attn"][name])
    torch.testing.assert_close(ours["wte"]["weight"], ref["wte"]["weight"])
    assert not torch.equal(ours["wte"]["weight"], params["wte"]["weight"])


def test_length_section_against_a_sliding_evaluation(rope_ckpt, gpt2_ckpt, text_file):
    config, params = load_checkpoint(rope_ckpt)
    tokens = tokens_of(text_file)[:200]
    opts = ProbeOptions(settings=("length",), max_tokens=200, stride=16, **FAST)
    L = run_probe(config, params, tokens, opts, progress=False)["length"]
    assert L["applies"] and L["length"] == 64
    inputs, targets = probes.length_sequences(tokens, 32, 2, L["sequences"])
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()  # [seqs, 65] token ids
    sliding = [strided_nll(params, config, row, n_ctx=33, stride=16, progress=False) for row in rows]
    # probes slide windows of n_ctx inputs: n_ctx + 1 tokens with their last target
    one_pass = [strided_nll(params, config, row, n_ctx=65, stride=65, progress=False)
                for row in rows]
    m = L["models"]["one pass"]
    assert m["sliding_loss"] == pytest.approx(sum(s.nll for s in sliding) / sum(s.tokens for s in sliding), rel=1e-5)
    assert m["long_loss"] == pytest.approx(sum(s.nll for s in one_pass) / sum(s.tokens for s in one_pass), rel=1e-5)
    assert m["inside_max_abs"] < 1e-4  # within n_ctx both passes see the same context

    learned, lparams = load_checkpoint(gpt2_ckpt)
    r = run_probe(learned, lparams, tokens, opts, progress=False)["length"]
    assert not r["applies"] and "learned position" in r["reason"]


def test_outputs_and_a_missing_matplotlib(rope_ckpt, text_file, tmp_path, monkeypatch, capsys):
    config, params = load_checkpoint(rope_ckpt)
    opts = ProbeOptions(settings=("context", "samples"), max_tokens=300, **FAST)
    r = run_probe(config, params, tokens_of(text_file), opts, progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    write_outputs(r, tmp_path / "out")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "no figures" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probe.md", "results.json"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["context"][0]["k"] == 8 and "as trained" in saved["samples"]["settings"]


@pytest.mark.parametrize("extra, message", [
    (["--settings", "context,speed"], "unknown setting 'speed'"),
    (["--windows", "8,64"], "--windows 64 is larger than the model's n_ctx=32"),
    (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    (["--settings", "gqa", "--uptrain-steps", "3", "--uptrain-batch", "100000"], "--uptrain-steps 3 needs text to train on"),
])
def test_bad_input_is_one_line(extra, message, rope_ckpt, text_file, tmp_path, capsys):
    argv = ["--checkpoint", str(rope_ckpt), "--data", str(text_file), "--out", str(tmp_path / "o"), *extra]
    code, _, err = run_cli(probe_cli, argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(probe_cli, ["--checkpoint", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
