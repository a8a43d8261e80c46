"""Weights for decode steps over several rows (fgpt/inference/batched.py): the reordered
oneDNN product against the plain one, the rule that picks where it starts, and a batched
model against the plain model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import GPTConfig, forward, init_params, tree
from fgpt.inference import batched
from fgpt.inference.batched import BatchedMatrix, batched_layout, first_winning_rows
from fgpt.inference.decode_layout import SplitMatrix, onednn_packs
from fgpt.inference.generate import Sampling, generate
from fgpt.inference.kv_cache import KVCache
from helpers import tiny_variant

needs_onednn = pytest.mark.skipif(not onednn_packs(torch.float32, torch.device("cpu")), reason="torch built without oneDNN")
BF16_OK = onednn_packs(torch.bfloat16, torch.device("cpu"))  # oneDNN's bf16 needs AVX-512 here


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), pytest.param(
    torch.bfloat16, 2e-2, marks=pytest.mark.skipif(not BF16_OK, reason="oneDNN has no bf16 on this CPU"))])
@given(rows=st.integers(1, 12), n_in=st.integers(1, 40), n_out=st.integers(1, 40), parts=st.integers(1, 4),
       min_rows=st.integers(2, 8))
@settings(max_examples=25, deadline=None)
def test_the_product_equals_the_plain_one_on_both_sides_of_min_rows(dtype, tol, rows, n_in, n_out, parts, min_rows):
    # below min_rows: the decode layout's product, split in `parts` (1: plain)
    gen = torch.Generator().manual_seed(rows * 1000 + n_in * 10 + n_out)
    w, bias = torch.randn(n_in, n_out, generator=gen).to(dtype), torch.randn(n_out, generator=gen).to(dtype)
    x = torch.randn(rows, 1, n_in, generator=gen).to(dtype)  # one row: the split product
    split = SplitMatrix.of(w, parts)
    m = BatchedMatrix(split.stored, n_out, parts, min_rows, max_rows=8)
    torch.testing.assert_close(m.linear(x, bias), x @ w + bias, rtol=tol, atol=tol)
    torch.testing.assert_close(m.unembed(x), x @ w, rtol=tol, atol=tol)
    tokens = torch.randint(0, n_out, (3,), generator=gen)
    assert torch.equal(m.rows(tokens), w.T[tokens])  # as the tied table: rows of W.T


@pytest.mark.parametrize("faster, expected", [
    ({2: True, 4: True, 8: True}, "2"),
    ({2: False, 4: True, 8: True}, "4"),
    ({2: True, 4: False, 8: True}, "8"),  # a loss at 4 rows: only from 8 up is it faster throughout
    ({2: True, 4: True, 8: False}, batched.NEVER),  # slower at the most rows: never
    ({}, batched.NEVER),
])
def test_the_switch_is_where_the_reordered_product_wins_at_every_larger_count(faster, expected):
    assert first_winning_rows(faster) == expected


@pytest.fixture
def always(monkeypatch):
    """The reordered product from 2 rows up, whatever this machine measures."""
    monkeypatch.setattr(batched, "switch_rows", lambda shape, dtype, max_rows, layout: 2)


@needs_onednn
def test_a_batched_model_gives_the_plain_models_logits_and_greedy_tokens(always):
    config, params = tiny_variant()
    fast = batched_layout(params, 4)
    wrapped = [leaf for leaf in tree.leaves(fast, is_leaf=lambda x: isinstance(x, BatchedMatrix))
               if isinstance(leaf, BatchedMatrix)]
    assert len(wrapped) == 4 * config.n_layer + 1  # every block linear and the head
    tokens = torch.randint(0, 96, (4, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(forward(fast, tokens, config), forward(params, tokens, config), rtol=1e-5, atol=1e-5)
    cache, plain_cache = (KVCache.allocate(config, 4, 24) for _ in range(2))
    forward(fast, tokens, config, cache=cache)
    forward(params, tokens, config, cache=plain_cache)
    step = tokens[:, -1:]
    torch.testing.assert_close(forward(fast, step, config, cache=cache), forward(params, step, config, cache=plain_cache),
                               rtol=1e-5, atol=1e-5)
    prompts = [row[:6].tolist() for row in tokens]
    greedy = dict(sampling=Sampling(temperature=0), ignore_eos=True)
    assert generate(fast, config, prompts, 8, **greedy) == generate(params, config, prompts, 8, **greedy)


@needs_onednn
def test_tree_functions_see_the_plain_weight_and_rebuild_the_matrix_only_as_measured(always):
    config, params = tiny_variant()
    fast = batched_layout(params, 4)
    flat = tree.flatten(fast)  # a wrapped weight's one leaf: the rows of W.T (the head's: wte's)
    assert len(flat) == len(tree.flatten(params))
    for path, value in tree.flatten(params).items():
        got = flat.get(path)
        if got is None:
            got = flat[path + ".stored"] if path == "wte.weight" else flat[path + ".stored"].T
        assert torch.equal(got, value), path
    same = tree.tree_map(lambda t: t.clone(), fast)
    m = same["h"][0]["mlp"]["c_fc"]["weight"]
    assert isinstance(m, BatchedMatrix) and (m.min_rows, m.max_rows) == (2, 4)
    x = torch.randn(3, config.n_embd)
    torch.testing.assert_close(m.matmul(x), x @ m.weight, rtol=1e-5, atol=1e-5)  # reordered anew from the clone
    half = tree.cast(fast, torch.bfloat16)  # its switch was measured for fp32: split matrices without oneDNN
    wrapped = [m for m in tree.leaves(half, is_leaf=lambda x: isinstance(x, SplitMatrix)) if isinstance(m, SplitMatrix)]
    assert len(wrapped) == 4 * config.n_layer + 1 and not any(isinstance(m, BatchedMatrix) for m in wrapped)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = forward(tree.cast(params, torch.bfloat16), tokens, config)
    torch.testing.assert_close(forward(half, tokens, config), reference)  # another layout: float rounding


@needs_onednn
def test_batched_weights_refuse_gradients_and_int8_in_one_line(always):
    from fgpt import FgptError, loss_fn
    from fgpt.inference import int8
    config, params = tiny_variant()
    fast = batched_layout(params, 4)
    tokens = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    trainable = tree.tree_map(lambda t: t.detach().requires_grad_(), fast)
    with pytest.raises(FgptError, match="no gradient"):
        loss_fn(trainable, tokens, tokens, config).backward()
    with pytest.raises(FgptError, match="quantize the plain parameters"):
        int8.quantize(fast)


def test_nothing_changes_where_it_never_pays_or_where_one_row_is_all(monkeypatch):
    config, params = tiny_variant()
    monkeypatch.setattr(batched, "switch_rows", lambda shape, dtype, max_rows, layout: None)
    same = zip(tree.leaves(batched_layout(params, 8)), tree.leaves(params))
    assert all(a.data_ptr() == b.data_ptr() and torch.equal(a, b) for a, b in same)  # the same tensors, no copy
    monkeypatch.undo()
    assert batched.switch_rows((32, 32), torch.float32, 1) is None  # one row: nothing measured


@needs_onednn
def test_run_generate_decodes_its_samples_with_batched_weights_and_prints_the_same_text(always, tmp_path, capsys,
                                                                                        monkeypatch):
    import run.generate
    from fgpt import save_checkpoint
    from fgpt.data.tokenizer import gpt2_encoding
    config = GPTConfig(vocab_size=50257, n_ctx=32, n_layer=2, n_head=2, n_embd=16)
    params = init_params(config, seed=2)
    save_checkpoint(tmp_path, config, params)
    calls = []
    product = batched.onednn_linear
    monkeypatch.setattr(batched, "onednn_linear", lambda *a: calls.append(a[0].shape[0]) or product(*a))
    run.generate.main(["--checkpoint", str(tmp_path), "--prompt", "Hello there", "--max-new-tokens", "6",
                       "--num-samples", "3", "--seed", "5", "--top-k", "20", "--ignore-eos"])
    printed = capsys.readouterr().out
    assert 3 in calls  # a decode step of the three samples, one row each, ran the batched product
    enc = gpt2_encoding()
    rows = generate(params, config, [enc.encode("Hello there")], 6, num_samples=3, seed=5,
                    sampling=Sampling(top_k=20), ignore_eos=True, vocab_limit=enc.n_vocab)
    assert printed == "\n\n".join(enc.decode(row) for row in rows) + "\n"  # samples apart by a blank line
