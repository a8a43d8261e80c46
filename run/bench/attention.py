"""`just bench attention [--no-flex] [--quick]`: the attention variants on this machine.

Tables (each with ratios against a peer measured in the same run):
  1. kernels, one 64-wide head, W=256: full causal SDPA vs dense-masked SWA vs fgpt's SWA
     (the band) vs the opt-in flex kernel, forward time and peak memory for T = 1k..16k;
     1b. the band vs flex at GPT-2's width (12 heads, 4 kv heads) for the two longest T;
  2. fgpt's SWA block sizes at T=16k (forward, forward+backward), as a FLOP rate against
     a plain matmul of the same shape (the FLOP floor is 4·T·W·d per forward);
  3. a 2-layer attention-dominated model (1 head of 64, vocab 256) forward, full vs SWA
     with the band and with the flex kernel;
  4. GQA: SDPA's enable_gqa vs repeat_interleave / expand of K/V (forward+backward);
     4b. a GQA decode step at 1k and 16k cached keys, batch 8: enable_gqa vs fgpt's fold;
  5. KV-cache bytes per token for MHA / GQA-4 / MQA / SWA at GPT-2 124M shapes;
  6. decode tokens/s at a 2k context, MHA vs GQA vs SWA (124M shapes, 4 layers).
The flex kernel (fgpt/flex_window.py) compiles once per length; that first call is timed
apart ("flex compile s": measured 9 s for the first length and 2-3 s for each next with
inductor's disk cache empty, 0.1-3 s with it warm)
and excluded from "flex ms". --no-flex skips it. On CPU it has no backward (torch 2.13),
so every flex column is forward only.
Peak memory is the resident-set growth during the call (its high-water mark, VmHWM), with
glibc told to return every large block to the OS on free (so the resident set tracks live
tensors instead of the allocator's cache).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fgpt import GPTConfig, forward, init_params
from fgpt.attention import causal_attention, dense_window_attention, sliding_window_attention
from fgpt import measure
from fgpt.flex_window import flex_window_attention
from fgpt.inference.kv_cache import KVCache, cached_attention
from fgpt.heap import release_freed_memory
from fgpt.measure import peak_rss_growth
from run._cli import summary

W = 256
HD = 64


def best_time(fn, reps: int = 5) -> float:  # five timings by default here, not three
    return measure.best_time(fn, reps)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    cells = [header] + [[c if isinstance(c, str) else f"{c:.3g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def qkv(T: int, H: int = 1, Hkv: int | None = None, B: int = 1, grad: bool = False):
    q = torch.randn(B, H, T, HD, requires_grad=grad)
    k, v = (torch.randn(B, Hkv or H, T, HD, requires_grad=grad) for _ in range(2))
    return q, k, v


def matmul_rate(T: int) -> float:
    """FLOP/s of [T, 64] @ [64, W]: the shape of the work the window kernel must do."""
    a, b = torch.randn(T, HD), torch.randn(HD, W)
    return 2 * T * HD * W / best_time(lambda: a @ b, 20)


# --- 1. kernels ----------------------------------------------------------------------------

def kernels(lengths, flex: bool) -> None:
    dense_limit = 8192  # a dense [T, T] mask and score matrix: 1.3 GB at 16k, pointless
    rows = []
    for T in lengths:
        q, k, v = qkv(T)
        with torch.no_grad():
            t_full = best_time(lambda: causal_attention(q, k, v))
            m_full = peak_rss_growth(lambda: causal_attention(q, k, v))
            t_swa = best_time(lambda: sliding_window_attention(q, k, v, W), 10)
            m_swa = peak_rss_growth(lambda: sliding_window_attention(q, k, v, W))
            if T <= dense_limit:
                t_dense = best_time(lambda: dense_window_attention(q, k, v, W))
                m_dense = peak_rss_growth(lambda: dense_window_attention(q, k, v, W))
                dense = [t_dense * 1e3, m_dense / 2**20, t_dense / t_swa]
            else:
                dense = ["skipped", "(T² mask)", "-"]
            row = [str(T), t_full * 1e3, m_full / 2**20, *dense, t_swa * 1e3, m_swa / 2**20, t_full / t_swa]
            if flex:
                t0 = time.perf_counter()
                flex_window_attention(q, k, v, W)  # compiles for this length
                compile_s = time.perf_counter() - t0
                t_flex = best_time(lambda: flex_window_attention(q, k, v, W), 10)
                m_flex = peak_rss_growth(lambda: flex_window_attention(q, k, v, W))
                row += [t_flex * 1e3, m_flex / 2**20, t_swa / t_flex, compile_s]
        rows.append(row)
    header = ["T", "causal ms", "causal MiB", "dense-SWA ms", "dense-SWA MiB", "dense/fgpt",
              "fgpt-SWA ms", "fgpt-SWA MiB", "causal/fgpt"]
    if flex:
        header += ["flex ms", "flex MiB", "fgpt/flex", "flex compile s"]
    table(f"1. attention kernels, forward, 1 head x {HD}, W={W} (fgpt-SWA = the band kernel)", header, rows)
    swa = {int(r[0]): r[6] for r in rows}
    if 8192 in swa and 16384 in swa:
        print(f"fgpt-SWA t(16k)/t(8k) = {swa[16384] / swa[8192]:.2f} (linear: 2.0)")


def kernels_gpt2_heads(lengths, H: int = 12, Hkv: int = 4) -> None:
    """The band against flex at a real prefill's width: GPT-2's 12 heads, grouped 3 to a kv head."""
    rows = []
    for T in lengths:
        q, k, v = qkv(T, H, Hkv)
        with torch.no_grad():
            flex_window_attention(q, k, v, W)  # compiles for this shape
            t_band = best_time(lambda: sliding_window_attention(q, k, v, W))
            t_flex = best_time(lambda: flex_window_attention(q, k, v, W))
        rows.append([str(T), t_band * 1e3, t_flex * 1e3, t_band / t_flex])
    table(f"1b. band vs flex, forward, {H} heads / {Hkv} kv heads x {HD}, W={W}",
          ["T", "band ms", "flex ms", "band/flex"], rows)


# --- 2. block sizes and the FLOP floor -------------------------------------------------------

def block_sweep(T: int) -> None:
    rate = matmul_rate(T)
    floor = 4 * T * W * HD  # QK^T and PV over exactly W keys per query
    rows = []
    q, k, v = qkv(T, grad=True)
    for block in (W, W // 2, W // 4, W // 8):
        with torch.no_grad():
            t_fwd = best_time(lambda: sliding_window_attention(q, k, v, W, block=block), 10)

        def fwd_bwd():
            sliding_window_attention(q, k, v, W, block=block).sum().backward()

        t_fb = best_time(fwd_bwd)
        achieved = floor / t_fwd
        rows.append([str(block), t_fwd * 1e3, achieved / 1e9, rate / achieved, t_fb * 1e3])
    table(f"2. fgpt-SWA block size, T={T}, W={W}, 1 head x {HD}; matmul [T,64]@[64,W] runs at "
          f"{rate / 1e9:.0f} GFLOP/s", ["block", "fwd ms", "fwd GFLOP/s (floor 4TWd)",
                                      "x from floor", "fwd+bwd ms"], rows)


# --- 3. a 2-layer model -------------------------------------------------------------------------

def model_forward(lengths, flex: bool) -> None:
    base = dict(vocab_size=256, n_ctx=max(lengths), n_layer=2, n_head=1, n_embd=HD, pos_emb="rope")
    full, swa = GPTConfig(**base), GPTConfig(**base, window=W)
    params = init_params(full)
    rows, prev = [], None
    for T in lengths:
        tokens = torch.randint(0, 256, (1, T))
        with torch.no_grad():
            t_full = best_time(lambda: forward(params, tokens, full))
            t_swa = best_time(lambda: forward(params, tokens, swa), 5)
            if flex:
                # the warm-up call compiles
                t_flex = best_time(lambda: forward(params, tokens, swa, window_kernel="flex"), 5)
        growth = f"{t_swa / prev:.2f}" if prev else "-"
        rows.append([str(T), t_full * 1e3, t_swa * 1e3, t_full / t_swa, growth])
        if flex:
            rows[-1] += [t_flex * 1e3, t_full / t_flex, t_swa / t_flex]
        prev = t_swa
    header = ["T", "full ms", "SWA ms", "full/SWA", "SWA t(T)/t(T/2)"]
    if flex:
        header += ["SWA flex ms", "full/flex", "SWA/flex"]
    table(f"3. 2-layer model forward (1 head x {HD}, vocab 256, rope), full causal vs W={W} "
          "(SWA = band kernel)", header, rows)


# --- 4. GQA -----------------------------------------------------------------------------------

def gqa(T: int = 1024, B: int = 2, H: int = 12, Hkv: int = 4, context: int = 2048) -> None:
    g = H // Hkv
    sdpa = F.scaled_dot_product_attention

    def widen_expand(x):  # [B, Hkv, S, hd] -> [B, H, S, hd] through a broadcast view, then a copy
        return x[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)

    ways = {
        "SDPA enable_gqa": lambda q, k, v, causal: sdpa(q, k, v, is_causal=causal, enable_gqa=True),
        "repeat_interleave": lambda q, k, v, causal: sdpa(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal),
        "expand": lambda q, k, v, causal: sdpa(q, widen_expand(k), widen_expand(v), is_causal=causal),
    }
    q, k, v = qkv(T, H, Hkv, B, grad=True)
    q1 = torch.randn(B, H, 1, HD)
    k_ctx, v_ctx = (torch.randn(B, Hkv, context, HD) for _ in range(2))
    rows = []
    for name, fn in ways.items():
        t_fb = best_time(lambda: fn(q, k, v, True).sum().backward())
        with torch.no_grad():
            t_dec = best_time(lambda: fn(q1, k_ctx, v_ctx, False), 50)
        rows.append([name, t_fb * 1e3, t_dec * 1e6])
    ref_fb, ref_dec = rows[0][1], rows[0][2]
    for r in rows:
        r += [r[1] / ref_fb, r[2] / ref_dec]
    table(f"4. GQA kernels: causal fwd+bwd B={B} T={T}, {H} heads / {Hkv} kv heads x {HD}; "
          f"decode step = 1 query over {context} keys",
          ["K/V by", "fwd+bwd ms", "decode step us", "fwd+bwd / enable_gqa", "decode / enable_gqa"], rows)


def gqa_decode(contexts, B: int = 8, H: int = 12, kv_heads=(12, 4, 1)) -> None:
    """One decode step's attention (a query per row over `context` cached keys): SDPA's
    enable_gqa against fgpt's cached attention, which folds each KV head's query group into
    the query axis (fgpt/inference/kv_cache.py)."""
    rows = []
    for context in contexts:
        for Hkv in kv_heads:
            q = torch.randn(B, H, 1, HD)
            k, v = (torch.randn(B, Hkv, context, HD) for _ in range(2))
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)
                torch.testing.assert_close(cached_attention(q, k, v, None), ref)  # the same maths
                t_sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H), 20)
                t_fgpt = best_time(lambda: cached_attention(q, k, v, None), 20)
            rows.append([str(context), f"{H}/{Hkv}", t_sdpa * 1e3, t_fgpt * 1e3, t_sdpa / t_fgpt])
    table(f"4b. GQA decode step at long context: B={B} rows, one query each, {H} heads x {HD}, fp32",
          ["cached keys", "heads / kv heads", "SDPA enable_gqa ms", "fgpt fold ms", "enable_gqa / fold"], rows)


# --- 5, 6. KV cache and decoding -----------------------------------------------------------------

CACHE_VARIANTS = {"MHA": {}, "GQA-4": dict(n_kv_head=4), "MQA": dict(n_kv_head=1), f"SWA W={W}": dict(window=W)}


def kv_cache_bytes(context: int = 2048) -> None:
    rows = []
    for name, extra in CACHE_VARIANTS.items():
        config = GPTConfig.preset("gpt2", n_ctx=context, **extra)
        per_token = KVCache.allocate(config, 1, context).nbytes() / context
        rows.append([name, per_token / 1024])
    for r in rows:
        r.append(rows[0][1] / r[1])
    table(f"5. KV-cache bytes per token, GPT-2 124M shapes, fp32, {context}-token context "
          "(SWA stays flat: W slots per layer)", ["variant", "KiB/token", "MHA/variant"], rows)


def decode_speed(context: int = 2048, n_new: int = 32, n_layer: int = 4, vocab: int = 8192) -> None:
    rows = []
    for name, extra in CACHE_VARIANTS.items():
        config = GPTConfig.preset("gpt2", n_layer=n_layer, n_ctx=context + n_new, vocab_size=vocab,
                                  pos_emb="rope", **extra)
        params = init_params(config)
        prompt = torch.randint(0, config.vocab_size, (1, context))
        with torch.no_grad():
            cache = KVCache.allocate(config, 1, context + n_new)
            token = forward(params, prompt, config, cache=cache)[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n_new):
                token = forward(params, token, config, cache=cache)[:, -1:].argmax(-1)
            rate = n_new / (time.perf_counter() - t0)
        rows.append([name, rate])
    for r in rows:
        r.append(r[1] / rows[0][1])
    table(f"6. decode after a {context}-token prompt, GPT-2 shapes with {n_layer} layers, vocab {vocab}, "
          f"{n_new} greedy tokens, batch 1", ["variant", "tokens/s", "vs MHA"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="just bench attention", description=summary(__doc__))
    ap.add_argument("--no-flex", dest="flex", action="store_false",
                    help="skip the compiled flex_attention kernel")
    ap.add_argument("--quick", action="store_true", help="short lengths only (a smoke run)")
    args = ap.parse_args()
    release_freed_memory()
    print(measure.machine_line())
    lengths = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384]
    kernels(lengths, args.flex)
    if args.flex:
        kernels_gpt2_heads(lengths[-2:])
    block_sweep(lengths[-1])
    model_forward(lengths, args.flex)
    gqa(T=256 if args.quick else 1024)
    gqa_decode([1024] if args.quick else [1024, 16384])
    kv_cache_bytes()
    decode_speed(context=256 if args.quick else 2048, n_new=8 if args.quick else 32)
