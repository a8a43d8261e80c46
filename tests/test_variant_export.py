"""A variant checkpoint never passes for GPT-2: its config.json names fgpt's own model type,
which transformers refuses, while fgpt loads it as before and plain GPT-2 stays exportable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, pipeline

from fgpt import GPTConfig, forward, init_params, load_checkpoint, save_checkpoint, tree
from hf_reference import hf_logits, rel_err

BASE = dict(vocab_size=53, n_ctx=16, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {"rope": dict(pos_emb="rope"), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1),
            "window": dict(window=4), "one windowed layer": dict(window=(None, 6)),
            "all three": dict(pos_emb="rope", n_kv_head=2, window=5)}


def params_for(config: GPTConfig) -> dict:
    return tree.tree_map(lambda x: x + 0.05 * torch.randn_like(x), init_params(config, seed=1))


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformers_refuses_every_variant_and_fgpt_loads_it(variant, tmp_path):
    config = GPTConfig(**BASE, **variant)
    params = params_for(config)
    save_checkpoint(tmp_path, config, params)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("fgpt", ["FgptForCausalLM"])
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained,
                 lambda path: pipeline("text-generation", model=str(path))):
        with pytest.raises(ValueError, match="model type `fgpt`"):
            load(tmp_path)
    # named directly, GPT-2's class cannot build the variant's activation (it used to load a
    # rotary or windowed one with a random wpe / full attention, and fail GQA on shapes)
    with pytest.raises(KeyError, match="an fgpt variant"):
        GPT2LMHeadModel.from_pretrained(tmp_path)
    loaded_config, loaded = load_checkpoint(tmp_path)
    assert loaded_config == config
    tokens = torch.randint(0, 53, (2, 16))
    assert torch.equal(forward(loaded, tokens, loaded_config), forward(params, tokens, config))


@pytest.mark.parametrize("plain", [dict(), dict(n_kv_head=4), dict(dropout=0.1)],
                         ids=["default", "n_kv_head = n_head", "dropout"])
def test_a_plain_gpt2_loads_in_transformers_to_equal_logits(plain, tmp_path):
    config = GPTConfig(**BASE, **plain)
    params = params_for(config)
    save_checkpoint(tmp_path, config, params)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    tokens = torch.randint(0, 53, (2, 16))
    assert rel_err(hf_logits(hf, tokens), forward(params, tokens, config)) < 1e-5


def test_variant_checkpoints_written_before_the_model_type_still_load(tmp_path):
    """Earlier fgpt versions wrote variants as model_type gpt2 with the extra fields."""
    config = GPTConfig(**BASE, pos_emb="rope", window=4)
    save_checkpoint(tmp_path, config, init_params(config))
    old = {**json.loads((tmp_path / "config.json").read_text()), "model_type": "gpt2",
           "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_checkpoint(tmp_path)[0] == config
