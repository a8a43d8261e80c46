"""The two rules for every directory an entry point writes (run.prepare, run.convert,
run.train, the study): it never touches an input, and it has one writer at a time.

    check_not_source("--out", out, {"--data": data, "--init-from": ckpt})   # before anything
    with exclusive(out / LOCK_FILE):                                         # for the whole run
        ...

`exclusive` is an OS file lock (`fcntl.flock`): the kernel drops it when its holder dies,
however it dies, so a SIGKILL leaves no stale lock to clean by hand. The holder writes its
pid into the file, and a second writer is refused naming it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from fgpt.errors import FgptError

LOCK_FILE = ".fgpt.lock"
LOCK_ENV = "FGPT_HELD_LOCK"  # a launcher's lock, held for the ranks it starts


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _source_paths(spec: str) -> list[Path]:
    """What a source spec names: the path itself, or every match of a glob."""
    if glob.has_magic(spec) and not Path(spec).exists():
        return [_real(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
    return [_real(spec)]


def check_not_source(out_flag: str, out: str | os.PathLike, sources: Mapping[str, str | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the `sources` ({flag: path,
    directory or glob}; None: not given), whatever --force says: writing it would replace
    or mix into an input. Paths are compared resolved (symlinks, `..`, relative spellings)."""
    target = _real(out)
    for flag, spec in sources.items():
        if not spec:
            continue
        for source in _source_paths(str(spec)):
            if target == source:
                why = "is"
            elif target in source.parents:
                why = "contains"
            elif source in target.parents:
                why = "lies inside"
            else:
                continue
            raise FgptError(f"{out_flag} {out} {why} the input {flag} {spec}: writing it would "
                            f"{'mix into' if why == 'lies inside' else 'replace'} the input; "
                            f"give another {out_flag}")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextmanager
def exclusive(lock: str | os.PathLike, *, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (made, with its directory, if missing) until
    the block ends; refuse with an FgptError naming the holder's pid when another process
    holds it. `what` names the locked thing in that error (default: the lock's directory).
    The lock file is removed on a clean release; the directory too if this made it and it
    is left empty. Nested use in one process, and a launcher's lock handed to its children
    through the environment (`LOCK_ENV`), count as held."""
    lock = Path(os.path.abspath(lock))
    what = what or str(lock.parent)
    key = str(_real(lock.parent) / lock.name)
    if os.environ.get(LOCK_ENV) == key:
        yield
        return
    made_dir = not lock.parent.exists()
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:  # retry if the file we locked was unlinked by a releasing holder meanwhile
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FgptError(f"{what} is being written by {_holder(lock)} (it holds {lock}); wait for "
                            "it to finish, or give another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.environ.get(LOCK_ENV)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.environ[LOCK_ENV] = key
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous
        lock.unlink(missing_ok=True)  # while still held: a waiter that opened it retries
        os.close(fd)
        if made_dir:
            try:
                lock.parent.rmdir()  # only if empty: the run wrote nothing
            except OSError:
                pass
