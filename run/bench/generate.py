"""`just bench generate`: greedy decode tokens/s, fgpt vs transformers, in one run.

GPT-2 124M shapes with random weights, batch 1, a short prompt, 128 new tokens. fgpt runs
in fp32, bf16 and int8 (weight-only, fgpt/inference/int8.py: per shape the kernel it measures
fastest, and again with torch's _weight_int8pack_mm for every product); transformers in
fp32 (the reference) and bf16. In fp32 both must pick the same tokens, or the comparison
is void. Each row also shows its bandwidth floor: a step reads every weight it multiplies
by once, so it takes at least (those bytes) / (the measured copy bandwidth).
Where llama-cpp-python is installed (the `llama` extra), llama.cpp decodes the same weights
from GGUF files that `python -m run.convert --to-gguf` writes (F32, F16, Q8_0), with as many
threads as torch uses, in the same rounds.
"""

from __future__ import annotations

import argparse

import torch

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.inference import int8
from fgpt.inference.decode_layout import measured
from fgpt.inference.generate import Sampling, decode_layout, generate
from fgpt.measure import copy_bandwidth, copy_probe, interleaved_best, machine_line
from fgpt.model import init_params
from fgpt.tree import FLOAT_DTYPES
from run._cli import summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench generate", description=summary(__doc__))
    ap.add_argument("--model", default="gpt2", help="config preset for the shapes (default gpt2 = 124M)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", action="store_true", help="instead: the products of one decode step, "
                    "kernel by kernel (fp32, bf16, fgpt's int8, torch's int8 kernel)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on cores "
                    "shared with other work, 1 thread spares every op a barrier wait")
    return ap.parse_args(argv)


def run_hf(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0].tolist()


def hf_model(params: dict, config: GPTConfig, dtype: torch.dtype, device: str = "cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx,
                                    n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head))
    hf.transformer.load_state_dict(tree.flatten(params), strict=True)
    return hf.eval().to(device, dtype)


def bytes_per_step(params: dict) -> int:
    """What one decode step must read: every block weight and the head (wte), all of it; of
    the position table only one row, so it is left out, as are the KV cache's few KB."""
    return sum(t.numel() * t.element_size() for t in tree.leaves({k: v for k, v in params.items() if k != "wpe"}))


def int8_picks(params: dict) -> str:
    """Each int8 weight shape of the tree (x @ W, [in, out]) and the kernel quantize gave it."""
    picks = {(tuple(m.q.shape[::-1]), m.kernel) for m in int8.matrices(params)}
    return ", ".join(f"{n_in}x{n_out} {kernel}" for (n_in, n_out), kernel in sorted(picks)) or "none"


def measure(model: str = "gpt2", new_tokens: int = 128, prompt_len: int = 8, repeats: int = 3,
            device: str = "cpu") -> dict:
    """Decode every engine round-robin, best of `repeats` each (a machine whose load drifts
    hits every engine alike): tokens/s per (engine, weights), bytes per step, bandwidth."""
    config = GPTConfig.preset(model)
    params = init_params(config, seed=0, device=device)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    trees = {name: tree.cast(params, dtype) for name, dtype in FLOAT_DTYPES.items()}
    trees["int8"] = int8.quantize(params)
    if device == "cpu":  # the same int8 weights again, every product in torch's own int8 kernel
        trees["int8, torch's _weight_int8pack_mm"] = int8.quantize(params, kernel="int8pack")
    engines, step_bytes = {}, {}
    for name, weights in trees.items():
        fast = decode_layout(weights)
        step_bytes[name] = bytes_per_step(fast)
        engines["fgpt", name] = lambda fast=fast: generate(
            fast, config, [prompt], new_tokens, sampling=Sampling(temperature=0), ignore_eos=True)[0]
        if name in FLOAT_DTYPES:
            hf = hf_model(params, config, FLOAT_DTYPES[name], device)
            engines["transformers", name] = lambda hf=hf: run_hf(hf, prompt, new_tokens)
    llama_engines, llama_bytes = llama_cpp_engines(params, config, prompt, new_tokens)
    engines |= llama_engines
    step_bytes |= llama_bytes
    tokens = {key: run() for key, run in engines.items()}  # warm-up
    if tokens["fgpt", "float32"] != tokens["transformers", "float32"]:
        raise FgptError("fgpt and transformers chose different greedy tokens in fp32")
    copy, moved = copy_probe(device=device)  # in the same rounds: the bandwidth sees the load the engines saw
    best = interleaved_best(engines | {"copy": copy}, repeats, device=device)
    return {"rate": {key: new_tokens / best[key] for key in engines}, "step_bytes": step_bytes,
            "bandwidth": moved / best["copy"],
            "same_as_fp32": {name: sum(a == b for a, b in zip(tokens[engine, name], tokens["fgpt", "float32"]))
                             for engine, name in engines if name.startswith(("int8", "gguf"))},
            "n_tokens": len(tokens["fgpt", "int8"]), "int8": trees["int8"]}


