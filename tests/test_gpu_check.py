"""`just gpu-check` on a machine without CUDA: the one-line answer, and the rehearsal that
runs every check's code on the CPU at toy sizes (so a broken check fails here, in CI, and
not on a lent GPU)."""

import pytest
import torch

from run.bench import gpu_check


def table_rows(out: str) -> dict[str, tuple[str, str]]:
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return {name: (status, detail) for name, status, detail in rows[1:]}  # past the header


def test_without_cuda_it_says_so_in_one_line_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no CUDA device on this machine")


@pytest.mark.slow  # every check at toy sizes, strategies on gloo x2
def test_the_rehearsal_runs_every_check_on_the_cpu(capsys, monkeypatch):
    # one strategy of three keeps the test short; the others differ only in their --strategy
    monkeypatch.setattr(gpu_check, "STRATEGIES", ("custom-fsdp",))
    code = gpu_check.main(["--rehearse", "--no-compile"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert code == 0 and not [name for name, (status, _) in rows.items() if status == "FAIL"], out
    status, detail = rows["CUDA tests (tests/test_cuda.py)"]
    assert status == "skipped" and " skipped" in detail and "failed" not in detail  # no CUDA here: all skip
    for strategy in gpu_check.STRATEGIES:
        status, detail = rows[f"{strategy} on gloo x2 vs single"]
        assert status == "ok" and detail.startswith("6 steps"), detail
    train = {name.split(": ", 1)[1]: status for name, (status, _) in rows.items() if name.startswith("train ")}
    assert train == {"transformers fp32": "ok", "fgpt fp32": "ok", "fgpt fp32, window 16, band kernel": "ok",
                     "fgpt fp32, window 16, flex kernel": "skipped"}
    assert "MFU" in rows["train tiny fp32 2x64: fgpt fp32"][1]
    decode = [name for name, (status, _) in rows.items() if name.startswith("decode ") and status == "ok"]
    assert {"decode tiny batch 1: fgpt float32", "decode tiny batch 1: transformers float32",
            "decode tiny batch 1: fgpt int8"} <= set(decode)


@pytest.mark.parametrize("cuda, code, last, status", [
    (True, 0, "12 passed in 30.1s", "ok"),
    (True, 0, "12 skipped in 1.0s", "FAIL"),  # a GPU where every CUDA test skipped: not a pass
    (False, 0, "12 skipped in 1.0s", "skipped"),  # the rehearsal: nothing could run
    (True, 1, "1 failed, 11 passed in 30.1s", "FAIL"),
])
def test_the_cuda_tests_row_says_what_ran(cuda, code, last, status, monkeypatch):
    import subprocess
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(gpu_check, "run_group",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, code, f"..\n{last}\n", ""))
    budget = gpu_check.Budget(480)
    assert gpu_check.run_tests(budget, None) == [("CUDA tests (tests/test_cuda.py)", status, last)]
