"""The one way fgpt writes a file or directory that a reader (or a crash) must never see
half-written: build it under a temporary name beside the target, then rename it into place.

    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, tmp)

A rename within one directory is atomic on POSIX filesystems, so the target is either the
old file or the complete new one. On any error the temporary file or directory is removed
and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target` (an empty directory when `directory`);
    when the block ends without an error it replaces `target` in one rename.

    A directory target must not exist yet (POSIX cannot rename over a non-empty directory):
    the rename then raises FileExistsError / OSError, which callers treat as a lost race."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
