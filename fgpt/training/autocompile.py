"""`--compile auto` (run.train's default): compile the single-device step where the run is
long enough to pay for the compile on this device.

    decision = choose(strategy="single", recompute="none", precision="bf16", step_flops=...,
                      steps_left=120, matmul_flops=lambda: measured)
    decision.on, decision.reason   # False, "--compile auto: off (120 steps x ~0.98 s eager x 10% saved ...)"

The estimate is deliberately plain: compiling pays when

    steps left x eager step time x SAVING  >  COMPILE_S

- eager step time: the step's FLOPs (fgpt.training.metrics.flops_per_token x tokens) over EAGER_SHARE of this
  device's measured matmul FLOP/s in the run's precision (a 1024^3 matmul timed at start-up:
  fgpt.training.metrics.measured_flops);
- SAVING: the share of an eager step that compiled code saved in `just bench train --compile`
  on a 2-core AVX-512 CPU, on the training loop's kept heap (fgpt/heap.py): the tiny preset
  at 8 x 256 (the default run), bf16 0.10, fp32 0.07; 124M at 4 x 256 saved nothing there
  (an eager step spends 88% in the matrix products and attention); applied to every model
  size and heap alike (on glibc's heap 124M saved 29% bf16 / 15% fp32). Other devices unmeasured;
- compile time: COMPILE_S, the first compiled step's extra seconds on that CPU with the
  machine idle (7-12 s for 124M, 23-33 s for the tiny preset), rounded up; where the matmul measures slower than it did
  there (REFERENCE_FLOPS), as on cores shared with other work, scaled up alike: under load
  the compile slowed as the steps did (165 s for the tiny preset against 8.4 s eager steps,
  load average 10). Never scaled down: a faster matmul does not make the compiler faster.
Only strategy=single compiles (the others run eagerly whatever --compile says), and a run
that recomputes activations (--recompute) is left eager: that pairing was not measured.
A compile that fails (no C++ compiler, an unsupported Python) falls back to eager code with
one warning (fgpt/parallel/single.py); --compile on / off skip the estimate.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from fgpt.errors import FgptError

CHOICES = ("auto", "on", "off")
SAVING = {"bf16": 0.10, "fp32": 0.07}
EAGER_SHARE = 0.5
COMPILE_S = 40.0
REFERENCE_FLOPS = {"bf16": 344e9, "fp32": 104e9}  # that CPU's 1024^3 matmul, idle


def check(value: str) -> str:
    if value not in CHOICES:
        raise FgptError(f"--compile must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


class Decision(NamedTuple):
    on: bool
    reason: str  # one line for stderr


def choose(*, strategy: str, recompute: str, precision: str, step_flops: float, steps_left: int,
           matmul_flops: Callable[[], float]) -> Decision:
    """Whether `--compile auto` compiles this run, and the one line that says why.
    `step_flops`: one optimizer step's FLOPs on this process; `matmul_flops()`: this device's measured matmul FLOP/s in `precision` (asked only for
    a run that could compile)."""
    if strategy != "single":
        return Decision(False, f"--compile auto: off (strategy={strategy} runs eagerly; only single compiles)")
    if recompute != "none":
        return Decision(False, f"--compile auto: off (--recompute {recompute}: compiling it was not measured)")
    flops = matmul_flops()
    step_s = step_flops / (EAGER_SHARE * flops)
    saved = steps_left * step_s * SAVING[precision]
    compile_s = COMPILE_S * max(1.0, REFERENCE_FLOPS[precision] / flops)
    on = saved > compile_s
    verdict = "on" if on else "off"
    relation = ">" if on else "<="
    step = f"{step_s:.2f}" if step_s < 10 else f"{step_s:.0f}"
    return Decision(on, f"--compile auto: {verdict} ({steps_left} steps x ~{step} s eager x "
                        f"{SAVING[precision]:.0%} saved = ~{saved:.0f} s {relation} ~{compile_s:.0f} s to compile; "
                        f"--compile on|off to choose)")
