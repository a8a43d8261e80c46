"""Corpora -> token shards (uint16 memmaps, cached) -> batches, rank-aware.

    corpus = load_corpus(None)                         # the built-in corpus (Python's stdlib)
    x, y = rank_batch(corpus.train, seq_len=256, batch_size=32, seed=0, step=s,
                      rank=r, world_size=W)            # [B/W, T] int64 each

A source is tokenised once, with <|endoftext|> between documents, into `train.bin` /
`val.bin` under a cache directory named by a hash of the source's content, so the next run
reuses it. The *global* batch of step s is a pure function of (seed, s): every rank draws the
same window starts and keeps its contiguous slice, so any world size trains on the same
batches, and resuming needs only the step number.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fgpt.atomic import atomic_path
from fgpt.errors import FgptError
from fgpt.tokenizer import EOT, gpt2_encoding

VAL_PERCENT = 10  # share of documents (or, for one document, of tokens) held out for eval
FORMAT = "fgpt-data-v1"  # part of the cache key: bump when the shard layout changes
_TRAIN_STREAM, _VAL_STREAM = 0, 1  # separate random streams for train and eval windows
EVAL_SEED = 0  # validation windows are drawn with this seed whatever the training seed


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the source root: the split is decided by its hash
    text: str


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint16 token ids (a read-only memmap)
    val: np.ndarray
    cache_dir: Path | None
    description: str
    ignore_id: int | None = None  # targets equal to this id are left out of the loss (-1)


# --- sources ---------------------------------------------------------------------------

def stdlib_documents() -> list[Document]:
    """The built-in corpus: every UTF-8 .py file of this Python's standard library (not
    site-packages), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        try:
            docs.append(Document(rel.as_posix(), path.read_bytes().decode("utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are deliberately not UTF-8
    return docs


def user_documents(spec: str) -> list[Document]:
    """Text files named by `spec`: a file, a directory (all files below it) or a glob."""
    if any(ch in spec for ch in "*?["):
        paths, root = [Path(p) for p in glob.glob(spec, recursive=True)], None
        paths = [p for p in paths if p.is_file()]
    elif Path(spec).is_dir():
        root = Path(spec)
        paths = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    elif Path(spec).is_file():
        paths, root = [Path(spec)], Path(spec).parent
    else:
        raise FgptError(f"--data {spec}: no such file or directory")
    if not paths:
        raise FgptError(f"--data {spec}: matches no files")
    docs = []
    for path in sorted(paths):
        raw = path.read_bytes()
        if b"\0" in raw:
            raise FgptError(f"--data: {path} is a binary file, not text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FgptError(f"--data: {path} is not UTF-8 text") from None
        name = path.relative_to(root).as_posix() if root else path.as_posix()
        docs.append(Document(name, text))
    if not any(d.text.strip() for d in docs):
        raise FgptError(f"--data {spec}: the files hold no text")
    return docs


def is_val(name: str) -> bool:
    """Stable across machines and runs: a hash of the document's relative path."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100 < VAL_PERCENT


# --- tokenising and caching -------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("FGPT_CACHE", Path.home() / ".cache" / "fgpt")) / "data"


def content_key(docs: list[Document]) -> str:
    h = hashlib.sha256(f"{FORMAT}:{VAL_PERCENT}".encode())
    for d in docs:
        h.update(hashlib.sha256(d.name.encode()).digest())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:24]


def _join(token_lists: list[list[int]]) -> np.ndarray:
    """Documents separated by <|endoftext|>: doc0 EOT doc1 EOT ... docN."""
    out = []
    for i, toks in enumerate(token_lists):
        if i:
            out.append(EOT)
        out.extend(toks)
    return np.asarray(out, dtype=np.uint16)


def tokenise(docs: list[Document], *, progress: bool = True, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays. Documents go to val by the hash of their name; if that
    leaves one side empty (e.g. a single file), the last VAL_PERCENT% of tokens is val."""
    enc = gpt2_encoding()
    tokens: list[list[int]] = []
    with tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True,
              desc="tokenising", disable=not progress) as bar:
        for i in range(0, len(docs), chunk):
            batch = [d.text for d in docs[i:i + chunk]]
            tokens += enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1)
            bar.update(sum(map(len, batch)))
    val_mask = [is_val(d.name) for d in docs]
    if all(val_mask) or not any(val_mask):
        stream = _join(tokens)
        cut = len(stream) - len(stream) * VAL_PERCENT // 100
        return stream[:cut], stream[cut:]
    train = _join([t for t, v in zip(tokens, val_mask) if not v])
    val = _join([t for t, v in zip(tokens, val_mask) if v])
    return train, val


def _write_shards(directory: Path, train: np.ndarray, val: np.ndarray, description: str) -> None:
    """Write into a temp directory, then rename it into place: readers never see half a cache."""
    try:
        with atomic_path(directory, directory=True) as tmp:
            train.tofile(tmp / "train.bin")
            val.tofile(tmp / "val.bin")
            meta = {"format": FORMAT, "source": description, "train_tokens": len(train), "val_tokens": len(val)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError:
        if not (directory / "meta.json").exists():  # lost a race to another writer: fine
            raise


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def documents(data: str | None) -> list[Document]:
    """The documents of `data` (None = the built-in corpus); bad input raises FgptError."""
    return stdlib_documents() if data is None else user_documents(data)


def cache_dir_for(docs: list[Document]) -> Path:
    return cache_root() / content_key(docs)


def build_cache(docs: list[Document], description: str, *, progress: bool = True) -> Path:
    """Tokenise into the cache unless an earlier run already did."""
    directory = cache_dir_for(docs)
    if not (directory / "meta.json").exists():
        train, val = tokenise(docs, progress=progress)
        _write_shards(directory, train, val, description)
    return directory


def open_corpus(directory: Path, description: str) -> Corpus:
    return Corpus(_memmap(directory / "train.bin"), _memmap(directory / "val.bin"), directory, description)


def load_corpus(data: str | None = None, *, progress: bool = True) -> Corpus:
    """Tokenise `data` (None = the built-in corpus) into cached shards, or reuse them."""
    description = "python stdlib" if data is None else str(data)
    return open_corpus(build_cache(documents(data), description, progress=progress), description)


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
