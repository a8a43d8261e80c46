"""`python -m run.serve`: an OpenAI-compatible completion server over one or more checkpoints,
with continuous batching and a playground page that compares them side by side.

POST /v1/completions, GET /v1/models, GET /health, GET / (the playground); see docs/serve.md.
Loopback by default; Ctrl-C or SIGTERM stops it after the requests in flight.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time

import torch

from fgpt.checkpoint import load_checkpoint
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError, require_extra
from fgpt.inference import int8
from fgpt.inference.generate import decode_layout
from fgpt.tree import FLOAT_DTYPES
from run._cli import ArgumentParser, main_guard, summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m run.serve", description=summary(__doc__))
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="a .safetensors file or a directory (HF layout or a training output); repeat to serve several")
    ap.add_argument("--name", action="append", help="model id of each --checkpoint, in order "
                    "(default: the checkpoint's directory name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=8, help="rows decoded together per model")
    ap.add_argument("--dtype", choices=[*FLOAT_DTYPES, "int8"], default="float32")
    ap.add_argument("--max-body", type=int, default=4 << 20, help="largest request body, in bytes")
    return ap.parse_args(argv)


def load_models(args: argparse.Namespace) -> list:
    from fgpt.serving.app import Model, model_name
    from fgpt.serving.engine import Engine
    names = args.name or [model_name(c) for c in args.checkpoint]
    if len(names) != len(args.checkpoint):
        raise FgptError(f"{len(names)} --name for {len(args.checkpoint)} --checkpoint: give one per checkpoint")
    if len(set(names)) != len(names):
        raise FgptError(f"two checkpoints share the model id {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                        "tell them apart with --name")
    if args.max_batch < 1:
        raise FgptError(f"--max-batch must be >= 1, got {args.max_batch}")
    n_vocab = gpt2_encoding().n_vocab
    models = []
    for path, name in zip(args.checkpoint, names):
        t0 = time.perf_counter()
        config, params = load_checkpoint(path, dtype=FLOAT_DTYPES.get(args.dtype, torch.float32))
        if config.vocab_size < n_vocab:
            raise FgptError(f"{path}: vocabulary of {config.vocab_size} is smaller than GPT-2's {n_vocab}")
        if args.dtype == "int8":
            params = int8.quantize(params)
        params = decode_layout(params)
        engine = Engine(params, config, max_batch=args.max_batch, vocab_limit=n_vocab)
        models.append(Model(name, engine, config.n_ctx, config.vocab_size, int(time.time())))
        logging.info("loaded %s as %r (%s) in %.1fs", path, name, args.dtype, time.perf_counter() - t0)
    return models


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    require_extra("starlette", "serve", "python -m run.serve")
    uvicorn = require_extra("uvicorn", "serve", "python -m run.serve")
    from fgpt.serving.app import make_app
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bind before loading: a busy port is a one-line error, not a late traceback
        sock.bind((args.host, args.port))
    except OSError as e:
        raise FgptError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except (socket.gaierror, OverflowError) as e:
        raise FgptError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    try:
        models = load_models(args)
    except BaseException:
        sock.close()
        raise
    app = make_app(models, max_body=args.max_body)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    logging.info("serving %s on http://%s:%d (Ctrl-C stops)", ", ".join(m.name for m in models), host, port)
    server.run(sockets=[sock])
    logging.info("stopped")


if __name__ == "__main__":
    main_guard(main)
