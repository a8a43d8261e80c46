"""The decode layouts' split product (fgpt/inference/decode_layout.py): one row times a
weight as blocks of its rows in one torch.bmm, against the plain product, and a model whose
every decode matrix is split against the same model with plain weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import forward, tree
from fgpt.errors import FgptError
from fgpt.inference import decode_layout as dl, int8
from fgpt.inference.generate import Sampling, generate
from fgpt.inference.kv_cache import KVCache
from helpers import tiny_variant


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@given(rows=st.integers(1, 5), n_in=st.integers(1, 40), n_out=st.integers(1, 60), parts=st.integers(1, 6),
       bias=st.booleans())
@settings(max_examples=30, deadline=None)
def test_a_split_matrix_multiplies_as_the_plain_weight(dtype, tol, rows, n_in, n_out, parts, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n_in * 10 + n_out)
    w = torch.randn(n_in, n_out, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    m = dl.SplitMatrix.of(w, parts)  # n_out not a multiple of parts: zero rows pad the last block
    assert m.stored.shape[0] % parts == 0 and torch.equal(m.weight, w)
    x = torch.randn(rows, n_in, generator=gen).to(dtype)  # one row takes the split product, more the plain one
    plain = x @ w if b is None else x @ w + b
    torch.testing.assert_close(m.matmul(x, b), plain, rtol=tol, atol=tol)
    torch.testing.assert_close(m.unembed(x[:1]), x[:1] @ w, rtol=tol, atol=tol)
    tokens = torch.randint(0, n_out, (3,), generator=gen)
    assert torch.equal(m.rows(tokens), w.T[tokens])  # as the tied table: rows of W.T


def where_onednn_packs(dtype: torch.dtype, *values):
    """A parameter set that runs where oneDNN's packed product takes `dtype` on this CPU
    (its bf16 needs AVX-512 bf16 units), and says why it is skipped elsewhere."""
    return pytest.param(*values, marks=pytest.mark.skipif(not dl.onednn_packs(dtype, torch.device("cpu")),
                                                          reason=f"oneDNN takes no {dtype} on this CPU"))


@pytest.mark.parametrize("dtype, tol", [where_onednn_packs(torch.float32, torch.float32, 1e-5),
                                        where_onednn_packs(torch.bfloat16, torch.bfloat16, 2e-2)])
@given(rows=st.integers(1, 5), n_in=st.integers(1, 40), n_out=st.integers(1, 60), bias=st.booleans())
@settings(max_examples=30, deadline=None)
def test_a_packed_matrix_multiplies_as_the_plain_weight(dtype, tol, rows, n_in, n_out, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n_in * 10 + n_out)
    w = torch.randn(n_in, n_out, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    m = dl.decode_matrix(w, dl.PACKED)  # oneDNN's product at every row count
    assert torch.equal(m.weight, w)
    x = torch.randn(rows, n_in, generator=gen).to(dtype)
    plain = x @ w if b is None else x @ w + b
    torch.testing.assert_close(m.matmul(x, b), plain, rtol=tol, atol=tol)
    tokens = torch.randint(0, n_out, (3,), generator=gen)
    assert torch.equal(m.rows(tokens), w.T[tokens])  # as the tied table: rows of W.T


WRAPPED = [dl.SPLIT, where_onednn_packs(torch.float32, dl.PACKED)]


@pytest.fixture(params=WRAPPED)
def wrapped_everywhere(request, monkeypatch):
    """Every decode matrix split (or packed for oneDNN), whatever this machine measures."""
    monkeypatch.setattr(dl, "fastest_layout", lambda shape, dtype, device="cpu": request.param)
    return request.param


def test_a_split_or_packed_model_decodes_as_the_plain_model(wrapped_everywhere):
    config, params = tiny_variant()
    fast = dl.decode_layout(params)
    split = [m for m in tree.leaves(fast, is_leaf=lambda x: isinstance(x, dl.SplitMatrix))
             if isinstance(m, dl.SplitMatrix)]
    assert len(split) == 4 * config.n_layer + 1  # the blocks' matrices and the head
    packed = wrapped_everywhere == dl.PACKED
    assert all(m.parts == (1 if packed else dl.SPLIT_PARTS) and hasattr(m, "reordered") == packed for m in split)
    tokens = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    cache, plain_cache = (KVCache.allocate(config, 1, 24) for _ in range(2))
    torch.testing.assert_close(forward(fast, tokens, config, cache=cache),
                               forward(params, tokens, config, cache=plain_cache), rtol=1e-5, atol=1e-5)
    for t in range(3):  # one-row decode steps: the split products
        step = torch.tensor([[t + 5]])
        torch.testing.assert_close(forward(fast, step, config, cache=cache),
                                   forward(params, step, config, cache=plain_cache), rtol=1e-5, atol=1e-5)
    greedy = dict(sampling=Sampling(temperature=0), ignore_eos=True)
    prompt = [tokens[0, :6].tolist()]
    assert generate(fast, config, prompt, 10, **greedy) == generate(params, config, prompt, 10, **greedy)


def test_a_cast_keeps_the_split_and_the_model_and_quantize_refuses_split_weights(wrapped_everywhere):
    config, params = tiny_variant()
    fast = dl.decode_layout(params)
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    for moved in (tree.cast(fast, torch.bfloat16), tree.tree_map(lambda t: t.clone(), fast)):
        split = [m for m in tree.leaves(moved, is_leaf=lambda x: isinstance(x, dl.SplitMatrix))
                 if isinstance(m, dl.SplitMatrix)]
        assert len(split) == 4 * config.n_layer + 1  # the head too, still the tied table
        dtype = split[0].stored.dtype
        reference = forward(tree.cast(params, dtype), tokens, config)
        torch.testing.assert_close(forward(moved, tokens, config), reference)  # another layout: float rounding
    with pytest.raises(FgptError, match="changed a decode matrix's rows"):
        tree.tree_map(lambda t: t[:2] if t.dim() == 2 else t, fast)
    with pytest.raises(FgptError, match="quantize the plain parameters"):
        int8.quantize(fast)
