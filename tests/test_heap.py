"""fgpt.heap: where glibc puts a large tensor and whether its memory stays for reuse, read
back from glibc's own accounting (mallinfo2: bytes in blocks with their own mapping, free
bytes held in the heap) and the resident set, so the tests depend on no page size or timing.
Each case runs in a fresh process: a heap that earlier tests left holding a large free block
would serve the tensor from it whatever the setting."""

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fgpt.errors import FgptError
from fgpt.training.train import train
from train_case import tiny_run

ROOT = Path(__file__).resolve().parents[1]

try:
    ctypes.CDLL("libc.so.6").mallinfo2
    GLIBC = True
except (OSError, AttributeError):
    GLIBC = False
pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc >= 2.33 only (mallinfo2)")

PRELUDE = """
import ctypes, json, sys
import torch
from fgpt import heap
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
info = ctypes.CDLL("libc.so.6").mallinfo2
info.restype = MallInfo2
MiB = 2 ** 20
"""


def child(body: str, *args: str) -> dict:
    """Run PRELUDE + body in a fresh Python; body prints one JSON object."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_memory_serves_large_tensors_from_the_heap_and_holds_them_when_freed():
    got = child("""
assert heap.keep_freed_memory()
mapped = info().hblkhd
x = torch.ones(64 * MiB // 4)
own_mapping = info().hblkhd > mapped
del x
held = info().fordblks
size = info().arena
y = torch.ones(32 * MiB // 4)  # the next step's tensor reuses the freed memory
print(json.dumps({"own_mapping": own_mapping, "held_mib": held / MiB, "heap_grew": info().arena > size}))
""")
    assert not got["own_mapping"] and not got["heap_grew"]
    assert got["held_mib"] >= 64  # freed, kept for the next step, not trimmed


def test_released_memory_goes_back_to_the_os():
    got = child("""
from fgpt.measure import status_bytes
heap.keep_freed_memory()
x = torch.ones(64 * MiB // 4)
del x  # held in the heap, resident
resident = status_bytes("VmRSS")
heap.release_freed_memory()
print(json.dumps({"shrunk_mib": (resident - status_bytes("VmRSS")) / MiB}))
""")
    assert got["shrunk_mib"] >= 60


@pytest.mark.slow  # two fresh processes that import torch and train
@pytest.mark.parametrize("setting", ["kept", "glibc"])
def test_the_training_loop_keeps_freed_memory_unless_told_not_to(text_file, setting):
    got = child("""
from fgpt.training.train import train
sys.path.insert(0, "tests")
from train_case import tiny_run
train(tiny_run(sys.argv[1], steps=1, heap=sys.argv[2]))
mapped = info().hblkhd
x = torch.ones(256 * MiB // 4)  # over glibc's largest dynamic threshold (32 MiB), and any block a tiny run freed
print(json.dumps({"own_mapping": info().hblkhd > mapped}))
""", str(text_file), setting)
    assert got["own_mapping"] == (setting == "glibc")


def test_an_unknown_heap_is_a_one_line_error(text_file):
    with pytest.raises(FgptError, match="--heap must be one of kept, glibc"):
        train(tiny_run(text_file, heap="jemalloc"))
