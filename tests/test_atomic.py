"""fgpt.atomic: the target is the old file or the whole new one, never a half-written one,
and it gets the permissions of any new file (the umask's), not mkstemp's private 0600."""

import os
import stat

import pytest

from fgpt.atomic import UMASK, atomic_path, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_written_file_replaces_the_target_with_the_umasks_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert mode(target) == 0o666 & ~UMASK
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temporary left


def test_an_error_leaves_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_directory_target_appears_whole_with_the_umasks_permissions(tmp_path):
    target = tmp_path / "corpus"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        assert not target.exists()
    assert (target / "a.bin").read_bytes() == b"x"
    assert mode(target) == 0o777 & ~UMASK


def test_the_next_write_removes_a_dead_writers_temporaries_only(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "train_state.pt"
    killed = tmp_path / f".train_state.pt.{dead}.abc.tmp"  # what a killed writer leaves
    killed.write_bytes(b"half")
    killed_dir = tmp_path / f".train_state.pt.{dead}.def.tmp"
    killed_dir.mkdir()
    live = tmp_path / f".train_state.pt.{os.getpid()}.ghi.tmp"  # a writer still at work
    live.write_bytes(b"busy")
    other = tmp_path / f".model.safetensors.{dead}.jkl.tmp"  # another target's: not ours to judge
    other.write_bytes(b"x")
    atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train_state.pt", live.name, other.name])
