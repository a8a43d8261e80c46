"""Corpora -> token shards -> batches, rank-aware.

    corpus = load_corpus(None)              # the built-in corpus (Python's stdlib source)
    corpus = load_corpus("owt/*.jsonl.gz")  # text / JSONL / Parquet: prepared into the cache once
    corpus = load_corpus("fineweb10B/")     # already tokenised: fgpt, nanoGPT or llm.c shards
    x, y = rank_batch(corpus.train, seq_len=256, batch_size=32, seed=0, step=s,
                      rank=r, world_size=W)  # [B/W, T] int64 each

A source that is not yet tokenised goes through the same streaming pipeline as
`python -m run.prepare` (fgpt.data.pipeline) into a cache directory named by a hash of its files'
paths, sizes and modification times, so the next run reuses it. `corpus.train` / `corpus.val`
are token streams over the shards (`len`, slicing): many shards read as one array, so the
*global* batch of step s is a pure function of (seed, s) whatever the shard sizes — every rank
draws the same window starts and keeps its contiguous slice, so any world size trains on the
same batches, and resuming needs only the step number.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgpt.data.pipeline import VAL_FRACTION, is_val, prepare  # noqa: F401  (is_val: part of the API)
from fgpt.data.shards import FORMAT, MANIFEST, TokenStream, layout, open_shards
from fgpt.data.sources import SourceFile, list_files, stdlib_files
from fgpt.errors import FgptError

_TRAIN_STREAM, _VAL_STREAM = 0, 1  # separate random streams for train and eval windows
EVAL_SEED = 0  # validation windows are drawn with this seed whatever the training seed
BUILTIN = "python stdlib"


@dataclass(frozen=True)
class Corpus:
    train: TokenStream | np.ndarray  # token ids: len() and [a:b] -> np.ndarray
    val: TokenStream | np.ndarray
    cache_dir: Path | None  # the directory of shards the tokens are read from
    description: str
    ignore_id: int | None = None  # targets equal to this id are left out of the loss (-1)


# --- sources and the cache ---------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("FGPT_CACHE", Path.home() / ".cache" / "fgpt")) / "data"


def source_files(data: str | None) -> list[SourceFile]:
    """The files of a source (None = the built-in corpus); a bad path raises FgptError."""
    return stdlib_files() if data is None else list_files(data)


def cache_key(files: list[SourceFile], *, text_field: str = "text", val_fraction: float = VAL_FRACTION) -> str:
    """Names the cache directory: the shard format, the split, the text field where a file
    has fields (JSONL, Parquet), and every file's path, size and modification time (a stat,
    not a read, so opening a cached corpus costs no pass over it)."""
    field = text_field if any(f.kind != "text" for f in files) else "text"  # plain text has none
    h = hashlib.sha256(json.dumps([FORMAT, "gpt2", field, val_fraction]).encode())
    for f in files:
        h.update(f"{f.name}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def is_prepared(data: str | None) -> bool:
    """Whether `data` is a directory of token shards (fgpt, nanoGPT or llm.c) to read as is."""
    return data is not None and layout(Path(data)) is not None


def check_text_field(data: str | None, text_field: str | None) -> None:
    """A --text-field given (None: not) names a field of JSONL / Parquet documents; a
    directory of token shards has none, so it would be ignored: refused instead."""
    if text_field is not None and is_prepared(data):
        raise FgptError(f"--text-field {text_field}: --data {data} holds token shards (already tokenised), "
                        "which have no text field; leave --text-field out")


def build_cache(data: str | None, *, text_field: str = "text", progress: bool = True,
                workers: int | None = None) -> Path:
    """The prepared directory for `data`: the directory itself when it already holds token
    shards, else its cache directory, tokenised now unless an earlier run did. `text_field`:
    the JSONL field / Parquet column that holds each document's text."""
    if is_prepared(data):
        return Path(data)
    files = source_files(data)
    directory = cache_root() / cache_key(files, text_field=text_field)
    if not (directory / MANIFEST).is_file():
        try:
            prepare(files, directory, lenient=data is None, progress=progress, workers=workers,
                    text_field=text_field, description=BUILTIN if data is None else str(data),
                    force=directory.exists())
        except OSError:
            if not (directory / MANIFEST).is_file():  # else: lost a race to another writer
                raise  # the entry points' main_guard makes it one line
    return directory


