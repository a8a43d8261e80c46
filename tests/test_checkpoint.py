"""Checkpoint files: shards, dtype, export to transformers, atomic saves, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fgpt import FgptError, GPTConfig, forward, init_params, load_checkpoint, save_checkpoint, tree
from fgpt import checkpoint
from fgpt.checkpoint import latest_checkpoint
from helpers import assert_same_tree, wide_params
from hf_reference import CONFIGS, hf_logits, hf_model, rel_err, save_hub_style


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    model = hf_model(*CONFIGS[1])
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    config_one, one = load_checkpoint(tmp_path / "one")
    config_sharded, sharded = load_checkpoint(tmp_path / "sharded")
    assert config_one == config_sharded
    assert_same_tree(one, sharded)


def test_dtype_option_casts_every_tensor(tmp_path):
    hf_model(*CONFIGS[2]).save_pretrained(tmp_path)
    _, fp32 = load_checkpoint(tmp_path)
    _, bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert_same_tree(bf16, tree.cast(fp32, torch.bfloat16))


@pytest.mark.parametrize("shape", CONFIGS[1:3])
def test_export_loads_in_transformers_with_the_same_logits(shape, tmp_path):
    from transformers import GPT2LMHeadModel
    vocab, n_ctx, n_layer, n_head, n_embd = shape
    config = GPTConfig(vocab_size=vocab, n_ctx=n_ctx, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    params = wide_params(config, seed=3, scale=0.05)
    save_checkpoint(tmp_path, config, params)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, vocab, (2, n_ctx))
    assert rel_err(hf_logits(hf, tokens), forward(params, tokens, config)) < 1e-5


@pytest.mark.parametrize("variant", [dict(pos_emb="rope", n_kv_head=1, window=4),
                                     dict(window=(None, 3, 5)), dict()])
def test_save_load_round_trip_keeps_config_and_tensors(variant, tmp_path):
    config = GPTConfig(vocab_size=40, n_ctx=16, n_layer=3, n_head=2, n_embd=16, **variant)
    params = init_params(config, seed=1)
    save_checkpoint(tmp_path / "run", config, params)
    loaded_config, loaded = load_checkpoint(tmp_path / "run")
    assert loaded_config == config
    assert_same_tree(loaded, params)


def test_save_is_atomic(tmp_path, monkeypatch):
    config = GPTConfig(vocab_size=40, n_ctx=8, n_layer=1, n_head=2, n_embd=8)
    first = init_params(config, seed=0)
    save_checkpoint(tmp_path, config, first)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, config, init_params(config, seed=1))
    assert (tmp_path / "model.safetensors").read_bytes() == before  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def test_latest_checkpoint_is_the_newest_written(tmp_path):
    config = GPTConfig(vocab_size=40, n_ctx=8, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(FgptError, match="no checkpoint"):
        latest_checkpoint(tmp_path)
    for i, run in enumerate(["b", "a", "c/step"]):
        save_checkpoint(tmp_path / run, config, init_params(config))
        os.utime(tmp_path / run / "model.safetensors", (1000 + i, 1000 + i))
    os.utime(tmp_path / "a" / "model.safetensors", (5000, 5000))
    assert latest_checkpoint(tmp_path) == tmp_path / "a"


# --- bad input ---------------------------------------------------------------------------

@pytest.fixture
def hub_file(tmp_path) -> Path:
    return save_hub_style(hf_model(*CONFIGS[1]), tmp_path / "ckpt")


def rewrite(file: Path, edit) -> None:
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def test_missing_path():
    with pytest.raises(FgptError, match="not found"):
        load_checkpoint("/no/such/checkpoint.safetensors")


def test_truncated_and_foreign_files(hub_file):
    data = hub_file.read_bytes()
    hub_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FgptError, match="not a readable safetensors file"):
        load_checkpoint(hub_file)
    hub_file.write_bytes(b"PK\x03\x04 this is a zip, or a pickle, or anything else" * 4)
    with pytest.raises(FgptError, match="not a readable safetensors file"):
        load_checkpoint(hub_file)


def test_unknown_key_is_named(hub_file):
    rewrite(hub_file, lambda s: s.__setitem__("h.0.attn.extra.weight", torch.zeros(2)))
    with pytest.raises(FgptError, match=r"unknown keys h\.0\.attn\.extra\.weight"):
        load_checkpoint(hub_file)


def test_missing_key_is_named(hub_file):
    rewrite(hub_file, lambda s: s.pop("h.2.mlp.c_fc.bias"))
    with pytest.raises(FgptError, match=r"missing keys h\.2\.mlp\.c_fc\.bias"):
        load_checkpoint(hub_file)


def test_shape_contradicting_config_json(hub_file):
    config = json.loads((hub_file.parent / "config.json").read_text())
    (hub_file.parent / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(FgptError, match=r"wte\.weight has shape \[101, 32\] but config\.json says \[101, 64\]"):
        load_checkpoint(hub_file)


def test_untied_lm_head_is_refused(hub_file):
    rewrite(hub_file, lambda s: s.__setitem__("lm_head.weight", torch.randn_like(s["wte.weight"])))
    with pytest.raises(FgptError, match="lm_head.weight differs"):
        load_checkpoint(hub_file)


@pytest.mark.parametrize("hub", ["offline", "not installed"])
def test_hub_name_without_the_hub_says_how_to_pass_a_local_file(hub, monkeypatch):
    import sys
    import huggingface_hub.constants
    if hub == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FgptError, match="openai-community/gpt2 .*--checkpoint DIR"):
        load_checkpoint("gpt2")
