"""transformers' GPT-2, the independent reference: tiny random models and the two HF file
layouts (save_pretrained's, and the hub's that we write by hand)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import transformers
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()  # tiny vocabularies make it warn about bos/eos ids

# (vocab, n_ctx, n_layer, n_head, n_embd): odd layer counts, small and uneven dims
CONFIGS = [(97, 32, 1, 1, 16), (101, 24, 3, 4, 32), (64, 40, 2, 2, 24), (50, 16, 3, 3, 48)]


def hf_model(vocab: int, n_ctx: int, n_layer: int, n_head: int, n_embd: int, *, seed: int = 0,
             init: float = 0.2) -> GPT2LMHeadModel:
    """A random GPT-2. A wide init (0.2, not 0.02) makes greedy decoding pick varied tokens."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, initializer_range=init)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and layer norms, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hub_style(model: GPT2LMHeadModel, directory: Path, *, with_config: bool = True) -> Path:
    """The layout of the files on huggingface.co: no `transformer.` prefix, the causal-mask
    buffers `h.N.attn.bias` / `h.N.attn.masked_bias`, no lm_head."""
    directory.mkdir(parents=True, exist_ok=True)
    n_ctx = model.config.n_positions
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith("transformer.")}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.uint8))[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    if with_config:
        model.config.to_json_file(directory / "config.json")
    return directory / "model.safetensors"


def hf_logits(model: GPT2LMHeadModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
