"""MHA -> GQA conversion: mean-pooling K/V heads, exact when the heads of a group agree."""

import subprocess
import sys

import pytest
import torch
from einops import rearrange
from hypothesis import given, strategies as st

from fgpt import FgptError, GPTConfig, forward, init_params, load_checkpoint, save_checkpoint
from fgpt.convert import to_gqa
from helpers import repeat_kv_heads
from run import convert as convert_cli

VOCAB = 29


def tiny(n_head, n_kv_head=None, pos_emb="learned", window=None) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, n_ctx=24, n_layer=2, n_head=n_head, n_embd=4 * n_head,
                     n_kv_head=n_kv_head, pos_emb=pos_emb, window=window)


@st.composite
def gqa_cases(draw):
    n_kv_head = draw(st.integers(1, 3))
    n_head = n_kv_head * draw(st.integers(1, 3))
    pos_emb = draw(st.sampled_from(["learned", "rope"]))
    window = draw(st.sampled_from([None, 4]))
    return tiny(n_head, n_kv_head, pos_emb, window), draw(st.integers(0, 999))


@given(gqa_cases())
def test_pooling_heads_that_agree_within_groups_is_exact(case):
    config, seed = case
    params = init_params(config, seed=seed)
    mha_config, mha_params = repeat_kv_heads(config, params)
    pooled_config, pooled_params = to_gqa(mha_config, mha_params, config.kv_heads)
    assert pooled_config.kv_heads == config.kv_heads
    for a, b in zip(pooled_params["h"], params["h"]):
        torch.testing.assert_close(a["attn"]["c_attn"], b["attn"]["c_attn"])
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(forward(pooled_params, tokens, pooled_config),
                               forward(mha_params, tokens, mha_config))


@given(st.sampled_from([(4, 2), (4, 1), (6, 3), (6, 2), (4, 4)]), st.integers(0, 999))
def test_pooled_kv_heads_are_group_means(heads, seed):
    n_head, n_kv_head = heads
    config = tiny(n_head)
    params = init_params(config, seed=seed)
    new_config, new_params = to_gqa(config, params, n_kv_head)
    hd, m = config.head_dim, n_head // n_kv_head
    for old, new in zip(params["h"], new_params["h"]):
        for name in ("weight", "bias"):
            w_old, w_new = old["attn"]["c_attn"][name], new["attn"]["c_attn"][name]
            assert w_new.shape[-1] == (n_head + 2 * n_kv_head) * hd
            torch.testing.assert_close(w_new[..., :n_head * hd], w_old[..., :n_head * hd])  # queries kept
            for part in (0, 1):  # k, then v
                old_heads = rearrange(w_old[..., (n_head + part * n_head) * hd:][..., :n_head * hd],
                                      "... (h d) -> h ... d", d=hd)
                new_heads = rearrange(w_new[..., (n_head + part * n_kv_head) * hd:][..., :n_kv_head * hd],
                                      "... (h d) -> h ... d", d=hd)
                for g in range(n_kv_head):
                    torch.testing.assert_close(new_heads[g], old_heads[g * m:(g + 1) * m].mean(0))
    assert new_config.n_kv_head == (None if n_kv_head == n_head else n_kv_head)
    assert params["h"][0]["attn"]["c_attn"]["weight"].shape[-1] == 3 * config.n_embd  # input untouched


@pytest.mark.parametrize("n_head, n_kv_head, target, message", [
    (4, None, 3, "does not divide n_head=4"),
    (4, None, 0, "positive integer"),
    (4, 2, 4, "only 2 kv heads"),
    (12, 4, 3, "do not split evenly"),
])
def test_bad_targets_are_clear_errors(n_head, n_kv_head, target, message):
    config = tiny(n_head, n_kv_head)
    with pytest.raises(FgptError, match=message):
        to_gqa(config, init_params(config), target)


@pytest.mark.slow  # a subprocess per case
def test_cli_writes_a_loadable_gqa_checkpoint(tmp_path):
    config = tiny(4, 2, "rope", window=(4, None))
    _, mha_params = repeat_kv_heads(config, init_params(config, seed=3))
    save_checkpoint(tmp_path / "mha", config.replace(n_kv_head=None), mha_params)
    convert_cli.main(["--checkpoint", str(tmp_path / "mha"), "--to-gqa", "2", "--out", str(tmp_path / "gqa")])
    gqa_config, gqa_params = load_checkpoint(tmp_path / "gqa")
    assert gqa_config == config
    tokens = torch.randint(0, VOCAB, (1, 10))
    torch.testing.assert_close(forward(gqa_params, tokens, gqa_config),
                               forward(mha_params, tokens, config.replace(n_kv_head=None)))


@pytest.mark.slow  # a subprocess per case
def test_cli_never_overwrites_a_checkpoint_unless_forced(tmp_path):
    config = tiny(4)
    save_checkpoint(tmp_path / "mha", config, init_params(config))
    save_checkpoint(tmp_path / "old", config, init_params(config, seed=1))
    before = (tmp_path / "old" / "model.safetensors").read_bytes()
    cmd = [sys.executable, "-m", "run.convert", "--checkpoint", str(tmp_path / "mha"), "--to-gqa", "2",
           "--out", str(tmp_path / "old")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: --out {tmp_path / 'old'} already holds model.safetensors and "
                                  "config.json; give another --out, or --force to overwrite")
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    assert subprocess.run([*cmd, "--force"], capture_output=True).returncode == 0
    assert load_checkpoint(tmp_path / "old")[0].kv_heads == 2


@pytest.mark.slow  # a subprocess per case
def test_cli_never_writes_over_its_input_even_forced(tmp_path):
    config = tiny(4)
    save_checkpoint(tmp_path / "mha", config, init_params(config))
    before = (tmp_path / "mha" / "model.safetensors").read_bytes()
    run = subprocess.run([sys.executable, "-m", "run.convert", "--checkpoint", str(tmp_path / "mha"),
                          "--to-gqa", "2", "--out", str(tmp_path / "mha"), "--force"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: --out {tmp_path / 'mha'} is the input --checkpoint")
    assert len(run.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mha" / "model.safetensors").read_bytes() == before


@pytest.mark.slow  # a subprocess per case
def test_cli_bad_target_is_a_one_line_error(tmp_path):
    config = tiny(4)
    save_checkpoint(tmp_path / "mha", config, init_params(config))
    run = subprocess.run([sys.executable, "-m", "run.convert", "--checkpoint", str(tmp_path / "mha"),
                          "--to-gqa", "3", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --to-gqa 3 does not divide n_head=4"
    assert not (tmp_path / "out").exists()
