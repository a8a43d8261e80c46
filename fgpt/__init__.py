"""fgpt: GPT-2 as pure functions over explicit parameter trees."""

from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.model import count_params, forward, init_params, loss_fn

__all__ = ["GPTConfig", "FgptError", "init_params", "forward", "loss_fn", "count_params",
           "load_checkpoint", "save_checkpoint", "latest_checkpoint"]


def __getattr__(name):  # checkpoint I/O imports safetensors lazily
    if name in ("load_checkpoint", "save_checkpoint", "latest_checkpoint"):
        from fgpt import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(name)
