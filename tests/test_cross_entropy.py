"""fgpt.cross_entropy against the direct loss over the full logits (F.cross_entropy): values
and gradients over shapes, chunk sizes and ignored targets, in fp32 and bf16, and under the
torch.func transform the single-device strategy differentiates with."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.func import vjp

from fgpt.cross_entropy import chunk_rows, linear_cross_entropy, reference_cross_entropy


def case(n, d, vocab, seed, ignored=0.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(vocab, d, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignored] = -1
    if (t == -1).all():
        t[0] = 0
    return x, w, t


def loss_and_grads(loss, x, w, t, *args):
    value = loss(x, w, t, *args)
    return (value, *torch.autograd.grad(value, (x, w)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), vocab=st.integers(2, 70), rows=st.integers(1, 45),
       ignored=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2 ** 16))
def test_equals_the_loss_over_the_full_logits(n, d, vocab, rows, ignored, seed):
    x, w, t = case(n, d, vocab, seed, ignored)
    ours = loss_and_grads(linear_cross_entropy, x, w, t, rows)
    ref = loss_and_grads(reference_cross_entropy, x, w, t)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_is_as_near_the_fp32_gradients_as_the_direct_bf16_loss():
    x, w, t = case(300, 64, 3000, seed=0, ignored=0.1)
    exact = loss_and_grads(reference_cross_entropy, x, w, t)
    xb, wb = (v.detach().bfloat16().requires_grad_() for v in (x, w))
    ours = loss_and_grads(linear_cross_entropy, xb, wb, t, 64)  # 5 chunks, the last one short
    ref = loss_and_grads(reference_cross_entropy, xb, wb, t)
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    for e, a, b in zip(exact, ours, ref):
        err = lambda v: ((v.float() - e).norm() / e.norm()).item()  # noqa: E731
        assert err(a) <= 1.2 * err(b) + 1e-6, (err(a), err(b))


def test_a_bf16_chunks_softmax_in_slices_gives_the_whole_chunks_gradients(monkeypatch):
    """The fp32 softmax of a bf16 chunk runs a slice of rows at a time (less memory): every
    row's arithmetic is the same, so the gradients are bit for bit those of one slice."""
    from fgpt import cross_entropy
    x, w, t = case(300, 64, 3000, seed=2, ignored=0.1, dtype=torch.bfloat16)
    assert cross_entropy.softmax_rows(torch.empty(64, 3000, dtype=torch.bfloat16)) >= 64
    whole = loss_and_grads(linear_cross_entropy, x, w, t, 64)
    monkeypatch.setattr(cross_entropy, "SOFTMAX_BYTES", 4 * 3000 * 10)  # 10-row slices, the chunk's last short
    assert cross_entropy.softmax_rows(torch.empty(64, 3000, dtype=torch.bfloat16)) == 10
    sliced = loss_and_grads(linear_cross_entropy, x, w, t, 64)
    assert torch.equal(sliced[1], whole[1]) and torch.equal(sliced[2], whole[2])
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-6, atol=0)  # the loss: summed in another order


def test_without_gradients_it_is_the_same_loss_and_keeps_no_graph():
    x, w, t = case(50, 8, 30, seed=1, ignored=0.2)
    with torch.no_grad():
        value = linear_cross_entropy(x, w, t, 7)
    assert value.grad_fn is None
    torch.testing.assert_close(value, reference_cross_entropy(x, w, t).detach())


def test_every_target_ignored_is_nan_as_in_f_cross_entropy():
    x, w, _ = case(6, 4, 10, seed=2)
    t = torch.full((6,), -1)
    assert math.isnan(linear_cross_entropy(x, w, t, 4).item()) and math.isnan(reference_cross_entropy(x, w, t).item())


def test_a_scaled_loss_scales_its_gradients():
    # the strategies backpropagate loss * (1 / micro-steps): the backward multiplies by it
    x, w, t = case(20, 6, 15, seed=3)
    gx, gw = torch.autograd.grad(linear_cross_entropy(x, w, t, 6) * 0.25, (x, w))
    rx, rw = torch.autograd.grad(reference_cross_entropy(x, w, t) * 0.25, (x, w))
    torch.testing.assert_close((gx, gw), (rx, rw), rtol=1e-5, atol=1e-7)


def test_under_torch_func_vjp_as_the_single_device_strategy_differentiates():
    x, w, t = case(33, 5, 21, seed=4, ignored=0.2)
    grads = {}
    for name, loss in (("ours", lambda p: linear_cross_entropy(p[0], p[1], t, 8)),
                       ("ref", lambda p: reference_cross_entropy(p[0], p[1], t))):
        value, pullback = vjp(loss, (x.detach(), w.detach()))
        with torch.no_grad():
            grads[name] = (value, *pullback(torch.ones_like(value), retain_graph=False)[0])
    torch.testing.assert_close(grads["ours"], grads["ref"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab,rows", [(50257, 1335), (2048, 32768), (10 ** 9, 1)])
def test_a_chunk_of_logits_is_256_mib_and_at_least_one_row(vocab, rows):
    assert chunk_rows(vocab) == rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gpt_differentiated_as_the_single_device_strategy_does_is_the_same_in_chunks(dtype, monkeypatch):
    """The model's loss (fgpt.model.head_loss) in four chunks against one, through the
    single-device strategy's gradients: the tied embedding's two gradients still add up."""
    from fgpt import GPTConfig, init_params, tree
    from fgpt import cross_entropy
    from fgpt.model import loss_fn
    from fgpt.parallel.single import grads_and_value
    config = GPTConfig(vocab_size=500, n_layer=2, n_head=2, n_embd=32, n_ctx=32)
    params = tree.cast(init_params(config, seed=0), dtype)
    gen = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 500, (2, 32), generator=gen) for _ in range(2))
    results = {}
    for chunks, rows in (("one", 64), ("four", 16)):
        monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 4 * 500 * rows)
        assert cross_entropy.chunk_rows(500) == rows
        results[chunks] = grads_and_value(loss_fn)(params, tokens, targets, config)
    (g1, v1), (g4, v4) = results["one"], results["four"]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(v4, v1, **tol)
    torch.testing.assert_close(tree.flatten(g4), tree.flatten(g1), **tol)
