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
    assert rows["CUDA tests (tests/test_cuda.py)"][0] == "ok"  # all skipped without CUDA, none failed
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
