"""What the training tests share: a tiny model and a run of a few steps of it on the small
corpus of conftest's `text_file` fixture."""

from pathlib import Path

from fgpt import GPTConfig
from fgpt.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32)


def tiny_run(text_file, **kw) -> TrainConfig:
    base = dict(model=TINY, data=str(text_file), steps=6, batch_size=4, lr=3e-3, warmup=2,
                seed=0, eval_interval=0, checkpoint_interval=0, progress=False)
    return TrainConfig(**{**base, **kw})

