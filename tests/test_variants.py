"""Every variant (learned/rope x MHA/GQA/MQA x full/window/per-layer window) end to end:
GQA == MHA with repeated K/V, the O(T·W) path == a dense mask, KV-cache decoding == full
recomputation, gradients, running past n_ctx, checkpoints, training under every strategy,
and one-line config errors. Causality and left-padded cache decoding, over random configs
of the same variants: tests/test_model_properties.py."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import fgpt.model
from fgpt import FgptError, GPTConfig, forward, init_params, load_checkpoint, loss_fn, save_checkpoint
from fgpt.attention import dense_window_attention
from fgpt.inference.kv_cache import KVCache
from fgpt.training.train import TrainConfig, train
from helpers import greedy_by_recomputation, repeat_kv_heads
from train_case import assert_reordered_losses_match

VOCAB = 37
POS = ("learned", "rope")
KV_HEADS = (None, 2, 1)  # MHA, GQA (2 groups of 2), MQA
WINDOWS = (None, 3, (3, None, 5))
COMBOS = list(itertools.product(POS, KV_HEADS, WINDOWS))


def tiny(pos_emb="learned", n_kv_head=None, window=None, n_ctx=48) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, n_ctx=n_ctx, n_layer=3, n_head=4, n_embd=32,
                     n_kv_head=n_kv_head, pos_emb=pos_emb, window=window)


def combo_id(combo) -> str:
    return "-".join(str(x) for x in combo).replace(" ", "")


@pytest.fixture(scope="module")
def models():
    """One tiny model per combination, built once."""
    return {c: (cfg := tiny(*c), init_params(cfg, seed=COMBOS.index(c))) for c in COMBOS}


def tokens_from(seed: int, *shape) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --- whole-sequence forward ----------------------------------------------------------

@given(st.sampled_from([c for c in COMBOS if c[1] is not None]), st.integers(1, 20), st.integers(0, 999))
def test_gqa_equals_mha_with_repeated_kv_heads(models, combo, T, seed):
    config, params = models[combo]
    mha_config, mha_params = repeat_kv_heads(config, params)
    assert mha_params["h"][0]["attn"]["c_attn"]["weight"].shape[1] == 3 * config.n_embd
    tokens = tokens_from(seed, 2, T)
    torch.testing.assert_close(forward(params, tokens, config), forward(mha_params, tokens, mha_config))


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] is not None], ids=combo_id)
def test_fast_window_path_equals_dense_mask_in_values_and_grads(models, combo, monkeypatch):
    """The whole model (logits and torch.func.grad of the loss) with fgpt's O(T·W) kernel
    equals the same model with the window as a dense mask."""
    config, params = models[combo]
    tokens, targets = tokens_from(1, 2, 30), tokens_from(2, 2, 30)
    fast_logits = forward(params, tokens, config)
    fast_grads = torch.func.grad(loss_fn)(params, tokens, targets, config)
    monkeypatch.setattr(fgpt.model, "attention", lambda q, k, v, window, dropout_p=0.0, kernel="band":
                        dense_window_attention(q, k, v, window))
    torch.testing.assert_close(fast_logits, forward(params, tokens, config))
    dense_grads = torch.func.grad(loss_fn)(params, tokens, targets, config)
    torch.testing.assert_close(fast_grads, dense_grads)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_func_grad_equals_autograd(models, combo):
    config, params = models[combo]
    tokens, targets = tokens_from(3, 2, 12), tokens_from(4, 2, 12)
    func_grads = torch.func.grad(loss_fn)(params, tokens, targets, config)
    leaves = fgpt.tree.tree_map(lambda x: x.detach().requires_grad_(), params)
    flat = fgpt.tree.leaves(leaves)
    auto = torch.autograd.grad(loss_fn(leaves, tokens, targets, config), flat)
    for g, a in zip(fgpt.tree.leaves(func_grads), auto):
        torch.testing.assert_close(g, a)
    assert all(g.abs().sum() > 0 for g in fgpt.tree.leaves(func_grads) if g.dim() == 2)


# --- KV cache and rolling buffers ------------------------------------------------------

def greedy_with_cache(params, config, prompt, n_new, chunk, capacity=None):
    """Prefill `prompt` [B, P] in chunks, then decode greedily one token at a time.
    Returns (tokens [B, P + n_new], logits of every decoded step [B, n_new, V])."""
    cache = KVCache.allocate(config, prompt.shape[0], capacity or prompt.shape[1] + n_new)
    for start in range(0, prompt.shape[1], chunk):
        logits = forward(params, prompt[:, start:start + chunk], config, cache=cache)[:, -1]
    tokens, steps = prompt, []
    for _ in range(n_new):
        steps.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits = forward(params, nxt, config, cache=cache)[:, -1]
    return tokens, torch.stack(steps, dim=1)


@given(st.sampled_from(COMBOS), st.integers(4, 12), st.integers(1, 8), st.integers(9, 16), st.integers(0, 999))
def test_cached_greedy_decoding_equals_full_recomputation(models, combo, P, chunk, n_new, seed):
    """Prompts longer than the window (3), chunked prefill into rolling buffers, and
    generation that wraps a 3-slot buffer several times."""
    config, params = models[combo]
    prompt = tokens_from(seed, 2, P)
    cached_tokens, cached_logits = greedy_with_cache(params, config, prompt, n_new, chunk)
    full_tokens, full_logits = greedy_by_recomputation(params, config, prompt, n_new)
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached_tokens, full_tokens)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] is not None], ids=combo_id)
def test_rolling_buffer_memory_stays_flat(models, combo):
    config, _ = models[combo]
    short, long = KVCache.allocate(config, 1, 50), KVCache.allocate(config, 1, 5000)
    windowed = [i for i, w in enumerate(config.layer_windows) if w is not None]
    for i in windowed:
        assert short.k[i].shape == long.k[i].shape == (1, config.kv_heads, config.layer_windows[i],
                                                       config.head_dim)


def test_cache_overflow_is_a_clear_error(models):
    config, params = models[("rope", 2, 3)]
    cache = KVCache.allocate(config, 1, 4)
    forward(params, tokens_from(0, 1, 4), config, cache=cache)
    with pytest.raises(FgptError, match="capacity 4"):
        forward(params, tokens_from(0, 1, 1), config, cache=cache)


# --- past n_ctx --------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 3], ids=["full", "window"])
def test_rope_model_runs_past_n_ctx(window):
    config = tiny("rope", 2, window, n_ctx=8)
    params = init_params(config, seed=5)
    prompt = tokens_from(6, 1, 6)
    cached_tokens, cached_logits = greedy_with_cache(params, config, prompt, 18, chunk=4)
    full_tokens, full_logits = greedy_by_recomputation(params, config, prompt, 18)
    assert cached_tokens.shape[1] == 24 > config.n_ctx
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-5, rtol=1e-5)


def test_learned_positions_stop_at_n_ctx():
    config = tiny("learned", 2, 3, n_ctx=8)
    params = init_params(config)
    with pytest.raises(FgptError, match="n_ctx=8"):
        forward(params, tokens_from(0, 1, 9), config)
    cache = KVCache.allocate(config, 1, 20)
    forward(params, tokens_from(0, 1, 8), config, cache=cache)
    with pytest.raises(FgptError, match="n_ctx=8"):
        forward(params, tokens_from(0, 1, 1), config, cache=cache)


# --- checkpoints and config errors ------------------------------------------------------

@pytest.mark.parametrize("combo", [("rope", 2, (3, None, 5)), ("learned", 1, 3)], ids=combo_id)
def test_variant_checkpoint_round_trip(models, combo, tmp_path):
    config, params = models[combo]
    save_checkpoint(tmp_path / "ckpt", config, params)
    loaded_config, loaded_params = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    tokens = tokens_from(0, 2, 10)
    torch.testing.assert_close(forward(loaded_params, tokens, loaded_config), forward(params, tokens, config))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_head=4, n_kv_head=0), "multiple of n_kv_head"),
    (dict(n_head=4, n_embd=12, pos_emb="rope"), "even head dim"),
    (dict(window=0), "window must be"),
    (dict(window=-2), "window must be"),
    (dict(window=(4, 0, None)), "window must be"),
    (dict(window=(4, None)), "window list has 2 entries for 3 layers"),
    (dict(window=2.5), "window must be"),
    (dict(pos_emb="alibi"), "pos_emb"),
])
def test_bad_variant_configs_are_one_line_errors(kwargs, message):
    base = dict(vocab_size=VOCAB, n_ctx=16, n_layer=3, n_head=4, n_embd=32)
    with pytest.raises(FgptError, match=message) as info:
        GPTConfig(**{**base, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.slow  # three torchrun launches
def test_a_variant_trains_alike_under_every_strategy(tmp_path, monkeypatch):
    """rope + GQA + a per-layer window through `python -m run.train` on 2 gloo ranks for ddp,
    fsdp and custom-fsdp: the same losses as the single-device run, the variant in config.json."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "code.txt"
    data.write_text("".join(f"def f{i % 11}(x):\n    return x * {i % 5}\n\n" for i in range(300)))
    config = GPTConfig(n_ctx=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, pos_emb="rope", window=(4, None))
    flags = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--n-ctx", "16", "--n-kv-head", "2",
             "--pos-emb", "rope", "--window", "4,none", "--steps", "4", "--batch-size", "4",
             "--eval-interval", "0", "--precision", "fp32", "--data", str(data), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    reference = train(TrainConfig(model=config, steps=4, batch_size=4, eval_interval=0, data=str(data),
                                  progress=False))
    strategies = ("ddp", "fsdp", "custom-fsdp")
    procs = {s: subprocess.Popen([sys.executable, "-m", "run.train", f"strategy={s}", "nproc=2", *flags,
                                  "--out", str(tmp_path / s)], cwd=root, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for s in strategies}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stderr[-3000:])
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        # 2 ranks of half a batch against one process with the whole batch: reordered sums
        assert_reordered_losses_match([r["loss"] for r in rows], [r["loss"] for r in reference.metrics])
        assert load_checkpoint(tmp_path / name)[0] == config


