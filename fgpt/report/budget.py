"""The study's sizes: one full budget (the committed report) and one quick (the test).

Every arm of a budget trains on the same corpus, token budget, schedule and seeds; only
the GPTConfig differs. The GPT-2 vocabulary (50257 × n_embd embedding and tied head)
dominates the compute of a model this small, so n_embd stays at 64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fgpt.config import GPTConfig


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...]
    # the language model every arm starts from
    n_layer: int
    n_head: int
    n_embd: int
    n_ctx: int
    # training (fgpt.train), identical for every arm
    steps: int
    batch_size: int
    lr: float
    eval_interval: int
    eval_iters: int
    final_eval_seqs: int  # validation sequences for the final loss and loss by position
    # variants
    windows: tuple[int, ...]  # SWA arms
    combined_window: int
    combined_kv_head: int
    convert_kv_head: int  # MHA -> GQA conversion target
    uptrain_percent: int  # of `steps`, as in Ainslie et al.
    # efficiency measurements
    decode_context: int
    decode_batch: int
    decode_tokens: int
    scaling_lengths: tuple[int, ...]
    scaling_window: int
    # long-range recall probe (fgpt.report.recall)
    recall_layers: int
    recall_distance: int
    recall_windows: tuple[int, ...]
    recall_steps: int
    recall_batch: int
    recall_eval: int  # queries per distance
    # parallel strategies (run/bench_parallel.py)
    parallel_args: tuple[str, ...]

    @property
    def kv_heads(self) -> tuple[int, ...]:
        """n_head, n_head/2, ..., 1 (the divisors reached by halving)."""
        out, h = [], self.n_head
        while h >= 1 and self.n_head % h == 0:
            out.append(h)
            if h == 1:
                break
            h //= 2
        return tuple(out)

    @property
    def uptrain_steps(self) -> int:
        return max(1, round(self.steps * self.uptrain_percent / 100))

    def base_config(self) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, n_ctx=self.n_ctx)

    def arms(self) -> dict[str, GPTConfig]:
        """Every trained arm: name -> config. `baseline` is learned positions, MHA, full attention."""
        base = self.base_config()
        arms = {"baseline": base, "rope": base.replace(pos_emb="rope")}
        for kv in self.kv_heads[1:]:
            arms[f"gqa-{kv}"] = base.replace(n_kv_head=kv)
        for w in self.windows:
            arms[f"swa-{w}"] = base.replace(window=w)
        arms["rope+gqa+swa"] = base.replace(pos_emb="rope", n_kv_head=self.combined_kv_head,
                                            window=self.combined_window)
        return arms

    def to_dict(self) -> dict:
        return asdict(self) | {"kv_heads": list(self.kv_heads), "uptrain_steps": self.uptrain_steps}


FULL = Budget(
    name="full", seeds=(0, 1, 2),
    n_layer=3, n_head=4, n_embd=64, n_ctx=128,
    steps=128, batch_size=8, lr=2e-3, eval_interval=16, eval_iters=4, final_eval_seqs=32,
    windows=(16, 32, 64), combined_window=32, combined_kv_head=2, convert_kv_head=2, uptrain_percent=5,
    decode_context=2048, decode_batch=8, decode_tokens=16,
    scaling_lengths=(512, 1024, 2048, 4096, 8192), scaling_window=32,
    recall_layers=2, recall_distance=24, recall_windows=(4, 8), recall_steps=400, recall_batch=64,
    recall_eval=64,
    parallel_args=("--model", "tiny", "--n-layer", "2", "--seq", "64", "--batch", "4", "--steps", "3"),
)

QUICK = Budget(
    name="quick", seeds=(0,),
    n_layer=2, n_head=2, n_embd=32, n_ctx=32,
    steps=6, batch_size=2, lr=2e-3, eval_interval=3, eval_iters=1, final_eval_seqs=2,
    windows=(8,), combined_window=8, combined_kv_head=1, convert_kv_head=1, uptrain_percent=5,
    decode_context=64, decode_batch=1, decode_tokens=2,
    scaling_lengths=(64, 128), scaling_window=8,
    recall_layers=2, recall_distance=8, recall_windows=(2,), recall_steps=3, recall_batch=8,
    recall_eval=4,
    parallel_args=("--model", "tiny", "--n-layer", "1", "--seq", "16", "--batch", "2", "--steps", "1",
                   "--strategies", "ddp"),
)
