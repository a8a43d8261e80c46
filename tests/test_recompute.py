"""--recompute attention|full (fgpt/recompute.py) against none: the same losses and gradients
bit for bit (the same kernels on the same inputs), single-device in this process and every
distributed strategy on 2 gloo ranks; and fewer bytes kept for backward."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fgpt import GPTConfig, init_params, loss_fn, tree
from fgpt.errors import FgptError
from fgpt.parallel.single import SingleDevice
from fgpt.training import run_dir
from fgpt.training.run_config import validate
from fgpt.training.train import train
from parallel_case import HYPER
from train_case import tiny_run

MODES = ("attention", "full")
WORKER = Path(__file__).with_name("parallel_worker.py")


def single_steps(config: GPTConfig, recompute: str, precision: str, steps: int = 2) -> dict:
    """`steps` optimizer steps of 2 micro-batches; losses, step-1 gradients, final params."""
    torch.manual_seed(0)  # dropout's stream
    strategy = SingleDevice("cpu", recompute=recompute)
    strategy.setup(init_params(config, seed=0), config, precision=precision, **HYPER)
    gen = torch.Generator().manual_seed(1)
    losses, grads = [], None
    for step in range(steps):
        for micro in range(2):
            data = torch.randint(0, config.vocab_size, (2, config.n_ctx + 1), generator=gen)
            losses.append(strategy.forward_backward(data[:, :-1], data[:, 1:], scale=0.5, sync=micro == 1))
        if step == 0:
            grads = {k: p.grad.clone() for k, p in strategy.named.items()}
        strategy.clip_grad_norm(1.0)
        strategy.step()
    return {"losses": losses, "grads": grads, "params": strategy.full_params()}


def assert_same(a: dict, b: dict) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["losses"], b["losses"])), (a["losses"], b["losses"])
    for path, g in a["grads"].items():
        assert torch.equal(g, b["grads"][path]), path
    for path, p in tree.flatten(a["params"]).items():
        assert torch.equal(p, tree.flatten(b["params"])[path]), path


VARIANTS = {
    "learned": GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=32),
    "rope-gqa-window-dropout": GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                                         pos_emb="rope", window=(4, None), dropout=0.1),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_device_recompute_equals_none(variant, precision):
    config = VARIANTS[variant]
    none = single_steps(config, "none", precision)
    for mode in MODES:
        assert_same(single_steps(config, mode, precision), none)


def saved_bytes(recompute: str) -> int:
    """Bytes autograd keeps for backward over one loss (plain autograd, as ddp / fsdp use)."""
    config = GPTConfig(vocab_size=64, n_ctx=128, n_layer=3, n_head=2, n_embd=32)
    params = tree.tree_map(lambda x: x.requires_grad_(), init_params(config, seed=0))
    leaves = {id(x) for x in tree.flatten(params).values()}
    kept = {}

    def pack(t):
        if id(t) not in leaves:  # parameters are held anyway
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(params, tokens, tokens, config, recompute=recompute)  # the forward is what keeps them
    return sum(kept.values())


def test_recompute_keeps_fewer_activations():
    none, attention, full = (saved_bytes(m) for m in ("none", "attention", "full"))
    assert full < attention < none
    assert full < 0.4 * none


def test_bad_mode_is_one_error(text_file):
    with pytest.raises(FgptError, match="--recompute must be one of"):
        validate(tiny_run(text_file, recompute="some"))
    proc = subprocess.run([sys.executable, "-m", "run.train", "--recompute", "some"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "error:" in proc.stderr


def test_run_records_recompute_and_resumes_with_it(text_file, tmp_path):
    """The mode is in the recorded run config; a resume keeps it, and the losses equal an
    uninterrupted run's without recomputation."""
    out = str(tmp_path / "run")
    plain = train(tiny_run(text_file, steps=4))
    first = train(tiny_run(text_file, steps=4, out=out, stop_after=2, recompute="full"))
    saved = run_dir.saved_run(out)[0]
    assert saved.recompute == "full"
    second = train(dataclasses.replace(saved, resume=True, stop_after=None))
    assert run_dir.saved_run(out)[0].recompute == "full"
    losses = [row["loss"] for row in first.metrics + second.metrics]
    assert losses == [row["loss"] for row in plain.metrics]


@pytest.mark.slow  # gloo process groups
def test_distributed_recompute_equals_none(tmp_path):
    """ddp, fsdp, custom-fsdp on 2 gloo ranks: each mode's losses, step-1 gradients and final
    parameters equal the same strategy's with none, in fp32 and bf16."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(tmp_path), "recompute"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FGPT_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "recompute.w2.pt", weights_only=False)
    for name in ("ddp", "fsdp", "custom-fsdp"):
        for precision in ("fp32", "bf16"):
            none = results[f"{name}/none/{precision}"]
            for mode in MODES:
                got = results[f"{name}/{mode}/{precision}"]
                assert got["losses"] == none["losses"], (name, mode, precision)
                for path, g in tree.flatten(none["grads"]).items():
                    assert torch.equal(tree.flatten(got["grads"])[path], g), (name, mode, precision, path)
                for path, p in tree.flatten(none["params"]).items():
                    assert torch.equal(tree.flatten(got["params"])[path], p), (name, mode, precision, path)