@pytest.mark.parametrize("window", [3, (2, None, 5)])
def test_dense_window_kernel_gives_the_band_kernels_loss_and_gradients(window):
    from fgpt import tree
    config = GPTConfig(vocab_size=31, n_ctx=40, n_layer=3, n_head=4, n_embd=16, n_kv_head=2, pos_emb="rope",
                       window=window)
    params = init_params(config, seed=1)
    x = torch.randint(0, 31, (2, 40), generator=torch.Generator().manual_seed(0))
    grad = torch.func.grad_and_value(loss_fn)
    band = grad(params, x[:, :-1], x[:, 1:], config)
    dense = grad(params, x[:, :-1], x[:, 1:], config, window_kernel="dense")
    torch.testing.assert_close(dense[1], band[1], rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(tree.flatten(dense[0]).items(), tree.flatten(band[0]).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=path)


@pytest.mark.parametrize("kernel", ["band", "dense"])
def test_a_strategy_computes_windowed_layers_with_the_kernel_it_was_given(kernel, monkeypatch):
    import fgpt.attention
    from fgpt.parallel import make_strategy
    dense_calls = []
    dense = fgpt.attention.dense_window_attention
    monkeypatch.setattr(fgpt.attention, "dense_window_attention",
                        lambda *a, **k: dense_calls.append(a[3]) or dense(*a, **k))
    config = GPTConfig(vocab_size=31, n_ctx=16, n_layer=2, n_head=2, n_embd=8, window=(4, None))
    strategy = make_strategy("single", window_kernel=kernel)
    strategy.setup(init_params(config), config, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), precision="fp32")
    x = torch.randint(0, 31, (2, 16), generator=torch.Generator().manual_seed(0))
    strategy.forward_backward(x[:, :-1], x[:, 1:], scale=1.0, sync=True)
    strategy.eval_loss(x[:, :-1], x[:, 1:])
    assert dense_calls == ([4, 4] if kernel == "dense" else [])  # the windowed layer, in training and evaluation
