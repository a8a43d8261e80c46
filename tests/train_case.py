"""What the training tests share: a tiny model and a run of a few steps of it on the small
corpus of conftest's `text_file` fixture."""

from pathlib import Path

from fgpt import GPTConfig
from fgpt.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The training tests' corpus (conftest's `text_file`): small code a tiny model learns within a few steps.
TEXT = "".join(f"def add_{i % 7}(x):\n    return x + {i % 7}\n\n" for i in range(400))
TINY = GPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32)


def tiny_run(text_file, **kw) -> TrainConfig:
    base = dict(model=TINY, data=str(text_file), steps=6, batch_size=4, lr=3e-3, warmup=2,
                seed=0, eval_interval=0, checkpoint_interval=0, progress=False)
    return TrainConfig(**{**base, **kw})



# Two fp32 runs whose sums are added in another order (a batch split across ranks or
# micro-batches; another thread count: torchrun starts each rank with OMP_NUM_THREADS=1; another
# CPU's kernels) give losses that differ by rounding alone, and Adam's normalised steps carry
# that into the weights. Seen: 2e-5 relative after 4 steps on AVX-512 kernels, ~1e-6 on AVX2;
# this allows 5x the worst seen. Where nothing differs (same process layout, threads and
# batch split) the claim is bitwise, and tests compare with `==` instead.
REORDERED_FP32 = 1e-4


def assert_reordered_losses_match(got: list[float], reference: list[float]) -> None:
    """`got` equals `reference` step for step up to fp32 reordering; and the bound is tighter
    than any step-to-step change of the reference, so a loss of the wrong step (a batch
    skipped or repeated, a resume off by one) cannot pass."""
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(got, reference), 1):
        assert abs(a - b) <= REORDERED_FP32 * abs(b), (step, a, b)
    changes = [abs(b - a) / abs(a) for a, b in zip(reference, reference[1:])]
    assert not changes or min(changes) > REORDERED_FP32, min(changes)
