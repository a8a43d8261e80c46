"""`just bench data`: preparation throughput and memory, and a training process's memory on a
corpus of a billion tokens, each against a peer measured in the same run.

1. A JSONL corpus of `--mb` MB is generated under a temporary directory (deleted at the end).
   `python -m run.prepare` runs on it as a child process (wall time, the child's peak RSS), and
   so does the peer: raw tiktoken `encode_ordinary_batch` on the same texts with as many
   threads (only its encode calls are timed: no reading, parsing or writing). Both must count
   the same tokens. Then prepare runs again on a corpus twice the size: its peak RSS must not
   grow with it.
2. A synthetic prepared corpus of `--train-tokens` random tokens in 100M-token shards:
   training windows drawn by `rank_batch` from fgpt's pread-backed TokenStream against the
   same windows from np.memmap'd shards (RSS growth and time per batch), then a real
   `python -m run.train` on it (a one-layer model), its RSS sampled while it runs: the peak
   of the first quarter of the steps against the peak of the last quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fgpt import data
from fgpt.data.pipeline import SHARD_TOKENS, default_workers
from fgpt.data.shards import FORMAT, MANIFEST, ShardWriter, TokenStream, dtype_for, shard_entries
from fgpt.data.tokenizer import EOT, gpt2_encoding
from fgpt.heap import release_freed_memory
from fgpt.measure import machine_line, peak_rss_growth, status_bytes
from run._cli import summary

ROOT = Path(__file__).resolve().parents[2]
MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="just bench data", description=summary(__doc__))
    ap.add_argument("--mb", type=float, default=500, help="JSONL corpus size in MB (then twice that)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="threads for both tokenisers")
    ap.add_argument("--train-tokens", type=float, default=1e9, help="tokens of the synthetic prepared corpus")
    ap.add_argument("--batches", type=int, default=20000, help="batches drawn by each reader")
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the real training run")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpora are generated")
    return ap.parse_args(argv)


# --- a generated corpus ------------------------------------------------------------------

def word_list() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text(errors="replace") for f in ("argparse.py", "typing.py", "subprocess.py",
                                                                      "inspect.py", "pathlib.py"))
    words = sorted(set(re.findall(r"[A-Za-z]{2,14}", text)))
    return words + [w + "." for w in words[::7]] + [w + "," for w in words[::5]] + ["\n\n", "-", "(1)", "2024"]


def write_jsonl(path: Path, target_bytes: float, seed: int = 0) -> int:
    """Web-like records (a few KB of Zipf-distributed words each) until the file holds
    `target_bytes`; returns the number of records."""
    rng = np.random.default_rng(seed)
    words = np.array(word_list(), dtype=object)
    pool = [" ".join(words[(rng.zipf(1.15, int(rng.integers(150, 1500))) - 1) % len(words)]) for _ in range(2000)]
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            line = json.dumps({"id": n, "text": f"Record {n}. {pool[n % len(pool)]}", "url": f"https://x/{n}"}) + "\n"
            f.write(line)
            size, n = size + len(line.encode()), n + 1
    return n


def raw_tiktoken(path: Path, workers: int, batch_docs: int = 2000) -> tuple[float, int]:
    """Seconds inside `encode_ordinary_batch` over the file's texts, and the tokens they make
    with an EOT between documents (as prepare joins them)."""
    enc, seconds, tokens, docs = gpt2_encoding(), 0.0, 0, 0
    with open(path, encoding="utf-8") as f:
        while batch := [json.loads(line)["text"] for _, line in zip(range(batch_docs), f)]:
            start = time.perf_counter()
            out = enc.encode_ordinary_batch(batch, num_threads=workers)
            seconds += time.perf_counter() - start
            tokens += sum(map(len, out))
            docs += len(batch)
    return seconds, tokens + docs - 1


def run_child(argv: list[str], sample=None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process; `sample(pid)` is called every 0.2 s
    while it runs. The peak is the child's own VmHWM, read at each sample: wait4's ru_maxrss
    would also count the parent's image the child was forked from, before its exec."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr, peak, done = [], [0], threading.Event()
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()

    def loop():
        while not done.wait(0.2):
            peak[0] = max(peak[0], child_bytes(proc.pid, "VmHWM"))
            if sample:
                sample(proc.pid)
    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    proc.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[2:4])} failed:\n{stderr[0].decode()[-2000:]}")
    return seconds, peak[0]


def prepare_child(src: Path, out: Path, workers: int) -> tuple[float, int, int]:
    """(seconds, peak RSS, tokens) of `python -m run.prepare` on `src`, every document in
    train (so the EOT separators count as in the peer's stream)."""
    seconds, rss = run_child([sys.executable, "-m", "run.prepare", "--data", str(src), "--out", str(out),
                                 "--workers", str(workers), "--val-fraction", "0", "--quiet"])
    manifest = json.loads((out / MANIFEST).read_text())
    return seconds, rss, sum(s["tokens"] for s in manifest["splits"].values())


# --- a billion tokens --------------------------------------------------------------------

def synthetic_prepared(directory: Path, tokens: int) -> None:
    """A prepared directory of random GPT-2 ids, written block by block by prepare's writer."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    dtype, splits, top = dtype_for(EOT + 1), {}, -1
    for split, n in {"train": tokens, "val": 1_000_000}.items():
        writer = ShardWriter(directory, split, dtype, shard_tokens=SHARD_TOKENS)
        for a in range(0, n, 1 << 24):
            writer.add(rng.integers(0, EOT + 1, min(1 << 24, n - a), dtype=dtype), 0, starts_with_separator=False)
        writer.close()
        splits[split] = {"tokens": writer.tokens, "shards": shard_entries(directory, split, dtype)}
        top = max(top, writer.max_token)
    manifest = {"format": FORMAT, "tokenizer": "gpt2", "vocab_size": EOT + 1, "eot": EOT, "dtype": dtype.name,
                "max_token": top, "source": "synthetic", "documents": 0, "splits": splits}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


class MemmapShards:
    """The peer: the same shards as np.memmap arrays, windows sliced from them."""

    def __init__(self, stream: TokenStream):
        self.maps = [np.memmap(s.path, dtype=np.uint16, mode="r") for s in stream.shards]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, key: slice):
        i = int(np.searchsorted(self.starts, key.start, side="right")) - 1
        a, b = key.start - self.starts[i], key.stop - self.starts[i]
        if b <= len(self.maps[i]):
            return np.asarray(self.maps[i][a:b])
        return np.concatenate([self.maps[i][a:], self.maps[i + 1][:b - len(self.maps[i])]])


def draw_batches(tokens, n: int, seq_len: int = 1024, batch: int = 8) -> None:
    for s in range(n):
        data.rank_batch(tokens, seq_len=seq_len, batch_size=batch, seed=1, step=s)


def child_bytes(pid: int, field: str) -> int:
    """`status_bytes` of a child that may have exited meanwhile (then 0)."""
    try:
        return status_bytes(field, pid)
    except OSError:
        return 0


# --- the report --------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="fgpt-bench-data-", dir=args.tmp))
    try:
        prepare_table(args, work)
        train_table(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_table(args, work: Path) -> None:
    small, large = work / "corpus.jsonl", work / "corpus2x.jsonl"
    write_jsonl(small, args.mb * MB)
    base_s, base_tokens = raw_tiktoken(small, args.workers)
    rows = [("raw tiktoken `encode_ordinary_batch` (encode calls only)", small, base_s, None, base_tokens)]
    for src in (small, large):
        if src == large:
            write_jsonl(large, 2 * args.mb * MB, seed=1)
        seconds, rss, tokens = prepare_child(src, work / f"out-{src.stem}", args.workers)
        rows.append(("`python -m run.prepare` (whole process, VmHWM)", src, seconds, rss, tokens))
        shutil.rmtree(work / f"out-{src.stem}")
    if rows[1][4] != base_tokens:
        raise SystemExit(f"prepare made {rows[1][4]} tokens, tiktoken {base_tokens}: the comparison is void")
    base_rate = base_tokens / base_s
    print(f"\nprepare: JSONL corpora of {args.mb:g} and {2 * args.mb:g} MB, {args.workers} threads each; "
          f"tokens identical to tiktoken's: yes ({base_tokens:,} on the first)")
    print("| tokeniser | corpus | seconds | MB/s | tokens/s | vs raw tiktoken | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, src, seconds, rss, tokens in rows:
        size = src.stat().st_size
        print(f"| {name} | {size / MB:.0f} MB | {seconds:.1f} | {size / MB / seconds:.2f} | {tokens / seconds:,.0f} | "
              f"{tokens / seconds / base_rate:.2f}x | {'-' if rss is None else f'{rss / MB:.0f} MB'} |")
    small.unlink()
    large.unlink()


def train_table(args, work: Path) -> None:
    corpus_dir = work / "billion"
    synthetic_prepared(corpus_dir, int(args.train_tokens))
    stream = data.load_corpus(str(corpus_dir)).train
    release_freed_memory()
    rows = []
    for name, tokens in (("fgpt TokenStream (pread)", stream), ("np.memmap per shard (the peer)", MemmapShards(stream))):
        start = time.perf_counter()
        grew = peak_rss_growth(lambda: draw_batches(tokens, args.batches))
        rows.append((name, (time.perf_counter() - start) / args.batches, grew))
    print(f"\nreading training batches: {len(stream) / 1e9:.2f}B tokens in {len(stream.shards)} shards, "
          f"{args.batches} batches of 8 x 1024, the same windows for both")
    print("| reader | µs per batch | RSS growth over the batches |")
    print("|---|---:|---:|")
    for name, seconds, grew in rows:
        print(f"| {name} | {seconds * 1e6:.0f} | {grew / MB:.1f} MB |")

    out = work / "run"
    samples = []  # (rss, steps done)

    def sample(pid):
        metrics = out / "metrics.jsonl"
        steps = metrics.read_text().count("\n") if metrics.exists() else 0
        samples.append((child_bytes(pid, "VmRSS"), steps))
    flags = ["--data", str(corpus_dir), "--model", "tiny", "--n-layer", "1", "--n-embd", "64", "--n-head", "2",
             "--n-ctx", "64", "--batch-size", "4", "--steps", str(args.train_steps), "--eval-interval", "0",
             "--checkpoint-interval", "0", "--device", "cpu", "--out", str(out)]
    seconds, peak = run_child([sys.executable, "-m", "run.train", *flags], sample=sample)
    # Within a step RSS rises and falls with the activations: compare the highest it went in
    # the first quarter of the steps with the highest in the last quarter.
    quarter = args.train_steps // 4
    early = [rss for rss, s in samples if 1 <= s <= quarter and rss]
    late = [rss for rss, s in samples if s >= args.train_steps - quarter and rss]
    if not early or not late:
        raise SystemExit("too few RSS samples in the first or last quarter of the run: raise --train-steps")
    print(f"\n`python -m run.train` on it: 1 layer x 64 wide, context 64, batch 4, {args.train_steps} steps "
          f"in {seconds:.0f} s, RSS sampled every 0.2 s ({len(early)} samples in the first quarter of the "
          f"steps, {len(late)} in the last)")
    print("| peak RSS, first quarter | peak RSS, last quarter | growth | process peak (VmHWM) |")
    print("|---:|---:|---:|---:|")
    print(f"| {max(early) / MB:.0f} MB | {max(late) / MB:.0f} MB | {(max(late) - max(early)) / MB:+.1f} MB | "
          f"{peak / MB:.0f} MB |")
