"""Sources -> token shards + manifest.json, streaming, on every core.

    manifest = prepare(list_files("owt/"), Path("data/owt"), val_fraction=0.0005)

The main thread reads chunks of about a megabyte (`fgpt.data.sources.read_chunks`) and appends
their tokens to the shards; a pool of threads tokenises them (tiktoken releases the GIL while
it encodes, and `encode_to_numpy` hands back one buffer instead of a Python int per token).
At most 2 x workers + 1 chunks are in flight, so memory stays at workers x a few megabytes
whatever the corpus size. The output is built under a temporary name and renamed into place
at the end (`fgpt.atomic`): a prepare that fails or is killed leaves no directory that looks
finished, and bad input is an FgptError naming the file (and line) before anything is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from fgpt.atomic import atomic_path
from fgpt.errors import FgptError
from fgpt.data.shards import (FORMAT, MANIFEST, Shard, ShardWriter, TokenStream, dtype_for, shard_entries,
                         shard_name, split_files)
from fgpt.data.sources import BOM, Chunk, SourceFile, read_chunks
from fgpt.data.tokenizer import EOT, gpt2_encoding

VAL_FRACTION = 0.1  # share of documents (or, when that leaves a split empty, of tokens) held out
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB of uint16), as llm.c's shards
SPLITS = ("train", "val")
_SEPARATOR = np.array([EOT], np.uint32)
_COPY_BLOCK = 1 << 22  # tokens per block when moving a split's tail


def is_val(name: str, fraction: float = VAL_FRACTION) -> bool:
    """Whether document `name` is held out: a hash of the name, the same on every machine.
    (h % 100 leads, so a 10% split picks the documents fgpt has always picked.)"""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return (h % 100) * 10**6 + (h // 100) % 10**6 < round(fraction * 10**8)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- tokenising one chunk (runs on a worker thread) ------------------------------------

@dataclass
class Encoded:
    """One chunk's tokens per split: EOT before each new document (none before a piece that
    continues the previous chunk's document)."""
    parts: dict = field(default_factory=lambda: {s: [] for s in SPLITS})
    documents: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    separated: dict = field(default_factory=dict)  # split -> its tokens start with an EOT
    has_text: bool = False
    nbytes: int = 0

    def add(self, split: str, tokens: np.ndarray, new_document: bool) -> None:
        self.separated.setdefault(split, new_document)
        if new_document:
            self.parts[split].append(_SEPARATOR)
            self.documents[split] += 1
        self.parts[split].append(tokens)

    def tokens(self, split: str) -> np.ndarray:
        return np.concatenate(self.parts[split]) if self.parts[split] else _SEPARATOR[:0]


def encode(text: str) -> np.ndarray:
    """GPT-2 tokens of `text` as uint32, special-token text encoded as ordinary text: the
    same ids as tiktoken's `encode_ordinary`, lone surrogates replaced as it does."""
    enc = gpt2_encoding()
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


def encode_chunk(chunk: Chunk, *, split_of: Callable[[str], str], text_field: str) -> Encoded:
    out = Encoded(nbytes=chunk.nbytes)
    if chunk.kind == "texts":
        documents = zip(chunk.names, chunk.texts, chunk.continues)
    else:
        documents = ((name, text, False) for name, text in _jsonl_records(chunk, text_field))
    for name, text, continues in documents:
        out.has_text = out.has_text or (bool(text) and not text.isspace())
        out.add(split_of(name), encode(text), new_document=not continues)
    return out


