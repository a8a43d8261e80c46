"""fgpt: GPT-2 as pure functions over explicit parameter trees."""

import importlib

from fgpt.config import GPTConfig
from fgpt.errors import FgptError

__all__ = ["GPTConfig", "FgptError", "init_params", "forward", "loss_fn", "count_params",
           "load_checkpoint", "save_checkpoint", "latest_checkpoint"]

# Imported on first use: torch and safetensors load only for code that needs them, so
# `python -m run.prepare` (numpy + tiktoken) starts without them.
_LAZY = {"init_params": "fgpt.model", "forward": "fgpt.model", "loss_fn": "fgpt.model",
         "count_params": "fgpt.model", "load_checkpoint": "fgpt.checkpoint",
         "save_checkpoint": "fgpt.checkpoint", "latest_checkpoint": "fgpt.checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fgpt' has no attribute {name!r}")
