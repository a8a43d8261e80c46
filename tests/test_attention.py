"""Attention kernels and rotary embeddings against straightforward references.

The references are written independently of fgpt: a softmax over an explicit tril-band
mask with K/V heads indexed per query head (tests/helpers.py; the cases draw more query
heads than K/V heads, so every kernel is checked as GQA = MHA over repeated K/V heads
here, and the whole model in tests/test_variants.py), and RoPE as complex rotation.
"""

import pytest
import torch
from hypothesis import given, strategies as st

from fgpt import attention
from fgpt.attention import (causal_attention, causal_key, default_block, dense_window_attention,
                            scores_causal_attention, sdpa_causal_attention, sliding_window_attention,
                            use_causal_kernel, using_causal_kernel)
from fgpt.rope import apply_rope, rope_angles, rope_tables
from helpers import reference_attention


@st.composite
def qkv_cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    hd = draw(st.sampled_from([2, 4, 8]))
    window = draw(st.integers(1, 45))
    block = draw(st.one_of(st.none(), st.integers(1, 48)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, hd, generator=gen, dtype=torch.float64)
    return q, k, v, window, block


def _values_and_grads(fn, q, k, v):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # a generic cotangent
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    return out.detach(), grads


@given(qkv_cases())
def test_scores_causal_attention_equals_the_reference_values_and_grads(case):
    q, k, v, _, _ = case
    fast, fast_grads = _values_and_grads(scores_causal_attention, q, k, v)
    ref, ref_grads = _values_and_grads(lambda *a: reference_attention(*a, None), q, k, v)
    torch.testing.assert_close(fast, ref)
    for g, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, r)


@given(qkv_cases(), st.integers(-3, 5))
def test_scores_causal_attention_is_sdpas_causal_maths_for_any_key_count(case, extra):
    """On q, k, v laid out as the model's c_attn split leaves them (strided views), and with
    S != T keys, where SDPA's is_causal lets query i see keys 0..i."""
    q, k, v, _, _ = case
    B, H, T, hd = q.shape
    S = max(T + extra, 1)
    kv = torch.randn(B, S, 2 * k.shape[1] * hd, dtype=q.dtype)
    k, v = (x.view(B, S, -1, hd).transpose(1, 2) for x in kv.chunk(2, dim=-1))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, hd] memory, as the model's
    torch.testing.assert_close(scores_causal_attention(q, k, v), sdpa_causal_attention(q, k, v))


@given(qkv_cases())
def test_scores_causal_attention_in_bf16_is_as_close_as_sdpa(case):
    """bf16 probabilities before the product with v (transformers' eager rounding): within
    a few bf16 steps of the exact result, as SDPA's flash kernel is."""
    q, k, v, _, _ = case
    ref = reference_attention(q, k, v, None)
    low = [x.to(torch.bfloat16) for x in (q, k, v)]
    err = (scores_causal_attention(*low).double() - ref).abs().max()
    assert err <= 2 * (sdpa_causal_attention(*low).double() - ref).abs().max() + 0.02


def test_causal_attention_runs_the_kernel_chosen_for_its_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "scores_causal_attention",
                        lambda *a: calls.append(a[0].shape) or scores_causal_attention(*a))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    key = causal_key(q.shape, k.shape, q.dtype, "cpu")
    with using_causal_kernel(key, "scores"):
        torch.testing.assert_close(causal_attention(q, k, v), sdpa_causal_attention(q, k, v))
        assert calls == [q.shape]
        causal_attention(q[:1], k[:1], v[:1])  # another shape: not chosen, so SDPA
        causal_attention(q, k, v, dropout_p=0.5)  # the scores path has no dropout
        assert calls == [q.shape]
    causal_attention(q, k, v)  # the choice ends with the block
    assert calls == [q.shape]
    with pytest.raises(Exception, match="unknown causal attention kernel"):
        use_causal_kernel(key, "flash")


@given(qkv_cases())
def test_sliding_window_equals_dense_masked_values_and_grads(case):
    q, k, v, window, block = case
    fast, fast_grads = _values_and_grads(lambda *a: sliding_window_attention(*a, window, block=block), q, k, v)
    ref, ref_grads = _values_and_grads(lambda *a: reference_attention(*a, window), q, k, v)
    torch.testing.assert_close(fast, ref)
    for g, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, r)


@given(qkv_cases())
def test_dense_window_reference_equals_independent_reference(case):
    q, k, v, window, _ = case
    torch.testing.assert_close(dense_window_attention(q, k, v, window), reference_attention(q, k, v, window))


