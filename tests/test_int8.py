"""Weight-only int8: the quantization grid, the kernel against a dequantised reference, the
held-out loss of a trained model against fp32's, decoding against int8's own full forward."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optree
import pytest
import torch
from hypothesis import given, strategies as st

from fgpt import GPTConfig, forward, init_params, loss_fn, save_checkpoint, tree
from fgpt.data import Corpus
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError
from fgpt.inference import int8
from fgpt.inference.generate import Sampling, decode_layout, generate
from fgpt.training.train import TrainConfig, train
from helpers import greedy_by_recomputation, wide_params
from test_generate import run_cli

GREEDY = Sampling(temperature=0)
ROOT = Path(__file__).resolve().parents[1]


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
# is an error (test_a_named_kernel_that_cannot_run_is_an_error)
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
    m = int8.Int8Matrix(q, scale, int8.choose_kernel(N, K, x.dtype, kernel=kernel))
    got, with_bias = m.matmul(x), m.matmul(x, bias)
    assert got.dtype == x.dtype and got.shape == (M, N)
    for row in range(M):  # each row against its own scale (without the bias, which would hide it)
        err = (got[row].double() - ref[row]).abs().max() / ref[row].abs().max()
        assert err <= TOLERANCE[kernel], (row, float(err))
    torch.testing.assert_close(with_bias, got + bias, rtol=1e-6, atol=1e-6)  # added once, not per digit


@pytest.mark.parametrize("kernel,x,why", [
    ("int8pack", torch.randn(1, 24), "24 inputs"),  # its loop has no tail: it would read past the row
    ("int8pack", torch.randn(1, 32, dtype=torch.float64), "float64"),
    ("fbgemm", torch.randn(1, 32, dtype=torch.float64), "float64")])
def test_a_named_kernel_that_cannot_run_is_an_error(kernel, x, why):
    with pytest.raises(FgptError, match=f"int8 kernel {kernel} cannot run .*{why}"):
        int8.choose_kernel(5, x.shape[1], x.dtype, "cpu", kernel)
    with pytest.raises(FgptError, match="unknown int8 kernel 'avx9'"):
        int8.choose_kernel(5, x.shape[1], x.dtype, "cpu", "avx9")


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


EXTREME_DIGITS = """
import torch
from fgpt.inference import int8
K, N = 3072, 6
q = torch.full((N, K), 127, dtype=torch.int8)
q[1::2] = -127
q[2, ::2] = -127
e = torch.full((4, K), 63.0)
e[1] = -64
e[2, ::2] = -64
e[3] = torch.randint(-64, 64, (K,), generator=torch.Generator().manual_seed(0)).float()
kernel = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
pack = int8.Int8Matrix(q, torch.ones(N), "fbgemm").fbgemm_pack
digits = kernel(e, 1.0, 64, pack)
wide = torch.full((1, K), 255.0)  # 8-bit inputs (uint8 255, zero point 0)
full = kernel(wide, 1.0, 0, pack)
print(torch.equal(digits.double(), e.double() @ q.double().T),
      torch.equal(full.double(), wide.double() @ q.double().T), int8.fbgemm_sums_in_int16())
"""


@pytest.mark.slow  # kernel timing or a subprocess
@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="fbgemm is x86-only")
@pytest.mark.parametrize("instructions", [None, "AVX2"])  # this machine's own choice; AVX2's, on every fbgemm CPU
def test_fbgemm_sums_the_extreme_digits_exactly(instructions):
    """The digits' claim of exactness: with every input at -64 or 63 and weights at +-127, the
    products are exact whichever kernel fbgemm runs. Where it adds pairs in int16 (AVX2's
    vpmaddubsw, not VNNI: detected from the CPU flags and FBGEMM_ENABLE_INSTRUCTIONS), 8-bit
    inputs do saturate, so the digits' bound matters; with VNNI (int32 sums) they do not."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"FBGEMM_ENABLE_INSTRUCTIONS": instructions} if instructions else {})}
    out = subprocess.run([sys.executable, "-c", EXTREME_DIGITS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    digits_exact, eight_bits_exact, int16_sums = out.stdout.split()
    assert digits_exact == "True"
    assert int16_sums == str(instructions == "AVX2" or int8.fbgemm_sums_in_int16())
    assert eight_bits_exact == str(int16_sums == "False")


@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="fbgemm is x86-only")
def test_a_pack_belongs_to_its_matrix():
    """fbgemm's packed copy is made once per matrix and kept with it; a new matrix (a
    tree_map's copy, another weight) packs its own and multiplies by its own values."""
    x = torch.randn(2, 32)
    a, b = (int8.Int8Matrix(*int8.quantize_rows(torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))),
                            "fbgemm") for seed in (0, 1))
    for m in (a, b, tree.tree_map(torch.clone, {"w": a})["w"]):
        torch.testing.assert_close(m.matmul(x), x @ (m.q.float() * m.scale[:, None]).T, rtol=1e-5, atol=1e-5)
    assert a.fbgemm_pack is a.fbgemm_pack and a.fbgemm_pack is not b.fbgemm_pack


