"""The opt-in flex_attention kernel for windowed layers (fgpt/flex_window.py).

References: a softmax over an explicit band mask (tests/helpers.py), torch's own
`create_block_mask` for the tile layout, and the plain band kernel for whole models.
Compiling costs seconds per distinct shape, so the cases reuse a few shapes.
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import fgpt.flex_window
from fgpt import FgptError, GPTConfig, forward, init_params, save_checkpoint
from fgpt.attention import attention
from fgpt.flex_window import flex_window_attention, window_block_mask
from fgpt.inference.generate import Sampling, generate
from fgpt.model import loss_fn
from fgpt.training.train import train
from helpers import reference_attention
import run.generate
import run.train

pytestmark = pytest.mark.slow  # torch.compile: `just test-fast` leaves it out

CPU = torch.device("cpu")
# (B, H, H_kv, T, hd, W): GQA with T not a multiple of the 128-wide tile; MQA over whole
# tiles, some of them full; a window longer than the sequence
CASES = [(2, 4, 2, 200, 16, 16), (1, 2, 1, 256, 16, 128), (1, 2, 2, 77, 16, 500)]


def qkv(B, H, Hkv, T, hd, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(T)
    make = lambda h: torch.randn(B, h, T, hd, generator=gen, dtype=dtype, requires_grad=grad)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


@given(T=st.integers(1, 700), window=st.integers(1, 800))
def test_window_block_mask_equals_create_block_mask(T, window):
    ours = window_block_mask(T, window, CPU)
    theirs = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, T, T, device="cpu")
    assert ours.seq_lengths == theirs.seq_lengths
    for count, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n = getattr(ours, count)
        torch.testing.assert_close(n, getattr(theirs, count))
        mine, ref = getattr(ours, indices)[0, 0], getattr(theirs, indices)[0, 0]
        for row, k in enumerate(n[0, 0].tolist()):  # entries past the count are padding
            assert mine[row, :k].tolist() == ref[row, :k].tolist()


@pytest.mark.parametrize("B, H, Hkv, T, hd, W", CASES)
def test_flex_equals_dense_masked_reference(B, H, Hkv, T, hd, W):
    q, k, v = qkv(B, H, Hkv, T, hd)
    torch.testing.assert_close(flex_window_attention(q, k, v, W), reference_attention(q, k, v, W))


def test_flex_in_bfloat16_matches_the_reference_to_bfloat16_precision():
    q, k, v = qkv(*CASES[0][:5], dtype=torch.bfloat16)
    ref = reference_attention(q.float(), k.float(), v.float(), 16)
    torch.testing.assert_close(flex_window_attention(q, k, v, 16).float(), ref, atol=2e-2, rtol=2e-2)


def test_flex_refuses_what_torch_cannot_do_on_cpu_with_one_line_errors():
    q, k, v = qkv(*CASES[0][:5], grad=True)
    with pytest.raises(FgptError, match="no backward on CPU"):
        flex_window_attention(q, k, v, 16)
    with pytest.raises(FgptError, match="no backward on CPU"):
        torch.func.grad(lambda q: flex_window_attention(q, k, v, 16).sum())(q.detach())
    with pytest.raises(FgptError, match="dropout"):
        flex_window_attention(q, k, v, 16, dropout_p=0.1)
    with pytest.raises(FgptError, match="float64"):
        flex_window_attention(*qkv(*CASES[0][:5], dtype=torch.float64), 16)


def test_the_kernel_argument_selects_flex_and_nothing_else_changes():
    q, k, v = qkv(*CASES[0][:5], grad=True)
    attention(q, k, v, 16).sum().backward()  # band (the default): differentiable
    with pytest.raises(FgptError, match="no backward"):  # only the flex kernel refuses
        attention(q, k, v, 16, kernel="flex")
    attention(q, k, v, 16).sum().backward()  # no setting was left behind
    with pytest.raises(FgptError, match="--window-kernel must be one of band, flex, dense, got 'sparse'"):
        attention(q, k, v, 16, kernel="sparse")


@pytest.fixture(scope="module")
def windowed_model():
    B, H, Hkv, T, hd, W = CASES[0]  # the shape the kernel test compiled
    config = GPTConfig(vocab_size=96, n_ctx=T, n_layer=2, n_head=H, n_kv_head=Hkv, n_embd=H * hd,
                       pos_emb="rope", window=(W, None))
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    return config, init_params(config, seed=3), tokens


@torch.no_grad()
def test_model_logits_and_loss_with_flex_equal_the_band_kernel(windowed_model):
    config, params, tokens = windowed_model
    targets = tokens.roll(-1, dims=1)
    band = forward(params, tokens, config), loss_fn(params, tokens, targets, config)
    flex = (forward(params, tokens, config, window_kernel="flex"),
            loss_fn(params, tokens, targets, config, window_kernel="flex"))
    torch.testing.assert_close(flex, band)


def test_greedy_generation_with_a_flex_prefill_equals_the_band_kernel(windowed_model):
    config, params, tokens = windowed_model
    prompts = [row[:-8].tolist() for row in tokens]  # prefill shorter than n_ctx, longer than W
    band = generate(params, config, prompts, 8, sampling=Sampling(temperature=0))
    flex = generate(params, config, prompts, 8, sampling=Sampling(temperature=0), window_kernel="flex")
    assert flex == band


def test_training_with_flex_on_cpu_is_a_one_line_error_before_any_work(tmp_path):
    args = run.train.parser().parse_args(["--window-kernel", "flex", "--device", "cpu",
                                          "--out", str(tmp_path / "run")])
    cfg = run.train.build_config(args)
    assert cfg.window_kernel == "flex"
    with pytest.raises(FgptError, match="no backward on CPU.*band kernel"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        run.train.parser().parse_args(["--window-kernel", "sparse"])


def test_run_generate_with_the_flex_prefill_prints_what_the_band_prints(tmp_path, capsys, monkeypatch):
    config = GPTConfig(n_ctx=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window=8)
    save_checkpoint(tmp_path, config, init_params(config, seed=5))
    argv = ["--checkpoint", str(tmp_path), "--prompt", "The quick brown fox jumps over the lazy dog " * 2,
            "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos"]
    run.generate.main(argv)
    band = capsys.readouterr().out
    calls = []
    monkeypatch.setattr(fgpt.flex_window, "flex_window_attention",
                        lambda *a: calls.append(a[3]) or flex_window_attention(*a))
    run.generate.main(argv + ["--window-kernel", "flex"])
    assert capsys.readouterr().out == band
    assert calls == [8, 8]  # the prefill of both layers went through flex
