"""Token shards on disk, read as one virtual stream per split.

Three layouts are understood:
- fgpt's own prepared directory (`python -m run.prepare`): raw `train_000000.bin`,
  `val_000000.bin`, ... (uint16, or uint32 for a vocabulary past 65536 ids) described by
  `manifest.json` (tokens per shard, dtype, tokenizer, source, sha256 digests);
- nanoGPT's `train.bin` + `val.bin`: raw uint16, nothing else;
- llm.c's `*_train_*.bin` / `*_val_*.bin`: a header of 256 int32 (magic 20240520, version,
  token count), then the tokens (version 1: uint16 GPT-2 ids; version 2: uint32).

    train, val, info = open_shards(Path("fineweb10B"))   # TokenStreams, or raises FgptError
    len(train); train[a:b]                               # np.ndarray of the tokens a..b-1

A TokenStream reads the bytes it is asked for with `pread` rather than memory-mapping its
files: a mapped page stays in the process's resident set once touched, so random training
windows over a memmap grow RSS toward the corpus size, while `pread` leaves them to the
kernel's page cache (`just bench data` measures both).
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgpt.atomic import file_sha256
from fgpt.errors import FgptError

MANIFEST = "manifest.json"
FORMAT = "fgpt-shards-v2"  # bump when the shard layout changes: it is part of the cache key
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
LLMC_MAGIC = 20240520
LLMC_HEADER = 256 * 4  # bytes: 256 int32
LLMC_DTYPES = {1: np.uint16, 2: np.uint32}  # llm.c header version -> token dtype
_READ_BLOCK = 1 << 24  # tokens per read when scanning a whole stream


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    offset: int = 0  # bytes before the first token (llm.c's header)


class TokenStream:
    """Shards concatenated into one read-only token array: `len()`, `stream[a:b]` (a new
    np.ndarray, reading across shard boundaries), `stream[i]`, iteration, `np.asarray(stream)`
    (the whole stream in memory: for small corpora) and `max()`."""

    def __init__(self, shards: list[Shard], dtype, *, max_token: int | None = None):
        self.shards = [s for s in shards if s.tokens]
        self.dtype = np.dtype(dtype)
        self._starts = np.cumsum([0] + [s.tokens for s in self.shards]).tolist()  # [n+1]
        self._max = max_token

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} {self.dtype} tokens in {len(self.shards)} shards)"

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("TokenStream slices take no step")
            return self._read(start, max(start, stop))
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} of a stream of {len(self)}")
        return self._read(i, i + 1)[0]

    def __iter__(self):
        for a in range(0, len(self), _READ_BLOCK):
            yield from self._read(a, min(a + _READ_BLOCK, len(self)))

    def __array__(self, dtype=None, copy=None):
        out = self._read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def max(self) -> int:
        """The largest token id (from the manifest when it recorded one, else one scan)."""
        if self._max is None:
            self._max = max((int(self._read(a, min(a + _READ_BLOCK, len(self))).max())
                             for a in range(0, len(self), _READ_BLOCK)), default=0)
        return self._max

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, self.dtype)
        i = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            shard, base = self.shards[i], self._starts[i]
            n = min(stop, base + shard.tokens) - pos
            _pread_into(shard.path, out[pos - start:pos - start + n],
                        shard.offset + (pos - base) * self.dtype.itemsize)
            pos, i = pos + n, i + 1
        return out


def _pread_into(path: Path, out: np.ndarray, offset: int) -> None:
    view, done = memoryview(out).cast("B"), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise FgptError(f"{path} ended early: it was truncated after it was opened")
            done += n
    finally:
        os.close(fd)


# --- opening a directory ----------------------------------------------------------------

def layout(directory: Path) -> str | None:
    """'fgpt', 'nanogpt' or 'llmc' for a directory of token shards; None for anything else."""
    if not directory.is_dir():
        return None
    if (directory / MANIFEST).is_file():
        return "fgpt"
    if (directory / "train.bin").is_file():
        return "nanogpt"
    if _llmc_files(directory, "train"):
        return "llmc"
    return None


def open_shards(directory: Path) -> tuple[TokenStream, TokenStream, dict]:
    """(train, val, info) for a directory `layout` recognises; info has at least 'layout'
    and 'source'. Every inconsistency between files and headers / manifest is an FgptError."""
    kind = layout(directory)
    if kind == "fgpt":
        return _open_fgpt(directory)
    if kind == "nanogpt":
        return _open_nanogpt(directory)
    if kind == "llmc":
        return _open_llmc(directory)
    raise FgptError(f"{directory} holds no token shards (manifest.json, train.bin or *_train_*.bin)")


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        fmt = manifest["format"]
        entries = [e for s in ("train", "val") for e in manifest["splits"][s]["shards"]]
        well_formed = all(isinstance(e["file"], str) and isinstance(e["tokens"], int) and e["tokens"] >= 0
                          for e in entries)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FgptError(f"{path} is not an fgpt manifest ({type(e).__name__}: {e})") from None
    if fmt != FORMAT:
        raise FgptError(f"{path} has format {fmt!r}, not {FORMAT!r}: prepare it again with "
                        f"python -m run.prepare")
    if not well_formed:
        raise FgptError(f"{path}: every shard entry needs a file name and a token count")
    if manifest.get("dtype") not in DTYPES:
        raise FgptError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    return manifest


def _open_fgpt(directory: Path) -> tuple[TokenStream, TokenStream, dict]:
    manifest = read_manifest(directory)
    dtype = np.dtype(DTYPES[manifest["dtype"]])
    streams = []
    for split in ("train", "val"):
        shards = []
        for entry in manifest["splits"][split]["shards"]:
            path = directory / entry["file"]
            size = _size(path)
            if size != entry["tokens"] * dtype.itemsize:
                raise FgptError(f"{path} holds {size} bytes, but the manifest lists {entry['tokens']} "
                                f"{dtype.name} tokens ({entry['tokens'] * dtype.itemsize} bytes)")
            shards.append(Shard(path, entry["tokens"]))
        streams.append(TokenStream(shards, dtype, max_token=manifest.get("max_token")))
    return streams[0], streams[1], {"layout": "fgpt", "source": manifest.get("source", str(directory)),
                                    "manifest": manifest}


def _open_nanogpt(directory: Path) -> tuple[TokenStream, TokenStream, dict]:
    streams = []
    for name in ("train.bin", "val.bin"):
        path = directory / name
        if not path.is_file():
            raise FgptError(f"{directory} has train.bin but no {name} (nanoGPT's layout has both)")
        size = _size(path)
        if size % 2:
            raise FgptError(f"{path} holds {size} bytes: not a whole number of uint16 tokens")
        streams.append(TokenStream([Shard(path, size // 2)], np.uint16))
    return streams[0], streams[1], {"layout": "nanogpt", "source": str(directory)}


def _llmc_files(directory: Path, split: str) -> list[Path]:
    pattern = re.compile(rf".*_{split}(_\d+)?\.bin")
    return sorted(p for p in directory.iterdir() if p.is_file() and pattern.fullmatch(p.name))


def _open_llmc(directory: Path) -> tuple[TokenStream, TokenStream, dict]:
    streams = []
    for split in ("train", "val"):
        shards, dtypes = [], set()
        for path in _llmc_files(directory, split):
            shard, dtype = _llmc_shard(path)
            shards.append(shard)
            dtypes.add(dtype)
        if len(dtypes) > 1:
            raise FgptError(f"{directory}: the llm.c shards mix header versions (token dtypes)")
        streams.append((shards, dtypes.pop() if dtypes else np.uint16))
    (train, dt_train), (val, dt_val) = streams
    if val and dt_val != dt_train:
        raise FgptError(f"{directory}: the train and val shards hold different token dtypes")
    return (TokenStream(train, dt_train), TokenStream(val, dt_train),
            {"layout": "llmc", "source": str(directory)})


def _llmc_shard(path: Path) -> tuple[Shard, np.dtype]:
    with open(path, "rb") as f:
        raw = f.read(LLMC_HEADER)
    if len(raw) < LLMC_HEADER:
        raise FgptError(f"{path} holds {len(raw)} bytes: too short for llm.c's 1024-byte header")
    magic, version, n_tokens = np.frombuffer(raw, np.int32, 3).tolist()
    if magic != LLMC_MAGIC:
        raise FgptError(f"{path}: bad magic {magic} (an llm.c shard starts with {LLMC_MAGIC})")
    if version not in LLMC_DTYPES:
        raise FgptError(f"{path}: llm.c header version {version} is not 1 (uint16) or 2 (uint32)")
    dtype = np.dtype(LLMC_DTYPES[version])
    size, expected = _size(path), LLMC_HEADER + n_tokens * dtype.itemsize
    if size != expected:
        raise FgptError(f"{path}: the header says {n_tokens} tokens ({expected} bytes with the "
                        f"header) but the file holds {size} bytes")
    return Shard(path, n_tokens, LLMC_HEADER), dtype


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise FgptError(f"cannot read shard {path}: {e.strerror}") from None


# --- writing ----------------------------------------------------------------------------

class ShardWriter:
    """Appends one split's tokens to numbered raw shards of at most `shard_tokens` tokens.
    Documents are separated by <|endoftext|>: doc0 EOT doc1 EOT ... docN."""

    def __init__(self, directory: Path, split: str, dtype, *, shard_tokens: int):
        self.directory, self.split = directory, split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.tokens = self.documents = 0
        self.max_token = -1
        self._file, self._in_shard, self._index = None, 0, 0

    def add(self, tokens: np.ndarray, documents: int, starts_with_separator: bool) -> None:
        """Append `tokens` holding `documents` new documents, each after an EOT; the very
        first document of the split gets no separator."""
        if starts_with_separator and self.documents == 0:
            tokens = tokens[1:]
        self.documents += documents
        if len(tokens):
            self.max_token = max(self.max_token, int(tokens.max()))
            self._append(tokens.astype(self.dtype, copy=False))

    def _append(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._file = open(self.directory / shard_name(self.split, self._index), "wb")
            room = self.shard_tokens - self._in_shard
            self._file.write(tokens[:room].tobytes())
            self._in_shard += min(room, len(tokens))
            self.tokens += min(room, len(tokens))
            tokens = tokens[room:]
            if self._in_shard == self.shard_tokens:
                self.close()
                self._index, self._in_shard = self._index + 1, 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def split_files(directory: Path, split: str) -> list[Path]:
    return sorted(directory.glob(f"{split}_[0-9]*.bin"))


def shard_entries(directory: Path, split: str, dtype) -> list[dict]:
    """The manifest's record of a split's shard files as they are on disk now."""
    itemsize = np.dtype(dtype).itemsize
    return [{"file": p.name, "tokens": p.stat().st_size // itemsize, "sha256": file_sha256(p)}
            for p in split_files(directory, split)]
