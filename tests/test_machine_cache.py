"""Per-machine measurements kept across processes: a choice measured once, a rate whose
fastest measurement is kept, and the MFU yardstick that reads the latter."""

import json
import multiprocessing

import pytest
import torch

from fgpt import machine_cache
from fgpt.training import metrics


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path))
    return tmp_path / "measured.json"


def kept(cache) -> dict:
    return json.loads(cache.read_text())[machine_cache.machine()]


def test_fastest_seen_keeps_the_fastest_rate(cache):
    assert machine_cache.fastest_seen("rate", 100.0) == 100.0
    assert machine_cache.fastest_seen("rate", 40.0) == 100.0  # a slow moment: the kept rate answers
    assert kept(cache)["rate"] == 100.0
    assert machine_cache.fastest_seen("rate", 130.0) == 130.0  # a faster one replaces it
    assert kept(cache)["rate"] == 130.0


def test_measured_once_measures_once(cache):
    calls = []

    def measure():
        calls.append(1)
        return "b"
    assert machine_cache.measured_once("things", "key", measure, ("a", "b")) == "b"
    assert machine_cache.measured_once("things", "key", measure, ("a", "b")) == "b"
    assert len(calls) == 1
    # a cached value that is no longer a choice is measured over
    assert machine_cache.measured_once("things", "key", lambda: "c", ("c",)) == "c"
    assert kept(cache)["key"] == "c"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": "text"}'])
def test_an_unreadable_cache_is_measured_over(cache, content):
    cache.write_text(content.replace("%s", machine_cache.machine()))
    assert machine_cache.fastest_seen("rate", 7.0) == 7.0
    assert kept(cache) == {"rate": 7.0}


def _keep_rates(prefix: str) -> None:
    for i in range(20):
        machine_cache.fastest_seen(f"{prefix} {i}", float(i))


def test_processes_writing_at_once_keep_every_entry(cache):
    """Each write reads the file afresh under a lock: no process drops another's entries."""
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_keep_rates, args=(f"p{n}",)) for n in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert len(kept(cache)) == 60


def test_an_unwritable_cache_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("FGPT_CACHE", str(blocker / "below a file"))
    assert machine_cache.fastest_seen("rate", 5.0) == 5.0


def test_mfu_yardstick_is_not_lowered_by_a_slow_start_up(cache, monkeypatch):
    """A run whose start-up matmul ran at half speed measures MFU against the rate an
    earlier run measured on this machine, not against its own slow one."""
    rates = iter([400e9, 200e9])
    monkeypatch.setattr(metrics, "matmul_flops", lambda device, dtype, n: next(rates))
    answers = []
    for _ in range(2):  # two runs: each process measures once
        metrics.measured_flops.cache_clear()
        answers.append(metrics.peak_flops("cpu", torch.bfloat16))
    metrics.measured_flops.cache_clear()
    assert answers == [400e9, 400e9]
