"""GPTConfig: the frozen settings of a model, its presets, and how to read them from files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fgpt.errors import FgptError

GPT2_VOCAB = 50257
# Variants (rotary, GQA, windowed) are written under fgpt's own model type: transformers then
# refuses them (AutoModel*, pipeline) instead of loading them as full-attention GPT-2.
FGPT_MODEL_TYPE, FGPT_ARCHITECTURE = "fgpt", "FgptForCausalLM"
# A variant's activation_function: still gelu_new, but a name transformers' GPT-2 code cannot
# look up, so GPT2LMHeadModel.from_pretrained raises with this text rather than run a rotary
# or windowed model with learned positions (a random wpe) or full attention
VARIANT_ACTIVATION = "gelu_new; an fgpt variant that GPT-2's code would run wrongly: load it with fgpt"


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # GQA: None = n_head (MHA), 1 = MQA
    pos_emb: str = "learned"  # "learned" | "rope"
    rope_base: float = 10000.0
    window: int | tuple[int | None, ...] | None = None  # sliding window, or one per layer
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if isinstance(self.window, list):  # keep the dataclass hashable
            object.__setattr__(self, "window", tuple(self.window))
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FgptError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise FgptError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise FgptError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos_emb not in ("learned", "rope"):
            raise FgptError(f"pos_emb must be 'learned' or 'rope', got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise FgptError(f"rope needs an even head dim, got {self.head_dim}")
        if self.rope_base <= 1:
            raise FgptError(f"rope_base must be > 1, got {self.rope_base}")
        if isinstance(self.window, tuple) and len(self.window) != self.n_layer:
            raise FgptError(f"window list has {len(self.window)} entries for {self.n_layer} layers")
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise FgptError(f"window must be a positive integer or None, got {w!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FgptError(f"dropout must be in [0, 1), got {self.dropout}")

    # Derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The attention window of each layer (None = full causal)."""
        if isinstance(self.window, tuple):
            return self.window
        return (self.window,) * self.n_layer

    @property
    def max_window(self) -> int | None:
        """The longest context any layer looks at; None when some layer is full-attention."""
        ws = self.layer_windows
        return None if any(w is None for w in ws) else max(ws)

    @property
    def is_plain_gpt2(self) -> bool:
        """Learned positions, multi-head, full attention: what transformers' GPT-2 computes."""
        return (self.pos_emb == "learned" and self.kv_heads == self.n_head
                and all(w is None for w in self.layer_windows))

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    # Presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise FgptError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # HF config.json ------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """An HF GPT-2 config.json; fgpt's extra fields ride along (HF ignores unknown keys).
        A variant says `model_type: fgpt`, which transformers' Auto classes do not know, and an
        activation_function that GPT2LMHeadModel cannot build, so transformers refuses the
        checkpoint rather than run it with GPT-2's positions and attention."""
        plain = self.is_plain_gpt2
        d = {
            "architectures": ["GPT2LMHeadModel" if plain else FGPT_ARCHITECTURE],
            "model_type": "gpt2" if plain else FGPT_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "activation_function": "gelu_new" if plain else VARIANT_ACTIVATION,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
        }
        d.update(n_kv_head=self.n_kv_head, pos_emb=self.pos_emb, rope_base=self.rope_base,
                 window=list(self.window) if isinstance(self.window, tuple) else self.window)
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """Read an HF GPT-2 config.json (plain HF files mean learned / MHA / full attention) or
        an fgpt variant's (model_type fgpt; older fgpt files said gpt2 with the same fields)."""
        if d.get("model_type", "gpt2") not in ("gpt2", FGPT_MODEL_TYPE):
            raise FgptError(f"config.json describes a {d.get('model_type')!r} model, not gpt2")
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", VARIANT_ACTIVATION):
            raise FgptError(f"unsupported activation_function {d['activation_function']!r}")
        if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
            raise FgptError("n_inner other than 4*n_embd is not supported")
        n_ctx = d.get("n_positions", d.get("n_ctx", 1024))
        try:
            return cls(
                vocab_size=d.get("vocab_size", GPT2_VOCAB), n_ctx=n_ctx,
                n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=d.get("n_embd", 768),
                n_kv_head=d.get("n_kv_head"), pos_emb=d.get("pos_emb", "learned"),
                rope_base=float(d.get("rope_base", 10000.0)), window=d.get("window"),
                dropout=float(d.get("resid_pdrop", 0.0)) if "pos_emb" in d else 0.0,
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            )
        except TypeError as e:
            raise FgptError(f"bad config.json: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "GPTConfig":
        try:
            return cls.from_hf_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise FgptError(f"cannot read config {path}: {e}") from None


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, n_ctx=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_ctx=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_ctx=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_ctx=1024),
}
