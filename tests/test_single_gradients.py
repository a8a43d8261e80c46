"""The single-device strategy's gradients (fgpt/parallel/single.py `grads_and_value`:
torch.func.vjp with its pullback run in no-grad mode) against torch.func.grad_and_value
and torch.autograd.grad over the same pure loss: the same value, the same gradients."""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st
from torch.func import grad_and_value

from fgpt import GPTConfig, init_params, loss_fn, tree
from fgpt.parallel.single import grads_and_value


@given(pos_emb=st.sampled_from(["learned", "rope"]), kv=st.sampled_from([None, 1]),
       window=st.sampled_from([None, 3]), dropout=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 99))
def test_grads_and_value_equals_torch_funcs_and_autograds(pos_emb, kv, window, dropout, seed):
    config = GPTConfig(vocab_size=37, n_ctx=8, n_layer=2, n_head=2, n_embd=16, n_kv_head=kv,
                       pos_emb=pos_emb, window=window, dropout=dropout)
    params = init_params(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, 37, (2, 8), generator=gen) for _ in range(2))
    loss = lambda p: loss_fn(p, x, y, config, train=True)  # noqa: E731

    def seeded(fn):  # the same dropout masks for every method
        torch.manual_seed(seed)
        return fn()

    grads, value = seeded(lambda: grads_and_value(loss)(params))
    ref_grads, ref_value = seeded(lambda: grad_and_value(loss)(params))
    assert torch.equal(value, ref_value)
    for path, g in tree.flatten(grads).items():
        assert torch.equal(g, tree.flatten(ref_grads)[path]), path
    leaves = {k: v.detach().requires_grad_() for k, v in tree.flatten(params).items()}
    auto = seeded(lambda: torch.autograd.grad(loss(tree.unflatten(leaves)), list(leaves.values())))
    for (path, g), a in zip(tree.flatten(grads).items(), auto):
        torch.testing.assert_close(g, a, rtol=1e-6, atol=1e-7, msg=path)
