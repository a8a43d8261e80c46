"""The study's sizes and its pre-registered rules: one full budget (the committed report)
and one quick (the test). Everything a verdict depends on is fixed here, before any number
is measured, and printed in the report.

The language models are built so that attention matters: the corpus keeps its most frequent
GPT-2 ids (the rest become one UNK id whose targets are left out of the loss), which shrinks
the tied embedding from most of the parameters of a small GPT-2 to about a quarter, and the
context is long enough (256) for windows, positions and KV heads to make a difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fgpt.config import GPTConfig


@dataclass(frozen=True)
class Budget:
    name: str
    # the language models -------------------------------------------------------------
    vocab_size: int  # kept GPT-2 ids + 1 UNK
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
    seeds: tuple[int, ...]  # main arms (>= 3 in the full budget: paired t-intervals)
    sweep_seeds: tuple[int, ...]  # the KV-head sweep's extra arms
    window: int  # the SWA arm's window
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
    # every run's steps, pinned (`just report --steps`); None: the pilot fits them to train_minutes
    steps: int | None = None

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


FULL = Budget(
    name="full",
    vocab_size=2048, n_layer=4, n_head=8, n_embd=128, n_ctx=256, batch_size=32, lr=3e-3,
    warmup_frac=0.05, cooldown=0.2, evals_per_run=8, eval_batches=2, final_eval_windows=256,
    train_minutes=33.0, min_steps=96, max_steps=600, pilot_steps=6,
    seeds=(0, 1, 2), sweep_seeds=(0,), window=32, main_kv_head=2,
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

QUICK = Budget(
    name="quick",
    vocab_size=128, n_layer=2, n_head=4, n_embd=32, n_ctx=32, batch_size=4, lr=3e-3,
    warmup_frac=0.1, cooldown=0.25, evals_per_run=2, eval_batches=1, final_eval_windows=8,
    train_minutes=0.2, min_steps=4, max_steps=4, pilot_steps=1,
    seeds=(0, 1), sweep_seeds=(0,), window=8, main_kv_head=2,
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
    step_lengths=(64, 128), step_repeats=3,
    prompts=2, prompt_tokens=6, new_tokens=4,
)