def open_corpus(directory: Path, description: str | None = None) -> Corpus:
    """The shards of `directory`; an fgpt manifest's `ignore_id` (a restricted vocabulary's
    UNK, as the study writes it) is the id whose targets the loss leaves out."""
    train, val, info = open_shards(Path(directory))
    ignore_id = info.get("manifest", {}).get("ignore_id")
    return Corpus(train, val, Path(directory), description or info["source"], ignore_id=ignore_id)


def load_corpus(data: str | None = None, *, text_field: str = "text", progress: bool = True) -> Corpus:
    """The corpus of `data` (None = the built-in corpus): token shards are opened as they
    are; text, JSONL and Parquet sources are tokenised into the cache first (once)."""
    description = BUILTIN if data is None else str(data)
    return open_corpus(build_cache(data, text_field=text_field, progress=progress), description)


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """One-line error for a token id the model has no embedding for (one max per split,
    recorded in an fgpt manifest, else a single scan)."""
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        if len(tokens) and (top := int(tokens.max())) >= vocab_size:
            raise FgptError(f"--data {corpus.description}: the {split} split holds token id {top}, but "
                            f"the model's vocabulary has {vocab_size} ids (0..{vocab_size - 1})")


# --- batches --------------------------------------------------------------------------

def check_fits(tokens: np.ndarray, seq_len: int, batch_size: int, split: str) -> None:
    """One-line errors for data too small for a context, or for one batch of distinct tokens."""
    if len(tokens) < seq_len + 1:
        raise FgptError(f"the {split} split has {len(tokens)} tokens: too few for a context of "
                        f"{seq_len} (+1 target); use more data or a smaller --n-ctx")
    if len(tokens) < batch_size * seq_len + 1:
        raise FgptError(f"the {split} split has {len(tokens)} tokens: too few to fill a batch of "
                        f"{batch_size} x {seq_len}; use more data, or a smaller --batch-size / --n-ctx")


def window_starts(n_tokens: int, seq_len: int, batch_size: int, *, seed: int, step: int,
                  stream: int = _TRAIN_STREAM) -> np.ndarray:
    """The B window starts of a global batch: a pure function of (seed, stream, step)."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)  # [B]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
            ignore_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for each start: ([n, T], [n, T]) int64. Targets equal
    to `ignore_id` become -1, which the loss ignores."""
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # [n, T+1]
    rows = torch.from_numpy(rows)
    x, y = rows[:, :-1], rows[:, 1:]
    if ignore_id is not None:
        y = y.masked_fill(y == ignore_id, -1)
    return x, y


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    if batch_size % world_size:
        raise FgptError(f"batch size {batch_size} does not divide over {world_size} ranks")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def rank_batch(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, step: int,
               rank: int = 0, world_size: int = 1, stream: int = _TRAIN_STREAM, ignore_id: int | None = None):
    """This rank's contiguous slice of the global batch of `step`: ([B/W, T], [B/W, T])."""
    starts = window_starts(len(tokens), seq_len, batch_size, seed=seed, step=step, stream=stream)
    return windows(tokens, starts[rank_slice(batch_size, rank, world_size)], seq_len, ignore_id)


def eval_batch(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, index: int,
               rank: int = 0, world_size: int = 1, ignore_id: int | None = None):
    """The `index`-th fixed validation batch (the same at every evaluation)."""
    return rank_batch(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, step=index,
                      rank=rank, world_size=world_size, stream=_VAL_STREAM, ignore_id=ignore_id)


def micro_batches(x: torch.Tensor, y: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a rank's [b, T] slice into k equal micro-batches."""
    if x.shape[0] % k:
        raise FgptError(f"{x.shape[0]} sequences per rank do not split into {k} micro-batches")
    return list(zip(x.chunk(k), y.chunk(k)))
