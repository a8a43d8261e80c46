"""`just bench generate`: greedy decode tokens/s, fgpt vs transformers, in one run.

GPT-2 124M shapes with random weights, batch 1, a short prompt, 128 new tokens. fgpt runs
in fp32 and bf16; transformers in fp32 (the reference) and bf16. In fp32 both must pick
the same tokens, or the comparison is void.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.generate import Sampling, decode_layout, generate
from fgpt.model import init_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="config preset for the shapes (default gpt2 = 124M)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best counts")
    return ap.parse_args(argv)


def run_hf(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0].tolist()


def hf_model(params: dict, config: GPTConfig, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx,
                                    n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head))
    hf.transformer.load_state_dict(tree.flatten(params), strict=True)
    return hf.eval().to(dtype)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = GPTConfig.preset(args.model)
    params = init_params(config, seed=0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    engines = {}
    for name, dtype in DTYPES.items():
        fast = decode_layout(tree.cast(params, dtype))
        engines["fgpt", name] = lambda fast=fast: generate(
            fast, config, [prompt], n, sampling=Sampling(temperature=0), ignore_eos=True)[0]
        engines["transformers", name] = lambda hf=hf_model(params, config, dtype): run_hf(hf, prompt, n)
    # Round-robin, best of `repeats` each: a machine whose load drifts hits every engine alike.
    tokens = {key: run() for key, run in engines.items()}  # warm-up
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.repeats):
        for key, run in engines.items():
            t0 = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - t0)
    rate = {key: n / seconds for key, seconds in best.items()}
    load = os.getloadavg()[0]  # other processes on the same cores skew every number
    if tokens["fgpt", "float32"] != tokens["transformers", "float32"]:
        raise FgptError("fgpt and transformers chose different greedy tokens in fp32")
    ref = rate["transformers", "float32"]
    print(f"greedy decode, {args.model} shapes, random weights, batch 1, prompt {args.prompt_len}, "
          f"{n} new tokens, {torch.get_num_threads()} threads, best of {args.repeats}; "
          f"fp32 tokens identical in both: yes; load average {load:.1f}")
    print("| engine | weights | tokens/s | vs transformers fp32 | vs transformers, same dtype |")
    print("|---|---|---:|---:|---:|")
    for name in DTYPES:
        for engine in ("transformers", "fgpt"):
            r = rate[engine, name]
            print(f"| {engine} | {name} | {r:.1f} | {r / ref:.2f}x | {r / rate['transformers', name]:.2f}x |")
