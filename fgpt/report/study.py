"""The study: train every arm on every seed, then measure; returns the results tree that
the markdown, the plots and results.json are all written from."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from fgpt import data
from fgpt.checkpoint import save_checkpoint
from fgpt.config import GPTConfig
from fgpt.convert import to_gqa
from fgpt.model import count_params
from fgpt.report import measure, recall
from fgpt.report.budget import Budget
from fgpt.train import TrainConfig, TrainResult, train


SCALING_HEADS, SCALING_HEAD_DIM = 4, 16  # the attention shape timed against sequence length
UPTRAIN_SEED_SHIFT = 1000
RECALL_THRESHOLD = 0.5  # recall "works" at a distance while accuracy stays at or above this


class Progress:
    """Progress lines on stderr with an ETA from the training steps done so far (training
    dominates the study; the other measurements are a few minutes at most)."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.start = total_steps, 0, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str, steps_done: int = 0) -> None:
        self.done += steps_done
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ETA of the training runs {_minutes(self.elapsed() / self.done * (self.total - self.done))}"
        print(f"[report {_minutes(self.elapsed())}{eta}] {message}", file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def config_dict(config: GPTConfig) -> dict:
    return {"pos_emb": config.pos_emb, "n_kv_head": config.kv_heads, "window": config.window,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd, "n_ctx": config.n_ctx}


def train_run(budget: Budget, seed: int, *, model: GPTConfig | None = None, init_from: str | None = None,
              steps: int | None = None, data_spec: str | None = None) -> TrainResult:
    """One training run with the budget's shared schedule; nothing written to disk."""
    steps = steps or budget.steps
    result = train(TrainConfig(model=model, init_from=init_from, data=data_spec, steps=steps,
                               batch_size=budget.batch_size, lr=budget.lr, seed=seed,
                               eval_interval=min(budget.eval_interval, steps), eval_iters=budget.eval_iters,
                               device="cpu", progress=False))
    if result.interrupted:  # the loop turns Ctrl-C / SIGTERM into an early stop: end the study too
        raise KeyboardInterrupt
    return result


def run_record(result: TrainResult, loss_1x: list[float]) -> dict:
    rates = [m["tokens_per_s"] for m in result.metrics[1:]] or [result.metrics[0]["tokens_per_s"]]
    return {"val_curve": [[m["step"], m["val_loss"]] for m in result.metrics if "val_loss" in m],
            "final_train_loss": result.metrics[-1]["loss"],
            "final_loss": statistics.fmean(loss_1x),
            "tokens_per_s": statistics.median(rates),
            "wall_s": result.metrics[-1]["elapsed_s"]}


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    """First evaluated step whose loss is <= target (None: never within the budget)."""
    return next((int(step) for step, loss in curve if loss <= target), None)


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    return [[pts[0][0], statistics.fmean(p[1] for p in pts)] for pts in zip(*curves)]


def run_study(budget: Budget, *, data_spec: str | None = None, parallel: bool = True) -> dict:
    arms = budget.arms()
    progress = Progress(total_steps=len(arms) * len(budget.seeds) * budget.steps
                        + len(budget.seeds) * budget.uptrain_steps)
    progress.log(f"{len(arms)} arms x {len(budget.seeds)} seeds x {budget.steps} steps, then the GQA "
                 f"conversion, the recall probe ({len(budget.recall_windows) + 1} models x "
                 f"{budget.recall_steps} steps) and the efficiency measurements")
    corpus = data.load_corpus(data_spec, progress=False)
    runs, position, baseline_params = train_arms(budget, arms, corpus, data_spec, progress)
    results = {"arms": summarise_arms(arms, runs),
               "position": summarise_positions(position, budget.n_ctx, 2 * budget.n_ctx)}

    # GQA: the paper's conversion recipe, cache size and decode speed
    results["conversion"] = convert_and_uptrain(budget, baseline_params, corpus, results["arms"],
                                                data_spec, progress)
    results["gqa_efficiency"] = gqa_efficiency(budget)
    progress.log("measured KV-cache size and decode speed")

    # SWA: the long-range recall probe and the attention cost curves
    results["recall"] = run_recall(budget)
    progress.log("ran the long-range recall probe")
    results["parallel"] = run_parallel(budget) if parallel else {"measured": False, "reason": "--no-parallel"}
    progress.log("parallel strategies: " + ("measured" if results["parallel"]["measured"] else "not measured"))
    results["scaling"] = {"window": budget.scaling_window, "n_head": SCALING_HEADS, "head_dim": SCALING_HEAD_DIM,
                          "rows": measure.attention_scaling(budget.scaling_lengths, budget.scaling_window,
                                                            n_head=SCALING_HEADS, head_dim=SCALING_HEAD_DIM)}
    progress.log("measured attention time and memory against sequence length")
    derive(results, budget)
    results["wall_s"] = progress.elapsed()
    return results


def train_arms(budget: Budget, arms: dict[str, GPTConfig], corpus, data_spec, progress: Progress):
    """Every arm on every seed (seeds outermost, so machine noise spreads over all arms).
    Returns the run records, loss-by-position curves and the baseline's trained params."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    position: dict[str, dict[str, list[list[float]]]] = {name: {"1x": [], "2x": []} for name in arms}
    baseline_params = {}
    for seed in budget.seeds:
        for name, config in arms.items():
            result = train_run(budget, seed, model=config, data_spec=data_spec)
            loss_1x = measure.loss_by_position(result.params, config, corpus.val, seq_len=budget.n_ctx,
                                               n_seqs=budget.final_eval_seqs)
            position[name]["1x"].append(loss_1x)
            if config.pos_emb == "rope":  # learned positions have no embedding past n_ctx
                position[name]["2x"].append(measure.loss_by_position(
                    result.params, config, corpus.val, seq_len=2 * budget.n_ctx, n_seqs=budget.final_eval_seqs))
            if name == "baseline":
                baseline_params[seed] = result.params
            runs[name].append(run_record(result, loss_1x) | {"seed": seed})
            progress.log(f"trained {name} seed {seed}: val loss {runs[name][-1]['final_loss']:.3f}",
                         budget.steps)
    return runs, position, baseline_params


def gqa_efficiency(budget: Budget) -> list[dict]:
    rows = []
    for kv in budget.kv_heads:
        config = budget.base_config().replace(n_kv_head=kv)
        rows.append({"n_kv_head": kv,
                     "kv_bytes_per_token": measure.kv_bytes_per_token(config, budget.decode_context),
                     "decode_tokens_per_s": measure.decode_tokens_per_s(
                         config, context=budget.decode_context, batch=budget.decode_batch,
                         new_tokens=budget.decode_tokens)})
    return rows


def summarise_arms(arms: dict[str, GPTConfig], runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, config in arms.items():
        out[name] = {"config": config_dict(config), "runs": runs[name],
                     "final_loss": mean_std([r["final_loss"] for r in runs[name]]),
                     "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs[name]]),
                     "val_curve": mean_curve([r["val_curve"] for r in runs[name]])}
    target = out["baseline"]["final_loss"]["mean"]
    base_curve_target = out["baseline"]["val_curve"][-1][1]  # same evaluator as the curves
    for arm in out.values():
        arm["steps_to_baseline_final"] = steps_to_reach(arm["val_curve"], base_curve_target)
        arm["loss_vs_baseline"] = arm["final_loss"]["mean"] - target
        arm["speed_vs_baseline"] = arm["tokens_per_s"]["mean"] / out["baseline"]["tokens_per_s"]["mean"]
    return out


def summarise_positions(position: dict, seq_1x: int, seq_2x: int) -> dict:
    out = {"lengths": [seq_1x, seq_2x]}
    for name, curves in position.items():
        entry = {"1x": [statistics.fmean(c) for c in zip(*curves["1x"])]}
        entry["1x_mean"] = statistics.fmean(entry["1x"])
        if curves["2x"]:
            curve = [statistics.fmean(c) for c in zip(*curves["2x"])]
            entry |= {"2x": curve, "2x_seen": statistics.fmean(curve[:seq_1x]),
                      "2x_beyond": statistics.fmean(curve[seq_1x:])}
        out[name] = entry
    return out


def convert_and_uptrain(budget: Budget, baseline_params: dict, corpus, arms: dict, data_spec,
                        progress: Progress) -> dict:
    """Ainslie et al.: mean-pool the trained MHA model's K/V heads into `convert_kv_head`
    groups, measure, uptrain for uptrain_percent of the steps, measure again."""
    kv = budget.convert_kv_head
    after_convert, after_uptrain = [], []
    for seed, params in baseline_params.items():
        config, converted = to_gqa(budget.base_config(), params, kv)
        after_convert.append(statistics.fmean(measure.loss_by_position(
            converted, config, corpus.val, seq_len=budget.n_ctx, n_seqs=budget.final_eval_seqs)))
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, config, converted)
            # a shifted seed: uptraining sees batches pretraining did not
            result = train_run(budget, seed + UPTRAIN_SEED_SHIFT, init_from=tmp, steps=budget.uptrain_steps,
                               data_spec=data_spec)
        after_uptrain.append(statistics.fmean(measure.loss_by_position(
            result.params, config, corpus.val, seq_len=budget.n_ctx, n_seqs=budget.final_eval_seqs)))
        progress.log(f"converted baseline seed {seed} to {kv} KV heads and uptrained", budget.uptrain_steps)
    scratch = f"gqa-{kv}"
    return {"n_kv_head": kv, "uptrain_steps": budget.uptrain_steps,
            "mha": arms["baseline"]["final_loss"],
            "converted": mean_std(after_convert), "uptrained": mean_std(after_uptrain),
            "scratch_arm": scratch, "scratch": arms[scratch]["final_loss"]}


def run_recall(budget: Budget) -> dict:
    task = recall.RecallTask(max_distance=budget.recall_distance)
    out = {"n_layer": budget.recall_layers, "max_distance": task.max_distance, "n_symbols": task.n_symbols,
           "chance": 1 / task.n_symbols, "steps": budget.recall_steps, "threshold": RECALL_THRESHOLD,
           "models": []}
    for window in (None, *budget.recall_windows):
        config = GPTConfig(vocab_size=task.vocab_size, n_ctx=task.seq_len, n_layer=budget.recall_layers,
                           n_head=4, n_embd=64, window=window)
        params = recall.train_recall(task, config, steps=budget.recall_steps, batch_size=budget.recall_batch,
                                     lr=3e-3, seed=0)
        acc = recall.accuracy_by_distance(task, params, config, n_per_distance=budget.recall_eval, seed=1)
        predicted = recall.receptive_field(budget.recall_layers, window, task.seq_len)
        out["models"].append({"window": window, "accuracy": acc, "predicted_edge": predicted,
                              "measured_edge": recall.measured_edge(acc, RECALL_THRESHOLD)})
    return out


def run_parallel(budget: Budget) -> dict:
    """The parallel benchmark's table at a small size, through its own command."""
    import subprocess

    cmd = [sys.executable, "-m", "run.bench", "parallel", *budget.parallel_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    command = "python -m run.bench parallel " + " ".join(budget.parallel_args)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"measured": False, "command": command, "reason": f"the benchmark failed: {tail}"}
    return {"measured": True, "command": command, "table": parse_markdown_table(proc.stdout),
            "notes": [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("|")]}


def parse_markdown_table(text: str) -> dict:
    """The first markdown table in `text` as {"header": [...], "rows": [[...], ...]}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    rows = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    return {"header": cells[0] if cells else [], "rows": rows}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def derive(results: dict, budget: Budget) -> None:
    """Every number the text quotes that is not a raw measurement: ratios, shares, means."""
    config = budget.base_config()
    n_params = count_params(config)
    results["setup"] = {"n_params": n_params, "vocab_size": config.vocab_size,
                        "tokens_per_run": budget.steps * budget.batch_size * budget.n_ctx,
                        "embedding_share_percent": 100 * config.vocab_size * config.n_embd / n_params}
    eff = results["gqa_efficiency"]
    for e in eff:
        e["kv_vs_mha"] = e["kv_bytes_per_token"] / eff[0]["kv_bytes_per_token"]
        e["decode_vs_mha"] = e["decode_tokens_per_s"] / eff[0]["decode_tokens_per_s"]
    first, last = results["scaling"]["rows"][0], results["scaling"]["rows"][-1]
    results["scaling"]["growth"] = {
        "from": first["seq_len"], "to": last["seq_len"], "length_ratio": last["seq_len"] / first["seq_len"],
        **{key: {k: _ratio(last["kernels"][k][key], first["kernels"][k][key]) for k in first["kernels"]}
           for key in ("ms", "mib")}}
    results["scaling"]["growth"]["time"] = results["scaling"]["growth"].pop("ms")
    for m in results["recall"]["models"]:
        acc, w, edge = m["accuracy"], m["window"], m["predicted_edge"]
        within = acc[:(w - 1) if w else len(acc)]
        beyond = acc[edge:]
        m["accuracy_within"] = statistics.fmean(within) if within else None
        m["accuracy_beyond"] = statistics.fmean(beyond) if beyond else None
    comb = budget.arms()["rope+gqa+swa"]
    base_bytes = measure.kv_bytes_per_token(config, budget.decode_context)
    comb_bytes = measure.kv_bytes_per_token(comb, budget.decode_context)
    results["combined"] = {"context": budget.decode_context, "baseline_bytes_per_token": base_bytes,
                           "combined_bytes_per_token": comb_bytes, "ratio": comb_bytes / base_bytes}
