"""`just bench serve`: the completion server's aggregate tokens/s and time to first token
with 1, 4, 8 and 16 concurrent streams, against the same requests served one at a time.

A child process serves a model of the given preset's shapes with random weights (nothing
to download or save) through the real stack: `run.serve`'s engine and app under uvicorn on
loopback. Each stream is a client thread sending `--requests` streamed requests back to back
(so rows join and leave a running batch); every request asks for exactly `--new-tokens`
tokens (`ignore_eos`). "1 stream" serves every request one at a time; the ratio column
compares each row's aggregate tokens/s with it, all measured in this one run. The rows are
measured in interleaved rounds and each reports its best round, so a burst of other work on
shared cores shifts every row alike rather than one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from run._cli import summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench serve", description=summary(__doc__))
    ap.add_argument("--model", default="gpt2", help="config preset for the shapes (default gpt2 = 124M)")
    ap.add_argument("--streams", default="1,4,8,16", help="concurrent streams per row of the table")
    ap.add_argument("--requests", type=int, default=2, help="requests each stream sends, one after another")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="times each row is measured, rounds interleaved "
                    "(1, 4, 8, 16, 1, 4, ...); the best round counts (the least disturbed by other work)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--plain-weights", action="store_true",
                    help="the engine without batched weights (fgpt.inference.batched): what they change; "
                    "decode layouts stay, and a packed one (bf16 here) is oneDNN's product at every row count")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice); on "
                    "cores shared with other work, 1 thread spares every op a barrier wait")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # the child: serve, then exit
    return ap.parse_args(argv)


def serve_random(args: argparse.Namespace) -> None:
    """The child: a random-weight model of the preset's shapes behind the real app."""
    import torch
    import uvicorn
    from fgpt import tree
    from fgpt.inference import int8
    from fgpt.config import GPTConfig
    from fgpt.inference.generate import decode_layout
    from fgpt.model import init_params
    from fgpt.serving.app import Model, make_app
    from fgpt.serving.engine import Engine
    from fgpt.tree import FLOAT_DTYPES
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig.preset(args.model)
    params = init_params(config, seed=0)
    if args.dtype == "int8":
        params = int8.quantize(params)
    else:
        params = tree.cast(params, FLOAT_DTYPES[args.dtype])
    params = decode_layout(params)
    batch = max(int(s) for s in args.streams.split(","))
    engine = Engine(params, config, max_batch=batch, vocab_limit=50257, batched_weights=not args.plain_weights)
    app = make_app([Model(args.model, engine, config.n_ctx, config.vocab_size, 0)])
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.serve_port, log_level="warning")


def one_request(port: int, body: dict) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of one streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens = None, 0
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice["finish_reason"] is None:  # a token's chunk
            tokens += 1
            first = first or time.perf_counter() - t0
    conn.close()
    return first, time.perf_counter() - t0, tokens


def run_level(port: int, streams: int, args: argparse.Namespace) -> dict:
    ttft, counts, errors = [], [], []

    def client(i: int):
        for j in range(args.requests):
            prompt = [(97 * (i * args.requests + j) + 13 * k) % 50000 for k in range(args.prompt_len)]
            body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            try:
                first, _, n = one_request(port, body)
                ttft.append(first)
                counts.append(n)
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return {"streams": streams, "requests": len(counts), "tokens": sum(counts), "wall": wall,
            "tok_s": sum(counts) / wall, "ttft_median": statistics.median(ttft), "ttft_max": max(ttft)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve_port is not None:
        return serve_random(args)
    from fgpt.errors import FgptError, require_extra
    from fgpt.measure import machine_line
    require_extra("uvicorn", "serve", "just bench serve")
    levels = [int(s) for s in args.streams.split(",")]
    if not levels or min(levels) < 1 or 1 not in levels:
        raise FgptError(f"--streams needs 1 (the one-at-a-time baseline) and positive counts, got {args.streams}")
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "run.bench.serve", *sys.argv[1:], "--serve-port", str(port)],
                             stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert child.stdout.readline().strip() == b"ready", "the server child failed to start"
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        one_request(port, {"prompt": [1, 2, 3], "max_tokens": 4, "stream": True})  # warm-up
        rounds = [[run_level(port, s, args) for s in sorted(levels)] for _ in range(max(1, args.rounds))]
        rows = [max(level, key=lambda r: r["tok_s"]) for level in zip(*rounds)]
    finally:
        child.terminate()
        child.wait(30)
    base = rows[0]["tok_s"]
    weights = "decode-layout weights only" if args.plain_weights else "batched weights where measured faster"
    print(f"completion server, {args.model} shapes, random weights, {args.dtype} ({weights}), greedy, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens per request, {args.requests} requests per "
          f"stream back to back, max batch {max(levels)}, loopback HTTP + SSE; best of {max(1, args.rounds)} "
          f"interleaved rounds")
    threads = f"; server on {args.threads} torch threads" if args.threads else ""
    print(f"machine: {machine_line()}{threads} (shared with other work: timings are noisy, ratios within this run)")
    print("| concurrent streams | requests | tokens | wall s | aggregate tokens/s | vs one at a time | "
          "time to first token, median s | max s |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['streams']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}x | {r['ttft_median']:.3f} | {r['ttft_max']:.3f} |")


if __name__ == "__main__":
    main()
