"""Weight-only int8: the quantization grid, the kernel against a dequantised reference, the
held-out loss of a trained model against fp32's, decoding against int8's own full forward."""

from __future__ import annotations

import random
import time
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from fgpt import GPTConfig, forward, init_params, loss_fn, save_checkpoint, tree
from fgpt import int8
from fgpt.data import Corpus
from fgpt.errors import FgptError
from fgpt.generate import Sampling, decode_layout, generate
from fgpt.tokenizer import gpt2_encoding
from fgpt.train import TrainConfig, train
from helpers import greedy_by_recomputation, wide_params
from test_generate import run_cli

GREEDY = Sampling(temperature=0)


@given(rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1e-4, 1.0, 300.0]))
def test_rows_round_to_the_nearest_step_of_their_own_grid(rows, cols, seed, spread):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (rows,)
    assert int(q.abs().max()) <= int8.QMAX
    assert torch.equal(q.abs().amax(dim=1), torch.full((rows,), int8.QMAX, dtype=torch.int8))
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-5))


def test_an_all_zero_row_stays_zero():
    q, scale = int8.quantize_rows(torch.zeros(2, 16))
    assert torch.equal(q, torch.zeros(2, 16, dtype=torch.int8)) and torch.all(torch.isfinite(scale))


CPU_KERNELS = [k for k in int8.KERNELS if k != "fbgemm" or int8.FBGEMM_AVAILABLE]
# how far each kernel may be from the exact product with the int8 weights, relative to its
# largest entry: fbgemm's digits keep activations to 6e-7, bf16 inputs round to 2**-9
TOLERANCE = {"fbgemm": 2e-5, "int8pack": 2e-2, "dequantised": 2e-5}


SHAPES = {"matvec": (1, 64, 50), "rows": (5, 32, 7), "K-not-a-multiple-of-16": (3, 24, 9), "tiny": (1, 3, 4),
          "gpt2-width": (4, 768, 40)}
# torch's kernel only where K fits its loop: elsewhere matmul never picks it, and forcing it
# is an error (test_a_forced_kernel_that_cannot_run_is_an_error)
RUNNABLE = [pytest.param(kernel, *shape, id=f"{kernel}-{name}") for kernel in CPU_KERNELS
            for name, shape in SHAPES.items() if kernel != "int8pack" or shape[1] % 16 == 0]


@pytest.mark.parametrize("kernel,M,K,N", RUNNABLE)
def test_matmul_equals_the_exact_product_with_the_int8_weights(kernel, M, K, N):
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    x[0, 0] = 30.0  # an outlier: GPT-2's activations have them, and fixed point must cope
    if M > 1:
        x[1] *= 1e-4  # a quiet row next to a loud one keeps its own precision
    q, scale = int8.quantize_rows(w)
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    with int8.forced_kernel(kernel):
        got, with_bias = int8.matmul(x, q, scale), int8.matmul(x, q, scale, bias)
    assert got.dtype == x.dtype and got.shape == (M, N)
    for row in range(M):  # each row against its own scale (without the bias, which would hide it)
        err = (got[row].double() - ref[row]).abs().max() / ref[row].abs().max()
        assert err <= TOLERANCE[kernel], (row, float(err))
    torch.testing.assert_close(with_bias, got + bias, rtol=1e-6, atol=1e-6)  # added once, not per digit


@pytest.mark.parametrize("kernel,x,why", [
    ("int8pack", torch.randn(1, 24), "24 inputs"),  # its loop has no tail: it would read past the row
    ("int8pack", torch.randn(1, 32, dtype=torch.float64), "float64"),
    ("fbgemm", torch.randn(1, 32, dtype=torch.float64), "float64")])
def test_a_forced_kernel_that_cannot_run_is_an_error(kernel, x, why):
    q, scale = int8.quantize_rows(torch.randn(5, x.shape[1]))
    with int8.forced_kernel(kernel), pytest.raises(FgptError, match=f"int8 kernel {kernel} cannot run .*{why}"):
        int8.matmul(x, q, scale)


@given(rows=st.integers(1, 4), cols=st.integers(1, 40), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1e-6, 1.0, 1e4]), zero_row=st.booleans())
def test_digits_write_each_row_in_base_128_to_within_a_step(rows, cols, seed, spread, zero_row):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    if zero_row:
        x[0] = 0
    e, step = int8.digits(x)
    assert e.shape == (rows, 3, cols) and torch.equal(e, e.round())
    assert e.min() >= -64 and e.max() <= 63  # the kernel's uint8 inputs e + 64 stay below 128
    v = (e.double() * torch.tensor([128.0 ** 2, 128, 1], dtype=torch.float64)[:, None]).sum(1)
    # half a step for the rounding, a tenth more for the fp32 sum it rounds (ulp 1/8 near 2**20)
    assert torch.all((v * step.double() - x.double()).abs() <= step.double() * 0.6)
    largest = x.abs().amax(dim=1, keepdim=True).double()
    assert torch.all(step.double() <= largest / 1_000_000 + 1e-30)  # 20 bits of each row's range


