"""`pytorch_model.bin` checkpoints: tensors-only loading through torch.load(weights_only=True),
the same logits as the safetensors twin, and pickles that would run code refused unrun."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fgpt import FgptError, forward, load_checkpoint
from hf_reference import CONFIGS, hf_logits, hf_model, rel_err, save_hub_style

ROOT = Path(__file__).resolve().parent.parent


def save_bin(model, directory: Path, *, hub_style: bool = False, legacy: bool = False) -> Path:
    """What transformers < 5 wrote with save_pretrained(safe_serialization=False) (prefixed keys,
    tied lm_head), or the hub's older uploads (no prefix, mask buffers); zip or legacy format."""
    directory.mkdir(parents=True, exist_ok=True)
    if hub_style:
        save_hub_style(model, directory)
        state = load_file(directory / "model.safetensors")
        (directory / "model.safetensors").unlink()
    else:
        state = model.state_dict()
        model.config.to_json_file(directory / "config.json")
    torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return directory


@pytest.mark.parametrize("hub_style, legacy", [(False, False), (True, False), (False, True)])
def test_bin_gives_the_logits_of_its_safetensors_twin_and_of_transformers(hub_style, legacy, tmp_path):
    model = hf_model(*CONFIGS[1])
    save_bin(model, tmp_path / "bin", hub_style=hub_style, legacy=legacy)
    model.save_pretrained(tmp_path / "st")
    config_bin, bin_params = load_checkpoint(tmp_path / "bin")
    config_st, st_params = load_checkpoint(tmp_path / "st")
    assert config_bin == config_st
    tokens = torch.randint(0, config_st.vocab_size, (2, config_st.n_ctx))
    assert torch.equal(forward(bin_params, tokens, config_bin), forward(st_params, tokens, config_st))
    assert rel_err(forward(bin_params, tokens, config_bin), hf_logits(model, tokens)) < 1e-5
    _, direct = load_checkpoint(tmp_path / "bin" / "pytorch_model.bin", dtype=torch.bfloat16)
    assert direct["wte"]["weight"].dtype == torch.bfloat16


@pytest.mark.slow  # a subprocess
def test_convert_writes_the_safetensors_twin(tmp_path):
    model = hf_model(*CONFIGS[2])
    save_bin(model, tmp_path / "bin")
    run = subprocess.run([sys.executable, "-m", "run.convert", "--checkpoint", str(tmp_path / "bin"),
                          "--to-safetensors", "--out", str(tmp_path / "st")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors"]
    from transformers import GPT2LMHeadModel
    twin = GPT2LMHeadModel.from_pretrained(tmp_path / "st").eval()
    tokens = torch.randint(0, 64, (2, 40))
    assert torch.equal(hf_logits(twin, tokens), hf_logits(model, tokens))


def test_safetensors_wins_and_the_pickle_is_never_opened(tmp_path):
    model = hf_model(*CONFIGS[0])
    model.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    config, params = load_checkpoint(tmp_path)
    tokens = torch.randint(0, 97, (1, 32))
    assert rel_err(forward(params, tokens, config), hf_logits(model, tokens)) < 1e-5


class RunsACommand:
    """Unpickling calls os.system(...): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_a_command_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "ran"
    state = {"wte.weight": torch.zeros(4, 2), "payload": RunsACommand(marker)}
    file = tmp_path / "pytorch_model.bin"
    if how == "torch.save":
        torch.save(state, file)
    else:
        file.write_bytes(pickle.dumps(state))
    pickle.loads(pickle.dumps(RunsACommand(tmp_path / "control")))  # the payload works when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(FgptError, match="not a tensors-only torch file; refused without running") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)  # no unsafe advice
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ({"wte.weight": torch.zeros(2), "step": 3}, "'step' is of type int, not a tensor"),
    ({"model": {"wte.weight": torch.zeros(2)}}, "'model' is of type dict, not a tensor"),
    ([torch.zeros(2)], "holds an object of type list, not a mapping"),
])
def test_anything_but_a_flat_mapping_of_tensors_is_refused(content, message, tmp_path):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(FgptError, match=message):
        load_checkpoint(tmp_path)


def test_truncated_bin_is_a_one_line_error(tmp_path):
    save_bin(hf_model(*CONFIGS[0]), tmp_path)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(FgptError, match="not a tensors-only torch file") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_directory_without_weights_names_both_formats(tmp_path):
    with pytest.raises(FgptError, match="no model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_a_hub_repo_without_safetensors_downloads_the_bin(tmp_path, monkeypatch):
    """Offline stand-in for the hub: the repo holds config.json and pytorch_model.bin only."""
    import huggingface_hub
    model = hf_model(*CONFIGS[0])
    repo = save_bin(model, tmp_path / "remote")
    local, asked = tmp_path / "snapshot", []

    def snapshot_download(name, allow_patterns):
        import fnmatch
        import shutil
        asked.append((name, allow_patterns))
        local.mkdir(exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, local / f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config, params = load_checkpoint("someone/gpt2-finetune")
    assert [name for name, _ in asked] == ["someone/gpt2-finetune"] * 2
    assert "pytorch_model.bin" not in asked[0][1]  # safetensors first: the pickle only when there is none
    tokens = torch.randint(0, 97, (1, 32))
    assert rel_err(forward(params, tokens, config), hf_logits(model, tokens)) < 1e-5