@pytest.mark.slow  # kernel timing or a subprocess
@pytest.mark.skipif(not int8.FBGEMM_AVAILABLE, reason="one CPU kernel only: nothing to choose")
@pytest.mark.parametrize("slowed", ["fbgemm", "int8pack"])
def test_quantize_gives_each_shape_the_kernel_measured_faster(monkeypatch, tmp_path, slowed):
    """Either kernel made 3 ms slower loses the measurement; quantize measures each weight
    shape once and every matrix of that shape runs in the winner."""
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path))  # no pick of an earlier test's
    real = int8._MATMULS[slowed]

    def slow(*args):
        time.sleep(0.003)
        return real(*args)

    monkeypatch.setitem(int8._MATMULS, slowed, slow)
    other = "int8pack" if slowed == "fbgemm" else "fbgemm"
    measured = []
    fastest = int8.fastest_kernel
    monkeypatch.setattr(int8, "fastest_kernel", lambda *shape: measured.append(shape) or fastest(*shape))
    config = GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=32)
    q = int8.quantize(init_params(config, seed=0))
    assert {m.kernel for m in int8.matrices(q)} == {other}
    shapes = {(*m.q.shape, torch.float32) for m in int8.matrices(q)}
    assert sorted(measured) == sorted(shapes)  # 4 shapes: c_attn, c_proj, c_fc, mlp.c_proj, wte


def test_quantized_tree_holds_int8_matrices_with_output_channel_scales():
    config = GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=32)
    params = init_params(config, seed=0)
    q = int8.quantize(params)
    fc = q["h"][1]["mlp"]["c_fc"]
    assert isinstance(fc["weight"], int8.Int8Matrix) and fc["bias"] is params["h"][1]["mlp"]["c_fc"]["bias"]
    assert fc["weight"].q.dtype == torch.int8 and fc["weight"].q.shape == (4 * 32, 32)  # [out, in]
    assert fc["weight"].scale.shape == (4 * 32,)
    assert q["wte"]["weight"].q.shape == (64, 32) and q["wte"]["weight"].scale.shape == (64,)
    assert q["ln_f"] is params["ln_f"] and q["wpe"] is params["wpe"]
    assert "h.1.mlp.c_fc.weight.q" in tree.flatten(q)  # a node of the tree: tree_map reaches q and scale
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
    """The int8 tree on a grid of `bits` bits: every quantized matrix rounded to a multiple
    of 2**(8 - bits) steps."""
    step = 2 ** (8 - bits)

    def regrid(m):
        if not isinstance(m, int8.Int8Matrix):
            return m
        return int8.Int8Matrix((m.q.float() / step).round().to(torch.int8), m.scale * step, m.kernel)
    return optree.tree_map(regrid, q, is_leaf=lambda x: isinstance(x, int8.Int8Matrix), namespace=tree.NAMESPACE)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_int8_held_out_loss_is_within_one_percent_of_fp32(trained, kernel):
    config, params, metrics, val = trained
    assert metrics[-1]["loss"] < 1.0 < 5 < metrics[0]["loss"]  # really trained, not a random init
    fp32 = held_out_loss(params, config, val)
    q = int8.quantize(params, kernel=kernel)
    assert held_out_loss(q, config, val) == pytest.approx(fp32, rel=0.01)
    without_wte = int8.quantize(params, embedding=False, kernel=kernel)
    assert held_out_loss(without_wte, config, val) == pytest.approx(fp32, rel=0.01)
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


@pytest.mark.slow  # kernel timing or a subprocess
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