@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="fbgemm is x86-only")
def test_fbgemm_sums_the_extreme_digits_exactly():
    """The digits' claim of exactness: with every input at -64 or 63 and weights at +-127,
    fbgemm's int16 pair sums would saturate if the digits were a bit wider."""
    K, N = 3072, 6
    q = torch.full((N, K), 127, dtype=torch.int8)
    q[1::2] = -127
    q[2, ::2] = -127
    e = torch.full((4, K), 63.0)
    e[1] = -64
    e[2, ::2] = -64
    e[3] = torch.randint(-64, 64, (K,), generator=torch.Generator().manual_seed(0)).float()
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        e, 1.0, 64, int8._packed(q, torch.ones(N)))
    assert torch.equal(out.double(), e.double() @ q.double().T)
    # the same kernel on 8-bit inputs (uint8 255, zero point 0) does saturate: the bound matters
    wide = torch.full((1, K), 255.0)
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        wide, 1.0, 0, int8._packed(q, torch.ones(N)))
    assert not torch.equal(out.double(), wide.double() @ q.double().T)


@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="fbgemm is x86-only")
def test_fbgemm_packs_follow_their_tensors():
    """A pack is made per weight tensor and dies with it: a new tensor (which may reuse a dead
    one's id) never multiplies by a stale pack."""
    x = torch.randn(1, 32)
    for seed in range(3):
        q, scale = int8.quantize_rows(torch.randn(8, 32, generator=torch.Generator().manual_seed(seed)))
        with int8.forced_kernel("fbgemm"):
            got = int8.matmul(x, q, scale)
        torch.testing.assert_close(got, x @ (q.float() * scale[:, None]).T, rtol=1e-5, atol=1e-5)
        assert id(q) in int8._packs
        key = id(q)
        del q, scale
        assert key not in int8._packs
    # an entry left under a live tensor's id by another tensor is not used for it
    q, scale = int8.quantize_rows(torch.randn(8, 32))
    other, other_scale = int8.quantize_rows(torch.randn(8, 32))
    int8._packs[id(q)] = (weakref.ref(other), weakref.ref(other_scale), int8._packed(other, other_scale))
    with int8.forced_kernel("fbgemm"):
        got = int8.matmul(x, q, scale)
    torch.testing.assert_close(got, x @ (q.float() * scale[:, None]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="one CPU kernel only: nothing to choose")
@pytest.mark.parametrize("slowed", ["fbgemm", "int8pack"])
def test_the_kernel_measured_faster_is_picked_once_per_shape(monkeypatch, tmp_path, slowed):
    """Either kernel made 3 ms slower loses the measurement; the pick is then kept for the
    shape (no second measurement) and used by matmul."""
    monkeypatch.setattr(int8, "_chosen", {})
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path))  # no pick of an earlier test's
    real = int8._MATMULS[slowed]

    def slow(*args):
        time.sleep(0.003)
        return real(*args)

    monkeypatch.setitem(int8._MATMULS, slowed, slow)
    other = "int8pack" if slowed == "fbgemm" else "fbgemm"
    assert int8.fastest_kernel(24, 32) == other
    assert int8.measured_kernels() == {(24, 32, torch.float32): other}
    monkeypatch.setattr(int8, "fastest", lambda *a, **k: pytest.fail("measured twice"))
    assert int8.kernel_for(torch.zeros(1, 32), torch.zeros(24, 32, dtype=torch.int8)) == other
    with pytest.raises(FgptError, match="unknown int8 kernel"):
        with int8.forced_kernel("avx9"):
            pass


def test_quantized_tree_holds_int8_weights_with_output_channel_scales():
    config = GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=32)
    params = init_params(config, seed=0)
    q = int8.quantize(params)
    fc = q["h"][1]["mlp"]["c_fc"]
    assert fc["weight"].dtype == torch.int8 and fc["weight"].shape == (4 * 32, 32)  # [out, in]
    assert fc["scale"].shape == (4 * 32,) and fc["bias"] is params["h"][1]["mlp"]["c_fc"]["bias"]
    assert q["wte"]["weight"].shape == (64, 32) and q["wte"]["scale"].shape == (64,)
    assert q["ln_f"] is params["ln_f"] and q["wpe"] is params["wpe"]
    nbytes = lambda t: sum(x.numel() * x.element_size() for x in tree.leaves(t))  # noqa: E731
    assert nbytes(q) < nbytes(params) / 3
    with pytest.raises(FgptError, match="already quantized"):
        int8.quantize(q)


