"""The one way fgpt writes a file or directory that a reader (or a crash) must never see
half-written: build it under a temporary name beside the target, then rename it into place.

    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, tmp)

A rename within one directory is atomic on POSIX filesystems, so the target is either the
old file or the complete new one. A file's bytes are flushed to disk (fsync) before the
rename and the directory after it, so this holds across a power loss too, not only a
crash of the process. On any error the temporary file or directory is removed and the
target is left as it was. The result gets the permissions any new file would get (the
umask's), not mkstemp's private ones. The temporary's name carries its writer's pid, so
the next write to the same target removes what a killed writer left (a half checkpoint, a
half-prepared corpus) and nothing of a writer still alive.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

UMASK = os.umask(0o022)  # read once at import (setting it is process-wide, so never later,
os.umask(UMASK)          # when other threads may be creating files)


@contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target` (an empty directory when `directory`);
    when the block ends without an error it replaces `target` in one rename.

    A directory target must not exist yet (POSIX cannot rename over a non-empty directory):
    the rename then raises FileExistsError / OSError, which callers treat as a lost race."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    prefix = f".{target.name}.{os.getpid()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if tmp.is_dir():
            os.chmod(tmp, 0o777 & ~UMASK)
        else:
            os.chmod(tmp, 0o666 & ~UMASK)
            _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        _remove(tmp)


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries beside `target` whose writer process no longer exists."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB blocks: what checks that a written file is
    the one a record names (a checkpoint's weights, a shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def json_safe(x):
    """x with every NaN or infinite float as None, through dicts, lists and tuples: what
    strict JSON can hold (results files are read by other programs too)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