def table(result: dict) -> list[str]:
    rate, step_bytes, bandwidth = result["rate"], result["step_bytes"], result["bandwidth"]
    ref = rate["transformers", "float32"]
    lines = ["| engine | weights | MB read / step | floor tokens/s | tokens/s | of floor "
             "| vs transformers fp32 | vs transformers, same dtype |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in step_bytes:
        floor = bandwidth / step_bytes[name]
        for engine in ("transformers", "fgpt", "llama.cpp"):
            if (engine, name) not in rate:
                continue
            r = rate[engine, name]
            same_dtype = f"{r / rate['transformers', name]:.2f}x" if ("transformers", name) in rate else "-"
            lines.append(f"| {engine} | {name} | {step_bytes[name] / 1e6:.0f} | {floor:.1f} | {r:.1f} | "
                         f"{r / floor:.0%} | {r / ref:.2f}x | {same_dtype} |")
    return lines


def llama_cpp_engines(params: dict, config: GPTConfig, prompt: list[int], n: int) -> tuple[dict, dict]:
    """llama.cpp's greedy decode of the same weights from GGUF files, one engine per file type
    ({} where llama-cpp-python is not installed), and the bytes each step reads (every tensor
    but position_embd, in its file type)."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        return {}, {}
    import tempfile
    from pathlib import Path
    from fgpt import gguf_export
    gguf = gguf_export.gguf_module()
    arrays = gguf_export.gguf_tensors(config, params)
    folder = Path(tempfile.mkdtemp(prefix="fgpt-bench-gguf-"))
    engines, step_bytes = {}, {}
    for file_type in gguf_export.TYPES:
        path = gguf_export.write_gguf(folder / f"{file_type}.gguf", config, params, file_type)
        name = f"gguf {file_type.upper()}"
        step_bytes[name] = 0
        for tensor, a in arrays.items():
            if not tensor.startswith("position_embd"):
                block, size = gguf.GGML_QUANT_SIZES[gguf_export.tensor_type(gguf, tensor, a, file_type)]
                step_bytes[name] += a.size // block * size
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n, n_threads=torch.get_num_threads(),
                              n_threads_batch=torch.get_num_threads(), verbose=False)

        def decode(llm=llm) -> list[int]:
            out = list(prompt)
            for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy, EOS ignored
                out.append(token)
                if len(out) == len(prompt) + n:
                    break
            return out
        engines["llama.cpp", name] = decode
    return engines, step_bytes


def kernel_rates(model: str = "gpt2", repeats: int = 5) -> tuple[dict[str, tuple[float, int]], list]:
    """One decode step's products (every block weight, then the head), per kernel: (seconds
    for all of them, bytes they read), best of `repeats`, kernels interleaved; and the int8
    matrices of fgpt's own picks."""
    from fgpt.inference.decode_layout import decode_matrix, fastest_layout, one_row_product
    config = GPTConfig.preset(model)
    params = init_params(config, seed=0)
    weights = [p["weight"] for b in params["h"] for part in ("attn", "mlp") for p in b[part].values()]
    weights.append(params["wte"]["weight"].T)  # the head: x @ wte.T
    x = {w.shape[0]: torch.randn(1, w.shape[0]) for w in weights}
    kernels = {}
    plain = [w.contiguous() for w in weights]  # as HF's Conv1D stores them: the peer of the measured layouts
    kernels["float32, plain x @ W [in, out]"] = ([lambda w=w: x[w.shape[0]] @ w for w in plain],
                                                  sum(w.numel() * 4 for w in plain))
    for name, dtype in FLOAT_DTYPES.items():
        stored = [decode_matrix(w.to(dtype), fastest_layout(tuple(w.shape), dtype)) for w in weights]
        xs = {k: v.to(dtype) for k, v in x.items()}
        kernels[f"{name}, measured layouts"] = ([lambda m=m, x=xs[w.shape[0]]: one_row_product(m, x)
                                                  for w, m in zip(weights, stored)],
                                                 sum(w.numel() * dtype.itemsize for w in weights))
    q = [int8.quantize_rows(w.T) for w in weights]  # [out, in] rows, per-output-channel scales
    int8_bytes = sum(w.numel() for w, _ in q)
    picks = []
    for name, kernel in (("fbgemm, activations as 3 exact digits", "fbgemm"),
                         ("torch's _weight_int8pack_mm, bf16 inputs", "int8pack"), ("fgpt's pick per shape", "auto")):
        if kernel == "fbgemm" and not int8.FBGEMM_AVAILABLE:
            continue
        matrices = [int8.Int8Matrix(w, s, int8.choose_kernel(*w.shape, torch.float32, kernel=kernel)) for w, s in q]
        picks = matrices if kernel == "auto" else picks
        kernels[f"int8 {name}"] = ([lambda m=m, x=x[m.q.shape[1]]: m.matmul(x) for m in matrices], int8_bytes)
    steps = {name: (lambda calls=calls: [c() for c in calls]) for name, (calls, _) in kernels.items()}
    best = interleaved_best(steps, repeats + 1)  # the first round warms up
    return {name: (best[name], nbytes) for name, (_, nbytes) in kernels.items()}, picks


