"""fgpt's forward over checkpoints from transformers gives transformers' logits (fp32)."""

from __future__ import annotations

import pytest
import torch

from fgpt import forward, load_checkpoint
from hf_reference import CONFIGS, hf_logits, hf_model, rel_err, save_hub_style

TOL = 1e-5


def tokens_for(vocab: int, n_ctx: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n_ctx), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda s: "V{}-ctx{}-L{}-H{}-d{}".format(*s))
@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_logits_match_transformers(shape, layout, tmp_path):
    model = hf_model(*shape)
    if layout == "save_pretrained":
        model.save_pretrained(tmp_path)
        path = tmp_path
    else:
        path = save_hub_style(model, tmp_path)  # the .safetensors file itself
    config, params = load_checkpoint(path)
    tokens = tokens_for(shape[0], shape[1])  # the full context: every position embedding
    assert rel_err(forward(params, tokens, config), hf_logits(model, tokens)) < TOL


def test_config_inferred_from_shapes_without_config_json(tmp_path):
    # head size 64, as in every GPT-2, is what inference assumes when n_embd allows it
    model = hf_model(vocab=80, n_ctx=20, n_layer=3, n_head=1, n_embd=64)
    save_hub_style(model, tmp_path, with_config=False)
    config, params = load_checkpoint(tmp_path)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_ctx, config.vocab_size) == (3, 1, 64, 20, 80)
    tokens = tokens_for(80, 20)
    assert rel_err(forward(params, tokens, config), hf_logits(model, tokens)) < TOL


def test_tied_lm_head_in_file_is_accepted(tmp_path):
    from safetensors.torch import save_file
    model = hf_model(*CONFIGS[1])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(tmp_path / "config.json")
    config, params = load_checkpoint(tmp_path)
    tokens = tokens_for(CONFIGS[1][0], 8)
    assert rel_err(forward(params, tokens, config), hf_logits(model, tokens)) < TOL
