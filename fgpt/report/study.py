"""The study: train every arm on every seed, probe the trained models, measure efficiency;
returns the results tree that the claims, the markdown, the plots and results.json are all
written from. It calls library functions only (fgpt.training.train, fgpt.model, fgpt.inference.generate, ...).

Fairness: every arm trains on the same restricted-vocabulary corpus with the same batches
(a function of seed and step), schedule (warmup, constant, linear cooldown: mid-run
evaluations compare arms at one learning rate) and initial tensors wherever shapes agree
(init_params seeds each leaf by its path). Every arm and seed is scored on the same fixed
validation windows.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fgpt import data
from fgpt.checkpoint import load_checkpoint, save_checkpoint
from fgpt.config import GPTConfig
from fgpt.convert import to_gqa
from fgpt.errors import FgptError
from fgpt.measure import copy_bandwidth, in_child, machine
from fgpt.model import count_params
from fgpt.report import efficiency, probes, relay
from fgpt.report.budget import Budget, RULES, WINDOW_RULE, choose_window
from fgpt.report.runs import Launch, StudyDir, grad_accum, metrics, run_config, train_runs, write_corpus
from fgpt.report.stats import bootstrap_interval
from fgpt.report.vocab import Vocab, full_vocab, restrict
from fgpt.training import precision, run_dir
from fgpt.training.run_config import TrainConfig, absolute_data
from fgpt.training.train import TrainResult, train
from fgpt.tree import tree_map


class Progress:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        s = self.elapsed()
        print(f"[report {int(s // 60)}m{int(s % 60):02d}s] {message}", file=sys.stderr, flush=True)


def config_dict(config: GPTConfig) -> dict:
    return {"pos_emb": config.pos_emb, "n_kv_head": config.kv_heads, "window": config.window,
            "head_dim": config.head_dim,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_ctx": config.n_ctx, "vocab_size": config.vocab_size}


# --- what the model spends on ----------------------------------------------------------------

def shares(config: GPTConfig) -> dict:
    """Parameter and forward-FLOP shares per token (causal attention over an average of
    (n_ctx + 1) / 2 keys): embedding + tied head, QKV + output projections, attention scores
    and values, MLP."""
    d, L, hd = config.n_embd, config.n_layer, config.head_dim
    qkv_out = L * (d * (config.n_head + 2 * config.kv_heads) * hd + d * d)
    mlp = L * 8 * d * d
    embed = config.vocab_size * d + (config.n_ctx * d if config.pos_emb == "learned" else 0)
    keys = (config.n_ctx + 1) / 2
    flops = {"embedding / head": 2 * config.vocab_size * d, "QKV / out projections": 2 * qkv_out,
             "attention scores / values": 4 * L * d * keys, "MLP": 2 * mlp}
    params = {"embedding / head": embed, "QKV / out projections": qkv_out, "attention scores / values": 0,
              "MLP": mlp}
    total_p, total_f = sum(params.values()), sum(flops.values())
    return {k: {"params_percent": 100 * params[k] / total_p, "flops_percent": 100 * flops[k] / total_f}
            for k in flops} | {"total": {"params": count_params(config), "flops_per_token": total_f}}


# --- training -------------------------------------------------------------------------------

def schedule(budget: Budget, steps: int) -> dict:
    return dict(batch_size=budget.batch_size, lr=budget.lr, warmup=max(1, round(budget.warmup_frac * steps)),
                schedule="wsd", cooldown=budget.cooldown, eval_interval=max(1, steps // budget.evals_per_run),
                eval_iters=budget.eval_batches)


def train_run(budget: Budget, corpus: data.Corpus, config: GPTConfig | None, seed: int, steps: int,
              launch: Launch | None = None, **overrides) -> TrainResult:
    """One training run of the shared recipe, in memory (nothing written to disk): the pilot."""
    launch = launch or Launch()
    settings = schedule(budget, steps) | overrides
    result = train(TrainConfig(model=config, steps=steps, seed=seed, device=launch.device, progress=False,
                               precision=launch.precision, checkpoint_interval=0, **settings), corpus=corpus)
    if result.interrupted:  # the loop turns Ctrl-C / SIGTERM into an early stop: end the study too
        raise KeyboardInterrupt
    return result


def pilot_steps(budget: Budget, corpus: data.Corpus, arms: dict[str, GPTConfig], progress: Progress,
                launch: Launch | None = None) -> dict:
    """Time a few steps of the slowest-looking arms; the step count that fits the training
    budget (rounded to a multiple of the evaluation count, within [min_steps, max_steps]).
    A budget with pinned steps (steps, tokens_per_run) times nothing: its runs train that
    many steps on any machine."""
    pinned = budget.pinned_steps()
    if pinned is not None:
        progress.log(f"{pinned} steps per run, pinned by the budget")
        return {"tokens_per_s": None, "steps": pinned,
                "tokens_per_run": pinned * budget.batch_size * budget.n_ctx, "pinned": True}
    rates = {}
    for name in ("baseline", budget.swa_arm):
        result = train_run(budget, corpus, arms[name], 0, budget.pilot_steps, launch, eval_interval=0)
        rates[name] = statistics.median(m["tokens_per_s"] for m in result.metrics[-max(1, budget.pilot_steps // 2):])
    tokens_per_s = min(rates.values())
    step_s = budget.batch_size * budget.n_ctx / tokens_per_s
    fits = budget.train_minutes * 60 / (budget.run_equivalents() * step_s)
    k = budget.evals_per_run
    steps = int(min(budget.max_steps, max(budget.min_steps, fits)) // k * k)
    progress.log(f"pilot: {tokens_per_s:.0f} tokens/s -> {steps} steps per run "
                 f"({budget.run_equivalents():.1f} run-equivalents in {budget.train_minutes} min)")
    return {"tokens_per_s": rates, "steps": steps, "tokens_per_run": steps * budget.batch_size * budget.n_ctx}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


class Trainer:
    """The study's runs, each a run.train run directory under OUT/runs (fgpt.report.runs)."""

    def __init__(self, study: StudyDir, budget: Budget, launch: Launch, data_dir: Path, steps: int,
                 progress: Progress):
        self.study, self.budget, self.launch, self.data_dir = study, budget, launch, data_dir
        self.steps, self.progress = steps, progress
        self.grad_accum = grad_accum(budget.batch_size, budget.micro_batch, launch.nproc)

    def config(self, config: GPTConfig | None, seed: int, steps: int, out: str, **overrides) -> TrainConfig:
        settings = schedule(self.budget, steps) | {"grad_accum": self.grad_accum,
                                                   "checkpoint_interval": max(1, steps // self.budget.evals_per_run)}
        return run_config(config, seed=seed, steps=steps, out=self.study.root / out, data_dir=self.data_dir,
                          launch=self.launch, settings=settings | overrides)

    def train(self, runs: list[TrainConfig]) -> None:
        train_runs(runs, self.launch, self.study.root, self.progress.log)

    def arm_runs(self, arms: dict[str, GPTConfig], only: tuple[str, int] | None = None) -> list[TrainConfig]:
        """Every arm on its seeds (seeds outermost, so machine noise spreads over all arms)."""
        budget = self.budget
        return [self.config(config, seed, self.steps, run_name(name, seed))
                for seed in sorted({s for a in arms for s in budget.seeds_of(a)})
                for name, config in arms.items()
                if seed in budget.seeds_of(name) and (only is None or only == (name, seed))]


def load_run(study: StudyDir, name: str, device: str = "cpu") -> dict:
    """A finished run's final parameters (fp32), on `device` (where the probes then run)."""
    params = load_checkpoint(study.root / name)[1]
    return params if device == "cpu" else tree_map(lambda t: t.to(device), params)


def score_runs(study: StudyDir, budget: Budget, corpus: data.Corpus, arms: dict[str, GPTConfig],
               eval_starts: np.ndarray, progress: Progress, device: str = "cpu") -> tuple[dict, dict]:
    """Per-run records (each saved as a section) and the trained parameters by (arm, seed)."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    params: dict[tuple[str, int], dict] = {}
    for seed in sorted({s for a in arms for s in budget.seeds_of(a)}):
        for name, config in arms.items():
            if seed not in budget.seeds_of(name):
                continue
            params[name, seed] = load_run(study, run_name(name, seed), device)

            def record():
                rows = metrics(study.root / run_name(name, seed))
                final = probes.evaluation_loss(params[name, seed], config, corpus.val, eval_starts, corpus.ignore_id)
                rates = [m["tokens_per_s"] for m in rows[1:]] or [rows[0]["tokens_per_s"]]
                progress.log(f"scored {name} seed {seed}: loss on the evaluation set {final:.4f}")
                return {"seed": seed, "final_loss": final, "tokens_per_s": statistics.median(rates),
                        "final_train_loss": rows[-1]["loss"],
                        "val_curve": [[m["step"], m["val_loss"]] for m in rows if "val_loss" in m]}
            runs[name].append(study.section(f"run-{run_name(name, seed)}", record))
    return runs, params


def uptrain_ladder(trainer: Trainer, budget: Budget, corpus: data.Corpus, params: dict, steps: int, base: GPTConfig,
                   eval_starts: np.ndarray, progress: Progress) -> dict:
    """Ainslie et al.'s recipe on each baseline seed: mean-pool K/V heads into main_kv_head
    groups, then uptrain at a constant lr for up to max(uptrain_percents)% of the
    pre-training steps. The control is the unconverted MHA model trained the same extra
    steps the same way. Both are scored on the same validation batch at every step.
    Each is a run directory (uptrain-KIND-seedS) started from uptrain-init/KIND-seedS."""
    study = trainer.study
    top = max(1, round(max(budget.uptrain_percents) / 100 * steps))
    lr = budget.uptrain_lr_frac * budget.lr
    out = {"steps": top, "lr": lr, "percents": list(budget.uptrain_percents),
           "ladder_steps": [max(1, round(p / 100 * steps)) for p in budget.uptrain_percents],
           "converted": [], "control": []}
    batch = data.eval_batch(corpus.val, seq_len=budget.n_ctx, batch_size=budget.batch_size // trainer.grad_accum,
                            seed=data.EVAL_SEED, index=0, ignore_id=corpus.ignore_id)
    starts, runs = {}, []
    for seed in budget.seeds:
        mha = tree_map(lambda t: t.cpu(), params["baseline", seed])
        gqa_config, gqa = to_gqa(base, mha, budget.main_kv_head)
        for kind, config, start in (("converted", gqa_config, gqa), ("control", base, mha)):
            init = study.root / "uptrain-init" / run_name(kind, seed)
            if not (init / "model.safetensors").exists():
                save_checkpoint(init, config, start)
            starts[kind, seed] = (config, start)
            runs.append(trainer.config(None, seed + 1000, top, f"uptrain-{run_name(kind, seed)}", init_from=str(init),
                                       lr=lr, min_lr=lr, warmup=max(1, top // 10), schedule="cosine",
                                       eval_interval=1, eval_iters=1, checkpoint_interval=0))
    trainer.train(runs)
    for seed in budget.seeds:
        for kind in ("converted", "control"):
            config, start = starts[kind, seed]
            name = f"uptrain-{run_name(kind, seed)}"
            curve = [probes.batch_loss(start, config, *batch)] + [m["val_loss"] for m in metrics(study.root / name)]
            final = probes.evaluation_loss(load_run(study, name, trainer.launch.device), config, corpus.val,
                                           eval_starts, corpus.ignore_id)
            out[kind].append({"seed": seed, "curve": curve, "final_loss": final})  # curve[k]: after k steps
        progress.log(f"uptrained converted and control models of baseline seed {seed}")
    return out


# --- probes ---------------------------------------------------------------------------------

def context_probe(budget: Budget, corpus: data.Corpus, arms: dict, params: dict,
                  names: tuple[str, ...] | None = None) -> dict:
    cuts = tuple(budget.context_cuts) + (budget.n_ctx,)
    targets = probes.context_targets(corpus.val, budget.n_ctx, budget.context_targets, corpus.ignore_id)
    out = {"cuts": list(cuts), "targets": len(targets), "arms": {}}
    for name in names or ("baseline", "rope", f"gqa-{budget.main_kv_head}", budget.swa_arm):
        per_seed = [probes.context_losses(params[name, s], arms[name], corpus.val, targets, cuts)
                    for s in budget.seeds]
        entry = {}
        for k in budget.context_cuts:  # gain from context beyond k: L(k) - L(n_ctx), per target
            gain = np.stack([p[k] - p[budget.n_ctx] for p in per_seed], axis=1)  # [targets, seeds]
            entry[str(k)] = bootstrap_interval(gain, resamples=budget.bootstrap) | {
                "per_seed": [float(g) for g in gain.mean(axis=0)]}
        entry["loss_at"] = {str(k): statistics.fmean(float(p[k].mean()) for p in per_seed) for k in cuts}
        out["arms"][name] = entry
    return out


BINS = ("[n,2n)", "[2n,3n)", "[3n,4n)")


def length_probe(budget: Budget, corpus: data.Corpus, arms: dict, params: dict) -> dict:
    """Per-position penalty of one long pass against the sliding-n_ctx evaluation."""
    n = budget.n_ctx
    inputs, targets = probes.length_sequences(corpus.val, n, budget.length_mult, budget.length_seqs)
    rope, swa = arms["rope"], arms[f"rope+swa-{budget.window}"]
    models = {"rope": ("rope", rope, None),
              f"rope, window {n} at inference only": ("rope", rope, rope.replace(window=n)),
              f"rope+swa-{budget.window}": (f"rope+swa-{budget.window}", swa, None)}
    bins = [(i * n, (i + 1) * n) for i in range(1, budget.length_mult)]
    out = {"n_ctx": n, "length": budget.length_mult * n, "stride": budget.length_stride,
           "bins": [list(b) for b in bins], "bin_names": list(BINS[:len(bins)]), "models": {}}
    for label, (arm, config, eval_config) in models.items():
        runs = [probes.length_penalty(params[arm, s], config, inputs, targets, budget.length_stride,
                                      corpus.ignore_id, eval_config=eval_config) for s in budget.seeds]
        penalty = np.stack([r["penalty"] for r in runs], axis=1)  # [seqs, seeds, positions]
        sliding = np.stack([r["sliding"] for r in runs])
        out["models"][label] = {
            "inside_max_abs": float(np.nanmax(np.abs(penalty[:, :, :n]))),
            "bins": [bootstrap_interval(penalty[:, :, a:b], resamples=budget.bootstrap) for a, b in bins],
            "curve": _binned(penalty, 16),
            "sliding_loss_bins": [float(np.nanmean(sliding[..., a:b])) for a, b in bins]}
    # learned positions: no embedding past n_ctx, so only the sliding evaluation exists
    base_sliding = np.stack([probes.sliding_losses(params["baseline", s], arms["baseline"], inputs, targets,
                                                   budget.length_stride, corpus.ignore_id) for s in budget.seeds])
    out["learned_sliding_loss_bins"] = [float(np.nanmean(base_sliding[..., a:b])) for a, b in bins]
    out["learned_inside_loss"] = float(np.nanmean(base_sliding[..., :n]))
    return out


def _binned(values: np.ndarray, width: int) -> list[float | None]:
    """Mean over everything but the last axis (positions), in bins of `width` positions."""
    chunks = [values[..., i:i + width] for i in range(0, values.shape[-1], width)]
    return [float(np.nanmean(c)) if np.isfinite(c).any() else None for c in chunks]


def copy_probe(budget: Budget, corpus: data.Corpus, arms: dict, params: dict, vocab: Vocab) -> dict:
    n, span = budget.n_ctx, budget.copy_span
    rope, swa = arms["rope"], arms[f"rope+swa-{budget.window}"]
    models = {"baseline": ("baseline", arms["baseline"]), "rope": ("rope", rope),
              f"rope, window {n} at inference only": ("rope", rope.replace(window=n)),
              f"rope+swa-{budget.window}": (f"rope+swa-{budget.window}", swa)}
    out = {"distances": list(budget.copy_distances), "span": span, "seqs": budget.copy_seqs,
           "reach": budget.n_layer * (budget.window - 1), "models": {}}
    for label, (arm, config) in models.items():
        rows = []
        for D in budget.copy_distances:
            seqs, first, second = probes.copy_sequences(corpus.val, D, span, budget.copy_seqs, vocab.unk,
                                                        seed=D, avoid=vocab.eot)
            if config.pos_emb == "learned" and seqs.shape[1] - 1 > config.n_ctx:
                rows.append(None)  # no position embedding that far
                continue
            gain = np.stack([probes.copy_gain(params[arm, s], config, seqs, first, second, span)
                             for s in budget.seeds], axis=1)  # [seqs, seeds]
            rows.append(bootstrap_interval(gain, resamples=budget.bootstrap))
        out["models"][label] = rows
    return out


def generation_probe(budget: Budget, corpus: data.Corpus, arms: dict, params: dict, vocab: Vocab) -> dict:
    starts = probes.evenly_spaced(len(corpus.val), budget.prompt_tokens + budget.new_tokens, budget.prompts)
    prompts = [corpus.val[s:s + budget.prompt_tokens].astype(np.int64).tolist() for s in starts]
    truth = [corpus.val[s + budget.prompt_tokens:s + budget.prompt_tokens + budget.new_tokens].astype(np.int64).tolist()
             for s in starts]
    seed = budget.seeds[0]
    out = {"prompts": [vocab.decode(p) for p in prompts], "truth": [vocab.decode(t) for t in truth],
           "seed": seed, "sampling": dataclasses.asdict(probes.SAMPLED), "arms": {}}
    for name, config in arms.items():
        if (name, seed) not in params:
            continue
        gen = probes.continuations(params[name, seed], config, prompts, budget.new_tokens, eos_id=vocab.eot,
                                   vocab_limit=vocab.unk)
        # over the text's own tokens: a continuation that stops early (EOT) scores its missing tokens as misses
        match = [sum(a == b for a, b in zip(g, t)) / len(t) for g, t in zip(gen["greedy"], truth)]
        reps = [r for r in (probes.repeated_ngram_share(g) for g in gen["greedy"]) if r is not None]
        out["arms"][name] = {"greedy": [vocab.decode(g) for g in gen["greedy"]],
                             "sampled": [vocab.decode(g) for g in gen["sampled"]],
                             "greedy_match": statistics.fmean(match),
                             "greedy_repeat": statistics.fmean(reps) if reps else None}
    return out


def relay_probe(budget: Budget, progress: Progress) -> dict:
    task = relay.RelayTask(seq_len=budget.relay_seq_len)
    shape = relay.relay_config(task, 1, None)
    out = {"seq_len": task.seq_len, "n_values": task.n_values, "chance": task.chance, "steps": budget.relay_steps,
           "n_embd": shape.n_embd, "n_head": shape.n_head, "edge_accuracy": relay.EDGE_ACCURACY,
           "batch": budget.relay_batch, "seeds": list(budget.relay_seeds), "models": []}
    for n_layer, window in budget.relay_models:
        config = relay.relay_config(task, n_layer, window)
        per_seed = []
        for seed in budget.relay_seeds:
            trained = relay.train_relay(task, config, steps=budget.relay_steps, batch_size=budget.relay_batch, seed=seed)
            acc, counts = relay.accuracy_by_distance(task, trained, config, n_seqs=budget.relay_eval_seqs, seed=99)
            per_seed.append(acc)
        mean = [None if any(a[i] is None for a in per_seed) else statistics.fmean(a[i] for a in per_seed)
                for i in range(task.seq_len - 1)]
        edge = relay.receptive_field(n_layer, window, task.seq_len)
        out["models"].append({
            "n_layer": n_layer, "window": window, "predicted_edge": edge, "accuracy": mean,
            "accuracy_per_seed": per_seed, "reads_per_distance_min": int(min(counts)),
            "measured_edge": relay.measured_edge(mean, relay.EDGE_ACCURACY),
            "within_single_window": relay.mean_over(mean, 1, (window or task.seq_len) - 1),
            "within_edge": relay.mean_over(mean, 1, edge),
            "between_window_and_edge": relay.mean_over(mean, (window or task.seq_len), edge) if window else None,
            "beyond_edge": relay.mean_over(mean, edge + 1, edge + window) if window else None})
        progress.log(f"relay probe: {n_layer} layers, window {window}")
    return out


# --- efficiency -------------------------------------------------------------------------------

def decode_variants(budget: Budget) -> dict[str, GPTConfig]:
    """GPT-2's width (768, 12 heads of 64) with `decode_layers` layers, rotary positions."""
    base = GPTConfig(vocab_size=budget.vocab_size, n_layer=budget.decode_layers, n_head=12, n_embd=768,
                     n_ctx=max(budget.decode_contexts) + budget.decode_tokens, pos_emb="rope")
    return {"MHA": base, "GQA-4": base.replace(n_kv_head=4), "MQA": base.replace(n_kv_head=1),
            f"SWA-{budget.decode_window}": base.replace(window=budget.decode_window)}


def efficiency_measurements(budget: Budget, arms: dict, progress: Progress, device: str = "cpu") -> dict:
    """On `device`: CUDA events and torch.cuda's peak memory on a GPU (fgpt.measure)."""
    out = {"machine": machine(), "device": device}
    gpt2 = GPTConfig.preset("gpt2", pos_emb="rope")
    kv_configs = {"GPT-2 124M (MHA)": gpt2, "GQA-4": gpt2.replace(n_kv_head=4), "MQA": gpt2.replace(n_kv_head=1),
                  "SWA-1024": gpt2.replace(window=1024), "GQA-4 + SWA-1024": gpt2.replace(n_kv_head=4, window=1024)}
    out["kv_cache"] = {name: [{"context": T, "bytes": efficiency.kv_cache_bytes(c, T),
                               "mib": efficiency.kv_cache_bytes(c, T) / efficiency.MiB,
                               "formula": efficiency.kv_cache_formula(c, T)} for T in budget.kv_contexts]
                       for name, c in kv_configs.items()}
    out["bandwidth"] = copy_bandwidth(device=device)
    out["bandwidth_gb_per_s"] = out["bandwidth"] / 1e9
    variants = decode_variants(budget)
    out["decode_model"] = config_dict(variants["MHA"]) | {"head_dim": variants["MHA"].head_dim}
    out["decode"] = {name: [efficiency.decode_row(c, context=T, batch=B, new_tokens=budget.decode_tokens,
                                                  runs=budget.decode_runs, bandwidth=out["bandwidth"], device=device)
                            for T in budget.decode_contexts for B in budget.decode_batches]
                     for name, c in variants.items()}
    progress.log("measured KV-cache bytes and decode speed")
    out["kernels"] = {"window": budget.kernel_window, "heads": budget.kernel_heads, "head_dim": budget.kernel_head_dim,
                      "rows": in_child(efficiency, "kernel_scaling", list(budget.kernel_lengths), budget.kernel_window,
                                                  budget.kernel_heads, budget.kernel_head_dim,
                                                  budget.kernel_dense_max, budget.kernel_repeats, device)}
    progress.log("measured the attention kernels against sequence length")
    step_arms = {"rope": arms["rope"], f"rope+swa-{budget.window}": arms[f"rope+swa-{budget.window}"],
                 f"rope+gqa-{budget.main_kv_head}": arms["rope"].replace(n_kv_head=budget.main_kv_head)}
    out["steps"] = in_child(efficiency, "step_scaling", {name: _fields(c) for name, c in step_arms.items()},
                                       list(budget.step_lengths), budget.step_repeats, device)
    progress.log("measured training step time and memory at long sequence lengths")
    return out


def _fields(config: GPTConfig) -> dict:
    return {k: getattr(config, k) for k in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd", "n_kv_head",
                                            "pos_emb", "window")}


# --- the whole study ----------------------------------------------------------------------------

def study_corpus(budget: Budget, data_spec: str | None, root: Path) -> tuple[data.Corpus, Vocab, Path]:
    """The corpus every run reads, its vocabulary, and the directory the runs are given as --data:
    the restricted corpus written as shards under OUT/runs/corpus, or the prepared source itself."""
    if not budget.restrict_vocab:
        directory = data.build_cache(data_spec, progress=False)
        corpus = data.open_corpus(directory, data.BUILTIN if data_spec is None else data_spec)
        # the probes index the validation split freely: it is read into memory (the training split is not)
        return dataclasses.replace(corpus, val=np.asarray(corpus.val)), full_vocab(), directory
    corpus, vocab = restrict(data.load_corpus(data_spec, progress=False), budget.vocab_size)
    return corpus, vocab, write_corpus(corpus, root / "corpus")


def study_precision(study: StudyDir, launch: Launch) -> str:
    """One precision for every run of the study: --precision auto is resolved once (by a
    measurement that load can sway) and recorded, so a rerun trains the rest alike."""
    chosen = study.section("precision", lambda: {
        "precision": precision.choose(launch.device) if launch.precision == "auto" else launch.precision})["precision"]
    if launch.precision not in ("auto", chosen):
        raise FgptError(f"--precision {launch.precision}: this study trains in {chosen} (its first run chose it); "
                        f"use another --out")
    return chosen


def identity(budget: Budget, data_spec: str | None) -> dict:
    """What a rerun into the same --out must agree with."""
    return {"budget": budget.to_dict(), "data": absolute_data(data_spec)}


def run_study(budget: Budget, *, data_spec: str | None = None, out: Path = Path("docs"),
              launch: Launch | None = None) -> dict:
    """The study into `out`/runs (rerunning resumes it); returns the results tree."""
    launch = launch or Launch()
    budget.check()
    study = StudyDir(Path(out) / "runs", identity(budget, data_spec))
    launch.precision = study_precision(study, launch)
    progress = Progress()
    try:
        results = _study(study, budget, data_spec, launch, progress)
    finally:  # this invocation's wall-clock, however it ends: a resumed study's total is every invocation's
        study.add_wall_min(progress.elapsed() / 60)
    results["wall_min"], results["invocations"] = study.wall_min(), len(study.invocations())
    return results


def _study(study: StudyDir, budget: Budget, data_spec: str | None, launch: Launch, progress: Progress) -> dict:
    torch.manual_seed(0)
    corpus, vocab, data_dir = study_corpus(budget, data_spec, study.root)
    window_rule = budget.window is None
    provisional = dataclasses.replace(budget, window=budget.window or max(budget.context_cuts))  # the pilot's
    arms = {name: c.replace(vocab_size=vocab.size) for name, c in provisional.arms().items()}
    base = arms["baseline"]
    progress.log(f"{len(arms)} arms; corpus {len(corpus.train)} training tokens, vocabulary {vocab.size} "
                 f"({100 * vocab.coverage_train:.1f}% of tokens kept); {launch.strategy} x {launch.nproc} "
                 f"on {launch.device}")
    results = {"setup": {"corpus": corpus.description, "train_tokens": len(corpus.train), "val_tokens": len(corpus.val),
                         "vocab_size": vocab.size, "coverage_train_percent": 100 * vocab.coverage_train,
                         "coverage_val_percent": 100 * vocab.coverage_val,
                         "shares": shares(base), "shares_gpt2_vocab": shares(base.replace(vocab_size=50257))},
               "rules": RULES}
    pilot = study.section("pilot", lambda: pilot_steps(provisional, corpus, arms, progress, launch))
    steps = pilot["steps"]
    results["pilot"] = pilot
    eval_starts = probes.evenly_spaced(len(corpus.val), budget.n_ctx + 1, budget.final_eval_windows)
    results["eval_set"] = {"windows": len(eval_starts), "tokens": len(eval_starts) * budget.n_ctx}
    trainer = Trainer(study, provisional, launch, data_dir, steps, progress)
    if window_rule:  # baseline seed 0 first: its context use picks the window (budget.WINDOW_RULE)
        seed0 = budget.seeds[0]
        trainer.train(trainer.arm_runs({"baseline": base}, only=("baseline", seed0)))

        def pick() -> dict:
            params = {("baseline", seed0): load_run(study, run_name("baseline", seed0), launch.device)}
            probe = context_probe(dataclasses.replace(provisional, seeds=(seed0,)), corpus, {"baseline": base},
                                  params, names=("baseline",))
            gains = {k: probe["arms"]["baseline"][str(k)] for k in budget.context_cuts}
            return {"window": choose_window(budget, gains), "rule": WINDOW_RULE, "seed": seed0,
                    "gains": {str(k): g for k, g in gains.items()}}
        results["window_rule"] = study.section("window", pick)
        budget = dataclasses.replace(budget, window=results["window_rule"]["window"])
        budget.check()
        progress.log(f"window {budget.window}, by the rule in fgpt.report.budget")
        arms = {name: c.replace(vocab_size=vocab.size) for name, c in budget.arms().items()}
        trainer.budget = budget
    results["arms_config"] = {name: config_dict(c) for name, c in arms.items()}
    trainer.train(trainer.arm_runs(arms))
    runs, params = score_runs(study, budget, corpus, arms, eval_starts, progress, launch.device)
    results["runs"] = runs
    results["uptrain"] = study.section("uptrain", lambda: uptrain_ladder(trainer, budget, corpus, params, steps, base,
                                                                         eval_starts, progress))
    results["train_wall_min"] = sum(run_dir.train_state(d)["elapsed_s"] for d in study.root.iterdir()
                                    if (d / run_dir.STATE_FILE).exists()) / 60  # every run's own clock, across resumes
    results["context"] = study.section("context", lambda: context_probe(budget, corpus, arms, params))
    progress.log("context-use probe done")
    results["length"] = study.section("length", lambda: length_probe(budget, corpus, arms, params))
    progress.log("length probe done")
    results["copy"] = study.section("copy", lambda: copy_probe(budget, corpus, arms, params, vocab))
    progress.log("copy probe done")
    results["generation"] = study.section("generation", lambda: generation_probe(budget, corpus, arms, params, vocab))
    results["relay"] = study.section("relay", lambda: relay_probe(budget, progress))
    results["efficiency"] = study.section("efficiency", lambda: efficiency_measurements(budget, arms, progress, launch.device))
    results["launch"] = launch.to_dict() | {"precision_used": _precision_used(study, arms, budget)}
    results["budget"] = budget.to_dict()
    return nan_to_none(results)


def _precision_used(study: StudyDir, arms: dict, budget: Budget) -> str:
    """What the runs trained in (--precision auto resolved; run.train records it)."""
    used = {run_dir.saved_run(study.root / run_name(a, s))[0].precision for a in arms for s in budget.seeds_of(a)}
    return "/".join(sorted(used))


def nan_to_none(x):
    """JSON has no NaN: results keep None instead."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x