# --- a trained model ----------------------------------------------------------------------

def add_functions(seed: int, n: int) -> np.ndarray:
    """Bytes of `def add_N(x): return x + N` for random N: completing each return means
    copying N from the line above, so the model must use attention and MLPs, not only
    byte frequencies."""
    r = random.Random(seed)
    text = "".join(f"def add_{a}(x):\n    return x + {a}\n\n" for a in (r.randrange(1000) for _ in range(n)))
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)


@pytest.fixture(scope="module")
def trained():
    """A small byte-level GPT trained for a few seconds, and held-out text it never saw."""
    config = GPTConfig(vocab_size=256, n_ctx=64, n_layer=2, n_head=2, n_embd=64)
    corpus = Corpus(train=add_functions(0, 2000), val=add_functions(1, 200), cache_dir=None,
                    description="add functions")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread spares barrier waits on shared cores
    try:
        result = train(TrainConfig(model=config, steps=80, batch_size=8, lr=1e-2, warmup=5, seed=0,
                                   eval_interval=0, checkpoint_interval=0, progress=False), corpus=corpus)
    finally:
        torch.set_num_threads(threads)
    return config, result.params, result.metrics, corpus.val


def held_out_loss(params, config, tokens: np.ndarray, T: int = 64, rows: int = 32) -> float:
    x = torch.from_numpy(tokens[: rows * T + 1].astype(np.int64))
    return float(loss_fn(params, x[:-1].view(rows, T), x[1:].view(rows, T), config))


def coarser(q: dict, bits: int) -> dict:
    """The int8 tree on a grid of `bits` bits: every quantized leaf rounded to a multiple of
    2**(8 - bits) steps."""
    step = 2 ** (8 - bits)

    def regrid(p):
        if "scale" not in p:
            return p
        return {**p, "weight": (p["weight"].float() / step).round().to(torch.int8), "scale": p["scale"] * step}

    h = [{**b, "attn": {k: regrid(v) for k, v in b["attn"].items()},
          "mlp": {k: regrid(v) for k, v in b["mlp"].items()}} for b in q["h"]]
    return {**q, "h": h, "wte": regrid(q["wte"])}


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_int8_held_out_loss_is_within_one_percent_of_fp32(trained, kernel):
    config, params, metrics, val = trained
    assert metrics[-1]["loss"] < 1.0 < 5 < metrics[0]["loss"]  # really trained, not a random init
    fp32 = held_out_loss(params, config, val)
    q = int8.quantize(params)
    with int8.forced_kernel(kernel):
        assert held_out_loss(q, config, val) == pytest.approx(fp32, rel=0.01)
        assert held_out_loss(int8.quantize(params, embedding=False), config, val) == pytest.approx(fp32, rel=0.01)
        # the bound can see quantization error: a 3-bit grid on the same weights misses it
        assert abs(held_out_loss(coarser(q, 3), config, val) / fp32 - 1) > 0.01


def test_int8_cached_decoding_equals_its_full_forward():
    config = GPTConfig(vocab_size=101, n_ctx=48, n_layer=2, n_head=2, n_embd=64)
    params = int8.quantize(wide_params(config, seed=1))
    prompt = [3, 1, 4, 1, 5]
    ref = greedy_by_recomputation(params, config, [prompt], 30)[0].tolist()
    assert len(set(ref[0][len(prompt):])) > 2
    got = generate(decode_layout(params), config, [prompt], 30, sampling=GREEDY, ignore_eos=True)
    assert got == ref


def test_cli_dtype_int8_prints_the_int8_greedy_text(tmp_path):
    config = GPTConfig(n_ctx=32, n_layer=1, n_head=2, n_embd=32)  # GPT-2's vocabulary, tiny dims
    params = wide_params(config)
    save_checkpoint(tmp_path, config, params)
    enc = gpt2_encoding()
    prompt = enc.encode("The dog")
    ref = generate(int8.quantize(params), config, [prompt], 20, sampling=GREEDY, ignore_eos=True)[0]
    out = run_cli("--checkpoint", tmp_path, "--prompt", "The dog", "--max-new-tokens", 20,
                  "--temperature", 0, "--dtype", "int8", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout == enc.decode(ref) + "\n"
    assert "int8" in out.stderr