def _jsonl_records(chunk: Chunk, text_field: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each non-blank line; a bad line is an FgptError naming file and line."""
    path = chunk.file.path
    try:
        text = chunk.raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = chunk.first_line + chunk.raw.count(b"\n", 0, e.start)
        raise FgptError(f"{path} line {line}: not UTF-8 text") from None
    if chunk.first_line == 1:
        text = text.removeprefix(BOM)  # a UTF-8 byte-order mark, as Windows tools write
    for i, raw_line in enumerate(text.split("\n")):
        if not raw_line.strip():
            continue
        line = chunk.first_line + i
        try:
            record = json.loads(raw_line)
        except ValueError as e:
            raise FgptError(f"{path} line {line}: not valid JSON ({getattr(e, 'msg', e)}, "
                            f"column {getattr(e, 'colno', '?')})") from None
        if not isinstance(record, dict):
            raise FgptError(f"{path} line {line}: a {type(record).__name__}, not a JSON object")
        if text_field not in record:
            keys = ", ".join(list(record)[:10]) or "none"
            raise FgptError(f"{path} line {line}: no '{text_field}' field (its fields: {keys}); "
                            f"choose one with --text-field")
        value = record[text_field]
        if not isinstance(value, str):
            raise FgptError(f"{path} line {line}: '{text_field}' is a {type(value).__name__}, not a string")
        yield f"{chunk.file.stem}#{line - 1}", value


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` on `workers` threads, results in order, at most 2 x workers + 1
    items in flight (the input is read only as fast as results are taken)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fgpt-tokenise")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- the pipeline ------------------------------------------------------------------------

def prepare(files: list[SourceFile], out: Path, *, val_files: list[SourceFile] | None = None,
            val_fraction: float = VAL_FRACTION, text_field: str = "text", workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, progress: bool = True, lenient: bool = False,
            description: str | None = None, val_description: str | None = None,
            force: bool = False) -> dict:
    """Tokenise `files` into a prepared directory `out` and return its manifest.

    Documents go to val by `is_val(name, val_fraction)`, or, with `val_files`, train is
    all of `files` and val all of `val_files`. If the hash leaves a split empty (a single
    document, say), the last `val_fraction` of the tokens is val instead."""
    if not 0 <= val_fraction < 1:
        raise FgptError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    out = Path(out)
    if out.exists() and not force:
        raise FgptError(f"--out {out} already exists; remove it or pass --force to replace it")
    workers = workers or default_workers()
    description = description or str(out)
    dtype = dtype_for(gpt2_encoding().n_vocab)
    by_hash = lambda name: "val" if is_val(name, val_fraction) else "train"  # noqa: E731
    jobs = [(files, by_hash if val_files is None else (lambda name: "train"), f"--data {description}")]
    if val_files is not None:
        jobs.append((val_files, lambda name: "val", f"--val {val_description}"))
    old = None
    try:
        with atomic_path(out, directory=True) as tmp:
            writers = {s: ShardWriter(tmp, s, dtype, shard_tokens=shard_tokens) for s in SPLITS}
            try:
                _tokenise(jobs, writers, text_field=text_field, lenient=lenient, workers=workers, progress=progress)
            finally:
                for w in writers.values():
                    w.close()
            split_by = "source" if val_files is not None else "document"
            if val_files is None and val_fraction > 0 and not all(w.tokens for w in writers.values()):
                _split_by_position(tmp, dtype, val_fraction, shard_tokens)
                split_by = "position"
            manifest = _manifest(tmp, dtype, writers, description=description, val_description=val_description,
                                 val_fraction=None if val_files is not None else val_fraction,
                                 text_field=text_field, split_by=split_by)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():  # --force: set the old directory aside only now that the new one is whole
                old = out.with_name(f".{out.name}.replaced")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(out, old)
    except BaseException:
        if old is not None and not out.exists():  # the final rename failed: put the old one back
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _tokenise(jobs: list, writers: dict, *, text_field: str, lenient: bool, workers: int, progress: bool) -> None:
    """Every job's chunks through the tokeniser pool into the split writers, in order."""
    total = sum(f.size for files, _, _ in jobs for f in files)
    # delay: no bar for a small corpus, nor before an error found in the first second
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="preparing",
              dynamic_ncols=True, delay=1.0, disable=not progress) as bar:
        for files, split_of, what in jobs:
            has_text = False
            work = partial(encode_chunk, split_of=split_of, text_field=text_field)
            for encoded in ordered_map(work, read_chunks(files, text_field=text_field, lenient=lenient), workers):
                for s in SPLITS:
                    if encoded.parts[s]:
                        writers[s].add(encoded.tokens(s), encoded.documents[s], encoded.separated[s])
                has_text = has_text or encoded.has_text
                bar.update(encoded.nbytes)
                bar.set_postfix_str(f"{_count(sum(w.tokens for w in writers.values()))} tokens", refresh=False)
            if not has_text:
                raise FgptError(f"{what}: the files hold no text")


def _count(n: int) -> str:
    return tqdm.format_sizeof(n, divisor=1000)


def _split_by_position(tmp: Path, dtype, fraction: float, shard_tokens: int) -> None:
    """All documents landed in one split: make train the first and val the last `fraction`
    of that one stream, copying only the tail."""
    if not split_files(tmp, "train"):
        for i, path in enumerate(split_files(tmp, "val")):
            path.rename(tmp / shard_name("train", i))
    itemsize = np.dtype(dtype).itemsize
    paths = split_files(tmp, "train")
    stream = TokenStream([Shard(p, p.stat().st_size // itemsize) for p in paths], dtype)
    n = len(stream)
    cut = n - math.floor(n * fraction)
    val = ShardWriter(tmp, "val", dtype, shard_tokens=shard_tokens)
    for a in range(cut, n, _COPY_BLOCK):
        val.add(stream[a:min(n, a + _COPY_BLOCK)], 0, False)
    val.close()
    start = 0
    for path, shard in zip(paths, stream.shards):
        if start >= cut:
            path.unlink()
        elif start + shard.tokens > cut:
            os.truncate(path, (cut - start) * itemsize)
        start += shard.tokens


def _manifest(tmp: Path, dtype, writers: dict, *, description: str, val_description: str | None,
              val_fraction: float | None, text_field: str, split_by: str) -> dict:
    enc = gpt2_encoding()
    splits = {}
    for s in SPLITS:
        shards = shard_entries(tmp, s, dtype)
        splits[s] = {"tokens": sum(e["tokens"] for e in shards), "shards": shards}
    digest = hashlib.sha256(json.dumps({s: [e["sha256"] for e in splits[s]["shards"]] for s in SPLITS}).encode())
    return {"format": FORMAT, "tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot": EOT,
            "dtype": np.dtype(dtype).name, "max_token": max(w.max_token for w in writers.values()),
            "source": description, "val_source": val_description, "text_field": text_field,
            "val_fraction": val_fraction, "split_by": split_by,
            "documents": sum(w.documents for w in writers.values()),
            "splits": splits, "digest": digest.hexdigest()}
