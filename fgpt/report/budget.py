"""The study's sizes and its pre-registered rules. Presets from two CPU cores to GPT-2 124M
on many GPUs (`PRESETS`: quick = the test, cpu = the committed report, gpu-smoke, gpu,
gpt2), any field of which a TOML budget file overrides (`with_file`). Everything a verdict
depends on is fixed here, before any number is measured, and printed in the report.

The language models are built so that attention matters: the corpus keeps its most frequent
GPT-2 ids (the rest become one UNK id whose targets are left out of the loss), which shrinks
the tied embedding from most of the parameters of a small GPT-2 to about a quarter, and the
context is long enough (256) for windows, positions and KV heads to make a difference.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from fgpt.config import GPTConfig
from fgpt.errors import FgptError


@dataclass(frozen=True)
class Budget:
    name: str
    # the language models -------------------------------------------------------------
    vocab_size: int  # kept GPT-2 ids + 1 UNK (restrict_vocab); else GPT-2's 50257
    n_layer: int
    n_head: int
    n_embd: int
    n_ctx: int
    batch_size: int
    lr: float
    warmup_frac: float
    cooldown: float  # wsd: the last fraction of the steps decays; evaluations before it share one lr
    evals_per_run: int  # mid-run validation points (the convergence curves)
    eval_batches: int  # batches of batch_size windows per mid-run evaluation
    final_eval_windows: int  # fixed evaluation set (evenly spaced windows of n_ctx) for every arm
    train_minutes: float  # wall-clock for all training runs; the pilot turns it into steps
    min_steps: int
    max_steps: int
    pilot_steps: int
    seeds: tuple[int, ...]  # main arms (>= 3 unless smoke: paired t-intervals)
    sweep_seeds: tuple[int, ...]  # the KV-head sweep's extra arms
    window: int | None  # the SWA arm's window; None: chosen by WINDOW_RULE from baseline seed 0
    main_kv_head: int  # the GQA arm with seeds; other divisors of n_head are the sweep
    uptrain_percents: tuple[float, ...]  # MHA -> GQA uptraining ladder, % of pre-training steps
    uptrain_lr_frac: float  # uptraining lr as a fraction of the peak lr (constant after warmup)
    # probes on the language models ----------------------------------------------------
    context_cuts: tuple[int, ...]  # context lengths whose loss is compared with n_ctx
    context_targets: int
    length_mult: int  # evaluate to length_mult x n_ctx
    length_seqs: int
    length_stride: int  # the sliding-n_ctx reference scores the last `stride` tokens of a window
    copy_distances: tuple[int, ...]
    copy_span: int
    copy_seqs: int
    bootstrap: int  # resamples for bootstrap intervals
    # the relay probe (flip-flop-like; fgpt.report.relay) --------------------------------
    relay_models: tuple[tuple[int, int | None], ...]  # (layers, window)
    relay_seq_len: int
    relay_steps: int
    relay_batch: int
    relay_seeds: tuple[int, ...]
    relay_eval_seqs: int
    # efficiency ----------------------------------------------------------------------
    kv_contexts: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_runs: int
    decode_tokens: int
    decode_layers: int  # GPT-2 width, this many layers, the study's vocabulary
    decode_window: int
    kernel_lengths: tuple[int, ...]
    kernel_dense_max: int  # the dense-mask reference needs T^2 memory: stop there
    kernel_heads: int
    kernel_head_dim: int
    kernel_window: int
    kernel_repeats: int
    step_lengths: tuple[int, ...]  # training step time / memory at these T
    step_repeats: int  # timed steps per length (after one warm-up step)
    # generation ----------------------------------------------------------------------
    prompts: int
    prompt_tokens: int
    new_tokens: int
    # every run's steps, pinned (`just report --steps`); None: tokens_per_run, else the pilot fits
    # them to train_minutes
    steps: int | None = None
    tokens_per_run: int | None = None  # pins the steps to this many training tokens (rounded)
    restrict_vocab: bool = True  # keep the vocab_size - 1 most frequent ids + UNK; else all of GPT-2's
    micro_batch: int | None = None  # at most this many sequences per rank per forward (accumulation); None: all
    smoke: bool = False  # a smoke test of the path: fewer than 3 seeds allowed, verdicts not meant to hold

    @property
    def swa_arm(self) -> str:
        return f"rope+swa-{self.window}"

    @property
    def sweep_kv_heads(self) -> tuple[int, ...]:
        """Divisors of n_head reached by halving, except MHA and the main GQA arm."""
        out, h = [], self.n_head // 2
        while h >= 1:
            if self.n_head % h == 0 and h != self.main_kv_head:
                out.append(h)
            h //= 2
        return tuple(out)

    def base_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, n_ctx=self.n_ctx)

    def arms(self) -> dict[str, GPTConfig]:
        """Every trained language model: name -> config. Each variant differs from its
        comparison arm in one field: rope vs baseline, gqa-* vs baseline, rope+swa vs rope."""
        base = self.base_config()
        rope = base.replace(pos_emb="rope")
        arms = {"baseline": base, "rope": rope, f"gqa-{self.main_kv_head}": base.replace(n_kv_head=self.main_kv_head),
                f"rope+swa-{self.window}": rope.replace(window=self.window)}
        for kv in self.sweep_kv_heads:
            arms[f"gqa-{kv}"] = base.replace(n_kv_head=kv)
        return arms

    def seeds_of(self, arm: str) -> tuple[int, ...]:
        sweep = {f"gqa-{kv}" for kv in self.sweep_kv_heads}
        return self.sweep_seeds if arm in sweep else self.seeds

    def run_equivalents(self) -> float:
        """Training cost in full runs: every (arm, seed), plus the uptraining ladder (the
        converted model and its MHA control, each to the ladder's top)."""
        runs = sum(len(self.seeds_of(a)) for a in self.arms())
        return runs + 2 * len(self.seeds) * max(self.uptrain_percents) / 100

    def to_dict(self) -> dict:
        return asdict(self) | {"sweep_kv_heads": list(self.sweep_kv_heads), "warmup_percent": 100 * self.warmup_frac,
                               "cooldown_percent": 100 * self.cooldown}

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        """The budget a results.json (`to_dict`) records."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _tuples(v) for k, v in d.items() if k in names})

    def check(self) -> None:
        """Every inconsistency is one FgptError line, before anything trains."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise FgptError(f"budget {self.name}: {message}")
        for f in ("n_layer", "n_head", "n_embd", "n_ctx", "batch_size", "evals_per_run", "eval_batches",
                  "final_eval_windows", "vocab_size"):
            need(getattr(self, f) >= 1, f"{f} must be at least 1, got {getattr(self, f)}")
        need(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        need(self.n_head % self.main_kv_head == 0,
             f"main_kv_head {self.main_kv_head} does not divide n_head {self.n_head}")
        if self.window is not None:
            need(1 <= self.window < self.n_ctx and self.n_ctx % self.window == 0,
                 f"window {self.window} does not divide n_ctx {self.n_ctx} (a window of 1..n_ctx-1 that divides it)")
        need(len(self.context_cuts) > 0 and all(1 <= k < self.n_ctx and self.n_ctx % k == 0 for k in self.context_cuts),
             f"context_cuts {list(self.context_cuts)}: each must divide n_ctx {self.n_ctx} and be below it")
        need(self.smoke or len(self.seeds) >= 3,
             f"seeds {list(self.seeds)}: paired t-intervals over seeds need at least 3 "
             f"(or smoke = true for a run that only checks the path)")
        need(len(set(self.seeds)) == len(self.seeds) and len(self.seeds) >= 1, f"seeds {list(self.seeds)} repeat")
        need(self.steps is None or (self.steps >= self.evals_per_run and self.steps % self.evals_per_run == 0),
             f"steps {self.steps} must be a positive multiple of evals_per_run {self.evals_per_run}")
        need(self.tokens_per_run is None or self.tokens_per_run >= self.evals_per_run * self.batch_size * self.n_ctx,
             f"tokens_per_run {self.tokens_per_run} is less than evals_per_run batches")
        need(self.micro_batch is None or self.micro_batch >= 1, f"micro_batch must be at least 1, got {self.micro_batch}")
        need(self.restrict_vocab or self.vocab_size == GPT2_VOCAB,
             f"vocab_size {self.vocab_size} with restrict_vocab = false: GPT-2's vocabulary has {GPT2_VOCAB} ids")
        need(0 <= self.warmup_frac < 1 and 0 < self.cooldown <= 1, "warmup_frac in [0, 1), cooldown in (0, 1]")

    def pinned_steps(self) -> int | None:
        """Steps per run fixed by the budget (steps, else tokens_per_run rounded to a multiple of
        the evaluation count); None: the pilot fits them to train_minutes."""
        if self.steps is not None:
            return self.steps
        if self.tokens_per_run is None:
            return None
        k = self.evals_per_run
        return max(k, round(self.tokens_per_run / (self.batch_size * self.n_ctx) / k) * k)


GPT2_VOCAB = 50257


def _tuples(value):
    """JSON / TOML lists -> the tuples a frozen Budget holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def with_file(budget: Budget, path: str) -> Budget:
    """`budget` with the fields a TOML file sets (`window = "rule"` asks for WINDOW_RULE).
    An unknown field or a value of the wrong type is one error line naming it."""
    try:
        fields = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise FgptError(f"--budget-file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FgptError(f"--budget-file {path}: not TOML ({e})") from None
    known = {f.name: f for f in dataclasses.fields(Budget)}
    changes = {}
    for key, value in fields.items():
        if key not in known or key == "name":
            raise FgptError(f"--budget-file {path}: unknown field {key!r} (a budget has "
                            f"{', '.join(k for k in known if k != 'name')})")
        current = getattr(budget, key)
        if key == "window" and value == "rule":
            value = None
        ok = (isinstance(value, list) if isinstance(current, tuple)
              else isinstance(value, bool) if isinstance(current, bool)
              else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(current, float)
              else isinstance(value, int) and not isinstance(value, bool)
              if isinstance(current, int) or key in ("window", "steps", "tokens_per_run", "micro_batch")
              else True)
        if not ok and not (value is None and key == "window"):
            raise FgptError(f"--budget-file {path}: {key} = {value!r} is not a {type(current).__name__}")
        changes[key] = float(value) if isinstance(current, float) else _tuples(value)
    return dataclasses.replace(budget, **changes)


# --- the pre-registered rules (printed in the report's Method section) ---------------------

RULES = {
    "margin_nats": 0.02,  # equivalence / non-inferiority margin on validation loss
    "confidence": 0.95,
    "confidence_percent": 95,
    "context_use_nats": 0.02,  # a model "uses" context beyond k if L(k) - L(n_ctx) exceeds this, CI above 0
    "relay_edge_slack": 1,  # a measured edge at least (predicted edge - this) "reaches the edge"
    "relay_beyond_above_chance": 0.1,  # accuracy just past the edge (edge+1..edge+W) above chance by more: a leak
    "ratio_margin": 0.02,  # the margin on speed ratios (ratio − 1), as a fraction
    "slope_from_len": 2048,  # the log-log slopes fit sequence lengths from this up (shorter ones are overhead)
    "linear_slope_max": 1.2,  # a log-log time slope up to this counts as linear in T
    "quadratic_slope_min": 1.6,  # the causal reference must show at least this, or the fit cannot tell
}


# The SWA arm's window, where a budget leaves it to the rule (window = None). Written before
# any number: baseline seed 0 trains first and the context-use probe measures, for each
# context cut k, its gain from context beyond k, L(k) - L(n_ctx). The window is the largest
# cut beyond which the baseline still uses context (gain above RULES["context_use_nats"],
# its bootstrap interval above 0): a window inside the context the baseline uses, so that
# "a window costs little quality" is tested where it could cost something. If the baseline
# uses no context beyond even the smallest cut, the smallest cut (the claim is then
# "not testable here" by the claims' own rule).
WINDOW_RULE = ("the largest context cut k beyond which baseline seed 0 still uses context "
               "(L(k) − L(n_ctx) above the context-use threshold, interval above 0); else the smallest cut")


def choose_window(budget: Budget, gains: dict[int, dict]) -> int:
    """WINDOW_RULE on baseline seed 0's context-use intervals: gains[k] = {"mean", "lo", ...}."""
    used = [k for k in budget.context_cuts
            if gains[k]["lo"] is not None and gains[k]["lo"] > 0 and gains[k]["mean"] > RULES["context_use_nats"]]
    return max(used) if used else min(budget.context_cuts)


# cpu: the committed report, two CPU cores in at most about 60 minutes. --precision auto
# (bf16 where the CPU's matmuls run faster) buys steps: the pilot fits them to train_minutes.
CPU = Budget(
    name="cpu",
    vocab_size=2048, n_layer=4, n_head=8, n_embd=128, n_ctx=256, batch_size=32, lr=3e-3,
    warmup_frac=0.05, cooldown=0.2, evals_per_run=8, eval_batches=2, final_eval_windows=256,
    train_minutes=38.0, min_steps=96, max_steps=1600, pilot_steps=6,
    seeds=(0, 1, 2), sweep_seeds=(0,), window=None, main_kv_head=2,
    uptrain_percents=(1.0, 2.5, 5.0, 10.0), uptrain_lr_frac=0.1,
    context_cuts=(16, 32, 64, 128), context_targets=512,
    length_mult=4, length_seqs=24, length_stride=32,
    copy_distances=(32, 64, 128, 192, 384, 640, 960), copy_span=16, copy_seqs=32, bootstrap=2000,
    relay_models=((2, 8), (2, 16), (4, 8), (4, 16), (2, None)), relay_seq_len=112, relay_steps=800,
    relay_batch=32, relay_seeds=(0,), relay_eval_seqs=1024,
    kv_contexts=(1024, 4096, 16384, 65536), decode_contexts=(1024, 4096, 16384), decode_batches=(1, 8),
    decode_runs=5, decode_tokens=8, decode_layers=4, decode_window=1024,
    kernel_lengths=(512, 1024, 2048, 4096, 8192, 16384), kernel_dense_max=4096, kernel_heads=4,
    kernel_head_dim=64, kernel_window=256, kernel_repeats=3,
    step_lengths=(1024, 4096, 8192), step_repeats=3,
    prompts=3, prompt_tokens=24, new_tokens=40,
)
FULL = CPU  # the committed report's budget before presets; results.json files name it "full"

QUICK = Budget(
    name="quick",
    vocab_size=128, n_layer=2, n_head=4, n_embd=32, n_ctx=32, batch_size=4, lr=3e-3,
    warmup_frac=0.1, cooldown=0.25, evals_per_run=2, eval_batches=1, final_eval_windows=8,
    train_minutes=0.2, min_steps=4, max_steps=4, pilot_steps=1,
    seeds=(0, 1), sweep_seeds=(0,), window=None, main_kv_head=2,
    uptrain_percents=(25.0, 50.0), uptrain_lr_frac=0.1,
    context_cuts=(4, 8), context_targets=16,
    length_mult=2, length_seqs=4, length_stride=8,
    copy_distances=(8, 16, 40), copy_span=4, copy_seqs=4, bootstrap=50,
    relay_models=((2, 4), (2, None)), relay_seq_len=24, relay_steps=3, relay_batch=8, relay_seeds=(0,),
    relay_eval_seqs=8,
    kv_contexts=(64, 256), decode_contexts=(64,), decode_batches=(1, 2), decode_runs=2, decode_tokens=2,
    decode_layers=1, decode_window=16,
    kernel_lengths=(64, 128), kernel_dense_max=128, kernel_heads=2, kernel_head_dim=16, kernel_window=16,
    kernel_repeats=1,
    step_lengths=(64, 128), step_repeats=2,
    prompts=2, prompt_tokens=6, new_tokens=4, smoke=True,
)

# gpu: about an hour of one modern GPU (bf16): 6 layers of 384, n_ctx 1024, GPT-2's vocabulary,
# ~200M tokens per run; probes and efficiency as the cpu budget's.
GPU = dataclasses.replace(
    CPU, name="gpu", vocab_size=GPT2_VOCAB, restrict_vocab=False, n_layer=6, n_head=6, n_embd=384, n_ctx=1024,
    batch_size=256, micro_batch=64, lr=1.5e-3, warmup_frac=0.02, evals_per_run=8, eval_batches=4,
    final_eval_windows=512, tokens_per_run=200_000_000, seeds=(0, 1, 2), sweep_seeds=(0,), window=256,
    main_kv_head=2, context_cuts=(32, 64, 128, 256, 512), context_targets=1024, length_stride=128,
    copy_distances=(64, 128, 256, 512, 1024, 2048, 3072), prompt_tokens=48, new_tokens=64)

# gpu-smoke: the whole path on a GPU in about 8 minutes of an H200 (not a study: 2 seeds).
GPU_SMOKE = dataclasses.replace(
    GPU, name="gpu-smoke", n_layer=4, n_head=4, n_embd=256, n_ctx=512, batch_size=64, micro_batch=None,
    tokens_per_run=8_388_608, seeds=(0, 1), window=128, main_kv_head=2, context_cuts=(32, 64, 128, 256),
    final_eval_windows=256, context_targets=256, length_seqs=8, length_stride=64,
    copy_distances=(64, 128, 256, 512, 1024), copy_seqs=16, bootstrap=500, relay_steps=300,
    relay_eval_seqs=256, kv_contexts=(1024, 4096), decode_contexts=(1024, 4096), decode_runs=3,
    kernel_lengths=(512, 1024, 2048, 4096), kernel_repeats=2, step_lengths=(1024, 2048), step_repeats=2,
    smoke=True)

# gpt2: GPT-2 124M shapes, n_ctx 1024, GPT-2's vocabulary, ~20 tokens per parameter per run
# (Chinchilla), 3 seeds for the main arms: a cluster's job.
GPT2 = dataclasses.replace(
    GPU, name="gpt2", n_layer=12, n_head=12, n_embd=768, n_ctx=1024, batch_size=512, micro_batch=16,
    lr=6e-4, warmup_frac=0.015, tokens_per_run=20 * 124_439_808, window=256, main_kv_head=4,
    context_cuts=(32, 64, 128, 256, 512))

PRESETS = {b.name: b for b in (QUICK, CPU, GPU_SMOKE, GPU, GPT2)}