@given(qkv_cases(), st.integers(0, 10))
def test_window_at_least_T_is_full_causal(case, extra):
    q, k, v, _, block = case
    T = q.shape[2]
    torch.testing.assert_close(sliding_window_attention(q, k, v, T + extra, block=block),
                               causal_attention(q, k, v))
    torch.testing.assert_close(causal_attention(q, k, v), reference_attention(q, k, v))


@given(qkv_cases(), st.integers(0, 39))
def test_sliding_window_is_causal(case, t):
    """Changing keys/values at position t changes no output before t."""
    q, k, v, window, block = case
    t = min(t, q.shape[2] - 1)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t:] += 1.0
    v2[:, :, t:] -= 2.0
    a = sliding_window_attention(q, k, v, window, block=block)
    b = sliding_window_attention(q, k2, v2, window, block=block)
    torch.testing.assert_close(a[:, :, :t], b[:, :, :t])


@given(st.sampled_from([65, 100, 256, 300]), st.integers(1, 200), st.integers(1, 2), st.integers(0, 2**16))
def test_default_block_shorter_than_the_window_equals_the_dense_reference(window, extra, Hkv, seed):
    """qkv_cases' windows are under 64, where the default block is the whole window; past 64
    it is shorter, so the queries split into several blocks whose key spans overlap, the
    last block ragged. The kernel as `attention` calls it (block=None) against the
    reference, values and gradients."""
    assert default_block(window) < window
    T = window + extra
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * Hkv, T, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, Hkv, T, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    fast, fast_grads = _values_and_grads(lambda *a: sliding_window_attention(*a, window), q, k, v)
    ref, ref_grads = _values_and_grads(lambda *a: reference_attention(*a, window), q, k, v)
    torch.testing.assert_close(fast, ref)
    for g, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, r)


# --- rotary embeddings ----------------------------------------------------------------

def reference_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Complex rotation of the pairs (i, i + hd/2) by position * base^(-2i/hd), in fp64."""
    hd = x.shape[-1]
    half = hd // 2
    freqs = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)  # [hd/2]
    rot = torch.polar(torch.ones((), dtype=torch.float64), positions.double()[:, None] * freqs[None])  # [T, hd/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot
    return torch.cat([z.real, z.imag], dim=-1)


@st.composite
def rope_cases(draw):
    T = draw(st.integers(1, 24))
    hd = draw(st.sampled_from([2, 4, 8, 16]))
    H = draw(st.integers(1, 3))
    base = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    offset = draw(st.integers(0, 5000))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(1, H, T, hd, generator=gen), torch.randn(1, H, T, hd, generator=gen), base, offset


@given(rope_cases())
def test_rope_matches_complex_rotation(case):
    x, _, base, offset = case
    T, hd = x.shape[2], x.shape[3]
    positions = torch.arange(T) + offset
    ours = apply_rope(x, *rope_angles(positions, offset + T, hd, base, torch.float32))
    torch.testing.assert_close(ours.double(), reference_rope(x, positions, base), atol=2e-3, rtol=1e-4)


@given(rope_cases())
def test_rope_scores_depend_only_on_relative_position(case):
    q, k, base, offset = case
    T, hd = q.shape[2], q.shape[3]

    def scores(shift):
        positions = torch.arange(T) + shift
        cos, sin = rope_angles(positions, shift + T, hd, base, torch.float64)
        return apply_rope(q.double(), cos, sin) @ apply_rope(k.double(), cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(offset), atol=5e-4, rtol=1e-4)


def test_rope_batched_positions_match_per_row_positions():
    x = torch.randn(2, 3, 5, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    batched = apply_rope(x, *rope_angles(positions, 12, 8, 10000.0, torch.float32))
    for row in range(2):
        single = apply_rope(x[row:row + 1], *rope_angles(positions[row], 12, 8, 10000.0, torch.float32))
        torch.testing.assert_close(batched[row:row + 1], single)


def test_rope_tables_of_any_length_agree_on_shared_positions():
    short_cos, short_sin = rope_tables(5, 8, 10000.0, torch.float32, "cpu")
    long_cos, long_sin = rope_tables(300, 8, 10000.0, torch.float32, "cpu")
    assert short_cos.shape == (5, 8) and long_cos.shape == (300, 8)
    torch.testing.assert_close(short_cos, long_cos[:5])
    torch.testing.assert_close(short_sin, long_sin[:5])
