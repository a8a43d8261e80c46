"""Weight-only int8: the quantization grid, the kernel against a dequantised reference, the
held-out loss of a trained model against fp32's, decoding against int8's own full forward."""

from __future__ import annotations

import random

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


@pytest.mark.parametrize("M,K,N", [(1, 64, 50), (5, 32, 7), (3, 24, 9), (1, 3, 4)],
                         ids=["matvec", "rows", "K-not-a-kernel-multiple", "tiny"])
def test_matmul_equals_the_dequantised_product(M, K, N):
    """The packed kernel (K a multiple of 16) and the dequantised fallback compute the same
    product: within bf16's rounding of the kernel's input and output."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    q, scale = int8.quantize_rows(w)
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    got = int8.matmul(x, q, scale)
    assert got.dtype == x.dtype and got.shape == (M, N)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


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


def test_int8_held_out_loss_is_within_one_percent_of_fp32(trained):
    config, params, metrics, val = trained
    assert metrics[-1]["loss"] < 1.0 < 5 < metrics[0]["loss"]  # really trained, not a random init
    fp32 = held_out_loss(params, config, val)
    q = int8.quantize(params)
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
