"""Invariants of the pure model over random tiny configs of every variant (hypothesis):
causality, independent rows, KV-cache decoding of left-padded rows, the tree layout, the
parameter count, and initialisation shared across variants."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from fgpt import GPTConfig, count_params, forward, init_params, tree
from fgpt.inference.kv_cache import KVCache
from fgpt.model import param_shapes
from helpers import wide_params

TOL = dict(rtol=1e-4, atol=1e-5)


@st.composite
def configs(draw, *, variants: bool = True, like: GPTConfig | None = None) -> GPTConfig:
    """Tiny configs; with `like`, one of its variants: its vocabulary, heads and width,
    any depth, positions, kv heads and windows."""
    if like is None:
        n_head = draw(st.sampled_from([1, 2, 4]))
        vocab_size, n_embd = draw(st.integers(5, 40)), n_head * draw(st.sampled_from([2, 4, 8]))
    else:
        n_head, vocab_size, n_embd = like.n_head, like.vocab_size, like.n_embd
    kw = dict(vocab_size=vocab_size, n_ctx=16, n_layer=draw(st.integers(1, 3)), n_head=n_head, n_embd=n_embd)
    if variants:
        kw["pos_emb"] = draw(st.sampled_from(["learned", "rope"]))
        kw["n_kv_head"] = draw(st.sampled_from([None] + [k for k in (1, 2) if n_head % k == 0]))
        windows = st.sampled_from([None, 1, 3, 6])
        kw["window"] = draw(st.one_of(windows, st.tuples(*[windows] * kw["n_layer"])))  # or one per layer
    return GPTConfig(**kw)


def tokens_of(draw, config: GPTConfig, batch: int, length: int) -> torch.Tensor:
    ids = draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(ids).view(batch, length)


@settings(max_examples=25)
@given(config=configs(), data=st.data())
def test_causality_future_tokens_do_not_change_past_logits(config, data):
    params = wide_params(config, seed=data.draw(st.integers(0, 99)))
    tokens = tokens_of(data.draw, config, 2, data.draw(st.integers(2, 12)))
    t = data.draw(st.integers(0, tokens.shape[1] - 2))
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config.vocab_size
    a, b = forward(params, tokens, config), forward(params, changed, config)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], **TOL)


@settings(max_examples=10)
@given(config=configs(), data=st.data())
def test_causality_by_gradient_of_the_embeddings(config, data):
    """The gradient of position t's logits reaches no embedding after t (x: the blocks' input)."""
    from fgpt.model import block, embed, head
    params = wide_params(config, seed=0)
    T = data.draw(st.integers(2, 8))
    t = data.draw(st.integers(0, T - 2))
    _, pos = embed(params, torch.zeros(1, T, dtype=torch.long), config)  # the model's own positions
    x = torch.randn(1, T, config.n_embd, requires_grad=True)
    h = x
    for i, p in enumerate(params["h"]):
        h = block(p, h, config, layer=i, pos=pos)
    logits = head(params, h, config)  # [1, T, V]
    (grad,) = torch.autograd.grad(logits[0, t].square().sum(), x)
    assert torch.count_nonzero(grad[0, t + 1:]) == 0
    assert torch.count_nonzero(grad[0, t]) > 0  # the check can see a dependence when there is one


@settings(max_examples=10)
@given(config=configs(), data=st.data())
def test_rows_of_a_batch_are_independent(config, data):
    params = wide_params(config, seed=1)
    tokens = tokens_of(data.draw, config, data.draw(st.integers(2, 4)), data.draw(st.integers(1, 10)))
    batched = forward(params, tokens, config)
    for b in range(tokens.shape[0]):
        torch.testing.assert_close(batched[b: b + 1], forward(params, tokens[b: b + 1], config), **TOL)


@settings(max_examples=15)
@given(config=configs(), data=st.data())
def test_kv_cache_decoding_of_left_padded_rows_equals_each_row_alone(config, data):
    """Left-padded rows of different lengths: prefill a random prefix, then feed the rest
    in random chunks (one token = a decode step, several = a chunked prefill, rolling
    buffers wrapping); every chunk's logits equal those of a full pass over that row alone,
    unpadded. The pad slots hold real tokens, so attending to them would show."""
    params = wide_params(config, seed=2)
    T = data.draw(st.integers(2, 14))
    B = data.draw(st.integers(2, 3))
    tokens = tokens_of(data.draw, config, B, T)
    pad = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B), label="pad"))
    cache = KVCache.allocate(config, B, T, pad=pad)
    start = 0
    while start < T:
        n = data.draw(st.integers(1, T - start), label="chunk")
        logits = forward(params, tokens[:, start: start + n], config, cache=cache)
        for b in range(B):  # a row's reference: its own tokens, unpadded
            p = int(pad[b])
            ref = forward(params, tokens[b: b + 1, p:], config)[0]
            first = max(start, p)  # pad slots have no reference
            if first < start + n:
                torch.testing.assert_close(logits[b, first - start:], ref[first - p: start + n - p], **TOL)
        start += n


@given(config=configs())
def test_tree_flatten_unflatten_round_trips(config):
    params = init_params(config, seed=0)
    flat = tree.flatten(params)
    assert flat.keys() == param_shapes(config).keys()
    assert all(tuple(flat[k].shape) == s for k, s in param_shapes(config).items())
    again = tree.unflatten(flat)
    assert isinstance(again["h"], list) and len(again["h"]) == config.n_layer
    assert tree.flatten(again).keys() == flat.keys()
    assert all(again_leaf is leaf for again_leaf, leaf in zip(tree.leaves(again), tree.leaves(params)))


@given(config=configs())
def test_parameter_count_matches_closed_form_and_leaves(config):
    params = init_params(config, seed=0)
    assert count_params(config) == tree.count(params) == sum(x.numel() for x in tree.leaves(params))


@settings(max_examples=5)
@given(config=configs(variants=False))
def test_parameter_count_matches_transformers(config):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx,
                                    n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd))
    assert count_params(config) == sum(p.numel() for p in hf.parameters())  # tied head counted once


def test_gpt2_preset_has_124m_parameters():
    assert count_params(GPTConfig.preset("gpt2")) == 124_439_808  # GPT-2 small as published


@given(config=configs(), data=st.data(), seed=st.integers(0, 3))
@settings(max_examples=20)
def test_variants_share_every_initial_tensor_whose_path_and_shape_they_share(config, data, seed):
    """A variant of a model starts from the model's tensors wherever a path and shape exist
    in both; across depths the residual projections keep their draw under GPT-2's
    1/sqrt(2·n_layer) scale."""
    other = data.draw(configs(like=config), label="other")
    a = tree.flatten(init_params(config, seed=seed))
    b = tree.flatten(init_params(other, seed=seed))
    shared = [k for k in a if k in b and a[k].shape == b[k].shape and k.endswith("weight")]
    assert "wte.weight" in shared and "h.0.mlp.c_fc.weight" in shared
    for k in shared:
        if k.endswith("c_proj.weight") and config.n_layer != other.n_layer:
            torch.testing.assert_close(a[k] * math.sqrt(config.n_layer), b[k] * math.sqrt(other.n_layer))
        else:
            assert torch.equal(a[k], b[k]), k
    # and a different seed changes every random leaf
    c = tree.flatten(init_params(config, seed=seed + 1))
    for k, v in a.items():
        if k.endswith("weight") and v.ndim == 2:
            assert not torch.equal(v, c[k]), k
