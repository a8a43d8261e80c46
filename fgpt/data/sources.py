"""Where documents come from, read lazily in chunks of about a megabyte.

    files = list_files("corpus/")                  # text, .jsonl, .jsonl.gz and .parquet files
    for chunk in read_chunks(files, text_field="text"):
        ...                                         # a Chunk: texts, or raw JSONL lines

A text file is one document; a JSONL line or a Parquet row is one document. Every document
has a stable name — a text file's path relative to the source (for a glob, to its leading
directory without glob characters), `<path without suffix>#<index>`
for a record (its 0-based line or row number) — and the train/val split is a hash of that
name, so it is the same on every machine, whatever the number of workers, and the same for
one corpus stored as .jsonl, .jsonl.gz or .parquet.

A text file larger than a chunk is cut only where the GPT-2 pre-tokeniser itself always
splits (a single space or newline between two non-space characters), so its pieces encode
to exactly the tokens of the whole file.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import re
import stat
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fgpt.errors import FgptError

CHUNK_BYTES = 1 << 20  # text per chunk: workers x a few chunks is the pipeline's memory
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIX = ".parquet"
PARQUET_EXTRA = "reading .parquet needs pyarrow: pip install 'fgpt[data]'"
# A lone space or newline between two non-space characters: every piece of the GPT-2
# pattern ends before such a character and none starts earlier and runs across it.
SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # relative to the source root: documents are named (and split) by it
    size: int
    mtime_ns: int = 0

    @property
    def kind(self) -> str:
        n = self.path.name
        if n.endswith(JSONL_SUFFIXES):
            return "jsonl"
        return "parquet" if n.endswith(PARQUET_SUFFIX) else "text"

    @property
    def stem(self) -> str:
        """The name without its format suffix: records are named `stem#index`."""
        for suffix in (*JSONL_SUFFIXES, PARQUET_SUFFIX):
            if self.name.endswith(suffix):
                return self.name[:-len(suffix)]
        return self.name


@dataclass
class Chunk:
    """Work for one tokeniser call. kind 'texts': `texts` are whole documents or pieces of
    one (`names[i]` names the document; `continues[i]`: piece i extends the previous
    chunk's last document). kind 'jsonl': `raw` holds whole lines of `file`, the first being
    line `first_line` (1-based)."""
    kind: str
    nbytes: int  # source bytes this chunk accounts for (for progress)
    texts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    continues: list[bool] = field(default_factory=list)
    raw: bytes = b""
    file: SourceFile | None = None
    first_line: int = 1


# --- listing ----------------------------------------------------------------------------

def list_files(spec: str, flag: str = "--data") -> list[SourceFile]:
    """The files named by `spec`: a file, a directory (every file below it, except hidden
    ones and those in hidden directories such as .git) or a glob, sorted by path. `flag`:
    the option that named it, for the errors."""
    if glob.has_magic(spec):
        paths, root = [Path(p) for p in glob.glob(spec, recursive=True)], _glob_root(spec)
        paths = [p for p in paths if p.is_file()]
    elif Path(spec).is_dir():
        root = Path(spec)
        paths = [p for p in root.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    elif Path(spec).is_file():
        paths, root = [Path(spec)], Path(spec).parent
    elif Path(spec).exists():  # a FIFO, a socket, a device: no size to plan by, maybe endless
        raise FgptError(f"{flag} {spec}: not a regular file ({_kind(Path(spec))}); give a file, "
                        "a directory or a glob")
    else:
        raise FgptError(f"{flag} {spec}: no such file or directory")
    if not paths:
        raise FgptError(f"{flag} {spec}: matches no files")
    return [_source_file(p, p.relative_to(root).as_posix()) for p in sorted(paths)]


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "not a file")


def _glob_root(spec: str) -> Path:
    """The directory a glob's matches are named relative to: its leading components without
    glob characters, so `owt/*.jsonl`, `./owt/*.jsonl` and `/abs/owt/*.jsonl` name (and
    split) the same files alike."""
    parts = Path(spec).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed])


def stdlib_files() -> list[SourceFile]:
    """The built-in corpus: every .py file of this Python's standard library (not
    site-packages), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [_source_file(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.py"))
            if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]


def _source_file(path: Path, name: str) -> SourceFile:
    try:
        st = path.stat()
    except OSError as e:
        raise FgptError(f"cannot read {path}: {e.strerror}") from None
    return SourceFile(path, name, st.st_size, st.st_mtime_ns)


# --- reading ----------------------------------------------------------------------------

def read_chunks(files: list[SourceFile], *, text_field: str = "text", lenient: bool = False,
                chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """Chunks of about `chunk_bytes` in file order. Small text files share a chunk; large
    ones are cut at safe points. `lenient` (the built-in corpus) skips text files that are
    not UTF-8 instead of failing: a few stdlib test files are deliberately not."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    batch = Chunk("texts", 0)
    for f in files:
        if f.kind == "text" and (f.size <= chunk_bytes or lenient):
            text = _whole_text(f, lenient)
            if text is not None:
                batch.texts.append(text), batch.names.append(f.name), batch.continues.append(False)
            batch.nbytes += f.size
            if batch.nbytes >= chunk_bytes:
                yield batch
                batch = Chunk("texts", 0)
            continue
        if batch.nbytes:
            yield batch
            batch = Chunk("texts", 0)
        if f.kind == "text":
            yield from _text_pieces(f, chunk_bytes)
        elif f.kind == "jsonl":
            yield from _jsonl_chunks(f, chunk_bytes)
        else:
            yield from _parquet_chunks(f, text_field)
    if batch.nbytes:
        yield batch


def read_text(path: Path) -> str:
    """A whole file as UTF-8 text (a leading byte-order mark dropped); FgptError for a binary
    (a NUL byte) or non-UTF-8 file, naming UTF-16 where that is what it is."""
    raw = _read_bytes(path)
    if b"\0" in raw:
        raise _not_text(path, raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = " (it starts with a UTF-16 byte-order mark)" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise FgptError(f"{path} is not UTF-8 text (byte {e.start}){bom}") from None


BOM = "\ufeff"  # UTF-8's byte-order mark: Windows tools start text files with it; dropped


def _not_text(path: Path, head: bytes) -> FgptError:
    """The error for a file with NUL bytes: UTF-16 / UTF-32 text (by its byte-order mark, or
    NULs at every other byte of ASCII-range text) is named, since converting it is the fix."""
    if head.startswith((b"\xff\xfe\0\0", b"\0\0\xfe\xff")):
        encoding = "UTF-32"
    elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "UTF-16"
    else:
        sample = head[:4096]
        even, odd = sample[0::2], sample[1::2]
        encoding = "UTF-16" if len(sample) >= 4 and (even.count(0) > 0.9 * len(even) or
                                                      odd.count(0) > 0.9 * len(odd)) else None
    if encoding:
        return FgptError(f"{path} is {encoding} text; fgpt reads UTF-8: convert it first "
                         f"(iconv -f {encoding} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})")
    hint = " (for token shards, give the directory that holds them)" if path.suffix == ".bin" else ""
    return FgptError(f"{path} is a binary file, not text{hint}")


def _whole_text(f: SourceFile, lenient: bool) -> str | None:
    try:
        return read_text(f.path)
    except FgptError:
        if lenient:
            return None
        raise


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FgptError(f"cannot read {path}: {e.strerror}") from None


def _text_pieces(f: SourceFile, chunk_bytes: int) -> Iterator[Chunk]:
    """One large text file as pieces cut at safe points, each about `chunk_bytes`."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # drops a leading byte-order mark
    pending, offset, unreported, first = "", 0, 0, True
    with open(f.path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if b"\0" in block:
                raise _not_text(f.path, block if offset == 0 else b"")
            try:
                pending += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise FgptError(f"{f.path} is not UTF-8 text (byte {offset + e.start})") from None
            offset, unreported = offset + len(block), unreported + len(block)
            cut = len(pending) if not block else _last_safe_cut(pending)
            if cut or (not block and first):  # (an empty file is still a document)
                yield Chunk("texts", unreported, [pending[:cut]], [f.name], [not first])
                pending, unreported, first = pending[cut:], 0, False
            if not block:
                return


def _last_safe_cut(text: str, window: int = 1 << 16) -> int:
    """The position of the last safe cut in `text` (0 if none)."""
    start = len(text)
    while start > 0:
        start = max(0, start - window)
        cuts = list(SAFE_CUT.finditer(text, start))
        if cuts:
            return cuts[-1].start()
    return 0


def _jsonl_chunks(f: SourceFile, chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines of a .jsonl / .jsonl.gz file, about `chunk_bytes` of them per chunk."""
    gz = f.path.name.endswith(".gz")
    line, tail = 1, b""
    try:
        with (gzip.open(f.path, "rb") if gz else open(f.path, "rb")) as fh:
            raw_fh = fh.fileobj if gz else fh  # progress in bytes of the file on disk
            done = 0
            while True:
                block = fh.read(chunk_bytes)
                data = tail + block
                end = len(data) if not block else data.rfind(b"\n") + 1
                if end or not block:
                    now = raw_fh.tell()
                    yield Chunk("jsonl", now - done, raw=data[:end], file=f, first_line=line)
                    line += data.count(b"\n", 0, end)
                    done, tail = now, data[end:]
                else:
                    tail = data  # one line longer than a chunk: keep reading
                if not block:
                    return
    except (OSError, EOFError, zlib.error) as e:
        raise FgptError(f"{f.path}: cannot read it ({e})") from None


def _parquet_chunks(f: SourceFile, text_field: str, rows_per_chunk: int = 1024) -> Iterator[Chunk]:
    """The `text_field` column of a Parquet file, `rows_per_chunk` rows at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FgptError(PARQUET_EXTRA) from None
    try:
        pf = pq.ParquetFile(f.path)
    except (OSError, pa.ArrowException) as e:
        raise FgptError(f"{f.path} is not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise FgptError(f"{f.path} has no column '{text_field}' (its columns: "
                        f"{', '.join(schema.names)}); choose one with --text-field")
    if not (pa.types.is_string(schema.field(text_field).type)
            or pa.types.is_large_string(schema.field(text_field).type)):
        raise FgptError(f"{f.path}: column '{text_field}' holds {schema.field(text_field).type}, not text")
    row = 0
    per_row = f.size / max(1, pf.metadata.num_rows)
    try:
        for batch in pf.iter_batches(batch_size=rows_per_chunk, columns=[text_field]):
            texts = batch.column(0).to_pylist()
            for i, t in enumerate(texts):
                if t is None:
                    raise FgptError(f"{f.path} row {row + i}: '{text_field}' is null")
            yield Chunk("texts", round(per_row * len(texts)), texts,
                        [f"{f.stem}#{row + i}" for i in range(len(texts))], [False] * len(texts))
            row += len(texts)
    except (OSError, pa.ArrowException) as e:
        raise FgptError(f"{f.path} is not a readable Parquet file ({e})") from None