def print_kernels(model: str) -> None:
    from fgpt.measure import matmul_flops
    rates, picked = kernel_rates(model)
    bandwidth = copy_bandwidth()
    print(f"one decode step's products, {model} shapes (blocks then head), best of 5; {machine_line()}")
    print(f"int8 kernels fgpt picked for x @ W [in, out]: {int8_picks(picked)}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; matmul 1024^3: fp32 "
          f"{matmul_flops('cpu', torch.float32) / 1e9:.0f} GFLOP/s, bf16 "
          f"{matmul_flops('cpu', torch.bfloat16) / 1e9:.1f} GFLOP/s")
    ref = rates["float32, measured layouts"][0]
    print("| kernel | MB read | ms | GB/s read | of copy bandwidth | vs fp32 |\n|---|---:|---:|---:|---:|---:|")
    for name, (seconds, nbytes) in rates.items():
        print(f"| {name} | {nbytes / 1e6:.0f} | {seconds * 1e3:.1f} | {nbytes / seconds / 1e9:.1f} | "
              f"{nbytes / seconds / bandwidth:.0%} | {ref / seconds:.2f}x |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        return print_kernels(args.model)
    result = measure(args.model, args.new_tokens, args.prompt_len, args.repeats, args.device)
    print(f"greedy decode, {args.model} shapes, random weights, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens (prefill included), {args.device}, best of {args.repeats}; fp32 "
          f"tokens identical in fgpt and transformers; of {result['n_tokens']} positions fp32's token is picked by "
          + ", ".join(f"{name} at {same}" for name, same in result["same_as_fp32"].items()))
    print(f"machine: {machine_line()}; copy bandwidth {result['bandwidth'] / 1e9:.1f} GB/s")
    layouts = ", ".join(f"{str(dtype).removeprefix('torch.')} {k}x{m} {layout}"
                        for (_, dtype, (k, m), _), layout in measured().items())
    print(f"decode layouts measured for x @ W [in, out]: {layouts}")
    print(f"int8 kernels fgpt picked for x @ W [in, out]: {int8_picks(result['int8'])}")
    print("\n".join(table(result)))
    pairs = [(ours, theirs) for ours, theirs in (("float32", "gguf F32"), ("bfloat16", "gguf F16"), ("int8", "gguf Q8_0"))
             if ("llama.cpp", theirs) in result["rate"]]
    if pairs:
        print("fgpt vs llama.cpp, same run: " + ", ".join(
            f"{ours} {result['rate']['fgpt', ours] / result['rate']['llama.cpp', theirs]:.2f}x {theirs}"
            for ours, theirs in pairs))
