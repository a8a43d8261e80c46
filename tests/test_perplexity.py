"""Strided perplexity against transformers computing the same strided loss (HF's guide), the
window plan's invariants, and the batched / head-sliced scoring against full forward passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from fgpt import FgptError, GPTConfig, forward, init_params, load_checkpoint
from fgpt.data.tokenizer import EOT, gpt2_encoding, token_byte_lengths
from fgpt.evaluation.perplexity import batches, plan_windows, scored_bytes, strided_nll
from hf_reference import hf_model
from run.bench.eval import hf_guide_nll  # transformers' loss over the guide's loop


# (tokens, n_ctx, stride, batch): a last partial window, windows that tile exactly, stride = 1,
# stride = n_ctx (no overlap), one window holding the whole text, batches that split unevenly
CASES = [(50, 16, 8, 1), (50, 16, 8, 3), (64, 16, 16, 2), (40, 12, 5, 4), (33, 24, 1, 5),
         (30, 24, 12, 2), (20, 24, 12, 8), (47, 24, 24, 3)]


@pytest.mark.parametrize("n_tokens, n_ctx, stride, batch", CASES)
def test_strided_loss_matches_transformers(n_tokens, n_ctx, stride, batch, tmp_path):
    model = hf_model(101, 24, 3, 4, 32, seed=n_tokens)
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    tokens = torch.randint(0, 101, (n_tokens,), generator=torch.Generator().manual_seed(stride))
    ref_nll, ref_count = hf_guide_nll(model, tokens, n_ctx, stride)
    total = strided_nll(params, config, tokens.numpy(), n_ctx=n_ctx, stride=stride, batch_size=batch,
                        progress=False)
    assert total.tokens == ref_count
    assert total.loss == pytest.approx(ref_nll / ref_count, rel=1e-4)
    assert total.ppl == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-4)


@pytest.mark.parametrize("variant", [dict(pos_emb="rope", n_kv_head=1), dict(window=5),
                                     dict(window=(None, 3), pos_emb="rope")])
def test_variants_score_like_one_full_forward_per_window(variant):
    """Batching and the head on a slice change nothing: each window scored alone by a full
    forward pass (every position's logits) gives the same total."""
    config = GPTConfig(vocab_size=37, n_ctx=16, n_layer=2, n_head=2, n_embd=16, **variant)
    params = init_params(config, seed=4)
    tokens = np.random.default_rng(0).integers(0, 37, 45)
    nll = 0.0
    for w in plan_windows(len(tokens), 16, 6):
        x = torch.as_tensor(tokens[w.begin:w.end])[None]
        logp = F.log_softmax(forward(params, x, config)[0], -1)  # [T, V]
        nll -= sum(float(logp[t - w.begin - 1, tokens[t]]) for t in range(w.first, w.end))
    total = strided_nll(params, config, tokens, n_ctx=16, stride=6, batch_size=3, progress=False)
    assert total.tokens == len(tokens) - 1
    assert total.nll == pytest.approx(nll, rel=1e-5)


@given(n_tokens=st.integers(2, 80), n_ctx=st.integers(2, 20), data=st.data())
def test_every_token_but_the_first_is_scored_once(n_tokens, n_ctx, data):
    stride = data.draw(st.integers(1, n_ctx))
    windows = plan_windows(n_tokens, n_ctx, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert all(w.begin == i * stride and w.length <= n_ctx and w.first > w.begin for i, w in enumerate(windows))
    assert windows[-1].end == n_tokens and all(w.end < n_tokens for w in windows[:-1])
    assert len(scored) == len(set(scored))
    if stride < n_ctx:
        assert sorted(scored) == list(range(1, n_tokens))
    else:  # no overlap: each window's first token has no context inside the window
        assert sorted(scored) == [t for t in range(1, n_tokens) if t % n_ctx]
    groups = batches(windows, data.draw(st.integers(1, 5)))
    assert [w for g in groups for w in g] == windows
    assert all(len({w.length for w in g}) == 1 for g in groups)


def test_scored_bytes_are_the_texts_bytes_less_those_of_unscored_tokens():
    """Against the text itself: its UTF-8 bytes (a separator <|endoftext|> is no text), less
    the bytes tiktoken decodes the unscored tokens to (only the first with overlapping
    windows; with stride = n_ctx every window's first)."""
    enc = gpt2_encoding()
    docs = ["caf\u00e9 \u4e2d\u6587, an emoji \U0001f415 and na\u00efve text", "a second, plain document", "x"]
    tokens = np.array(sum(([EOT] * bool(i) + enc.encode_ordinary(d) for i, d in enumerate(docs)), []))
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    lengths = token_byte_lengths()

    def unscored_bytes(positions):
        return len(b"".join(enc.decode_single_token_bytes(int(tokens[i])) for i in positions if tokens[i] != EOT))
    assert scored_bytes(tokens, plan_windows(len(tokens), 8, 3), lengths) == text_bytes - unscored_bytes([0])
    tiled = range(0, len(tokens), 5)
    assert scored_bytes(tokens, plan_windows(len(tokens), 5, 5), lengths) == text_bytes - unscored_bytes(tiled)
    assert scored_bytes(np.array([0, enc.n_vocab]), plan_windows(2, 2, 1), lengths) is None  # not a GPT-2 id


@pytest.mark.parametrize("n_ctx, stride, n_tokens, message", [
    (16, 17, 40, "--stride must be between 1 and --n-ctx"), (16, 0, 40, "--stride must be between"),
    (16, -3, 40, "--stride must be between"), (1, 1, 40, "--n-ctx must be at least 2"),
    (16, 8, 1, "needs at least 2"), (16, 8, 0, "needs at least 2"),
    (32, 8, 40, "exceeds the model's n_ctx=16")])
def test_bad_windows_are_refused(n_ctx, stride, n_tokens, message):
    config = GPTConfig(vocab_size=11, n_ctx=16, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(FgptError, match=message):
        strided_nll(init_params(config), config, np.zeros(n_tokens, dtype=np.int64), n_ctx=n_ctx,
                    stride=stride, progress=False)


def test_token_outside_the_vocabulary_is_named():
    config = GPTConfig(vocab_size=11, n_ctx=16, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(FgptError, match="token id 11 is outside the model's vocabulary of 11"):
        strided_nll(init_params(config), config, np.array([1, 2, 11, 3]), progress=False)
