"""Generation: greedy equals transformers; batches, EOS, samples and streaming; the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from fgpt import FgptError, GPTConfig, forward, init_params, load_checkpoint, tree
from fgpt.inference.generate import Sampling, STOPPED, decode_layout, generate, sample, stream
from helpers import greedy_by_recomputation, wide_params
from hf_reference import hf_model, save_hub_style

GREEDY = Sampling(temperature=0)
ROOT = Path(__file__).resolve().parents[1]


def greedy_alone(params, config, prompt: list[int], n: int, **kw) -> list[int]:
    """One prompt's greedy continuation by full recomputation, as generate returns it."""
    return greedy_by_recomputation(params, config, [prompt], n, **kw)[0][0].tolist()


# --- against transformers ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(97, 32, 1, 1, 16), (101, 32, 3, 4, 32), (64, 40, 2, 2, 24)],
                         ids=lambda s: "V{}-ctx{}-L{}-H{}-d{}".format(*s))
def test_greedy_equals_transformers_generate(shape, tmp_path):
    model = hf_model(*shape)
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():  # decode up to the full context
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=shape[1] - len(prompt), do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0].tolist()
    assert len(ref) - len(prompt) >= 24
    assert len(set(ref[len(prompt):])) > 2  # a real sequence, not one token repeated
    got = generate(params, config, [prompt], len(ref) - len(prompt), sampling=GREEDY, ignore_eos=True)
    assert got == [ref]
    assert generate(decode_layout(params), config, [prompt], len(ref) - len(prompt), sampling=GREEDY,
                    ignore_eos=True) == [ref]


@pytest.mark.slow  # a subprocess per case
def test_cli_greedy_prints_what_transformers_prints(tmp_path):
    from fgpt.data.tokenizer import gpt2_encoding
    model = hf_model(50257, 64, 2, 2, 32)  # the real vocabulary, tiny dims
    save_hub_style(model, tmp_path)
    enc = gpt2_encoding()
    prompt = enc.encode("The dog")
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0]
    ref = ref.tolist()
    if 50256 in ref[len(prompt):]:  # both stop at end-of-text, which is not printed
        ref = ref[: ref.index(50256, len(prompt))]
    for extra in ([], ["--stream"]):
        out = run_cli("--checkpoint", tmp_path, "--prompt", "The dog", "--max-new-tokens", 20,
                      "--temperature", 0, *extra)
        assert out.returncode == 0, out.stderr
        assert out.stdout == enc.decode(ref) + "\n"


@pytest.mark.slow  # a subprocess per case
def test_cli_never_samples_the_padding_of_a_padded_vocabulary(tmp_path):
    """vocab 50304 (padded as nanoGPT does): rows past GPT-2's 50257 are made the likeliest,
    yet the CLI prints only what the tokenizer can decode -- greedy over the real ids."""
    from fgpt import save_checkpoint
    from fgpt.data.tokenizer import gpt2_encoding
    config = GPTConfig(vocab_size=50304, n_ctx=32, n_layer=1, n_head=2, n_embd=16)
    params = init_params(config, seed=0)
    params["ln_f"]["weight"].zero_()  # every final hidden state is ln_f's bias, b
    params["ln_f"]["bias"].copy_(torch.randn(16))
    params["wte"]["weight"][50257:] = 100 * params["ln_f"]["bias"]  # logit 100|b|^2: the top ones
    save_checkpoint(tmp_path, config, params)
    enc = gpt2_encoding()
    prompt = enc.encode("The dog")
    logits = forward(params, torch.tensor([prompt]), config)[0, -1]  # the same at every position
    assert int(logits.argmax()) >= 50257
    best_real = int(logits[:50257].argmax())
    out = run_cli("--checkpoint", tmp_path, "--prompt", "The dog", "--max-new-tokens", 3,
                  "--temperature", 0, "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout == enc.decode(prompt + [best_real] * 3) + "\n"


# --- cached decoding against full forward passes -----------------------------------------

VARIANTS = {
    "learned": dict(),
    "rope-gqa": dict(pos_emb="rope", n_kv_head=1),
    "window": dict(window=3),
    "mixed-window-rope": dict(pos_emb="rope", window=(None, 4)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_of_different_lengths_in_one_call_equal_each_prompt_alone(variant):
    """generate pads a ragged batch on the left itself; each row continues as its prompt
    alone does, and as full recomputation does. (The KV cache's handling of left-padded
    rows, over random configs and chunkings: tests/test_model_properties.py.)"""
    config = GPTConfig(vocab_size=53, n_ctx=32, n_layer=2, n_head=4, n_embd=32, **VARIANTS[variant])
    params = wide_params(config)
    prompts = [[5, 9, 2, 7, 1, 8, 3], [4], [11, 12, 13]]
    batch = generate(params, config, prompts, 12, sampling=GREEDY, ignore_eos=True)
    for prompt, row in zip(prompts, batch):
        assert row == greedy_alone(params, config, prompt, 12)
        assert row == generate(params, config, [prompt], 12, sampling=GREEDY, ignore_eos=True)[0]


def test_all_windowed_rope_model_generates_past_n_ctx_with_a_rolling_cache():
    config = GPTConfig(vocab_size=53, n_ctx=8, n_layer=2, n_head=2, n_embd=16, pos_emb="rope", window=3)
    params = wide_params(config)
    got = generate(params, config, [[1, 2, 3]], 14, sampling=GREEDY, ignore_eos=True)[0]
    assert got == greedy_alone(params, config, [1, 2, 3], 14)


def test_full_attention_rope_past_n_ctx_only_when_allowed():
    config = GPTConfig(vocab_size=53, n_ctx=8, n_layer=1, n_head=2, n_embd=16, pos_emb="rope")
    params = wide_params(config)
    with pytest.raises(FgptError, match="allow_past_ctx"):
        generate(params, config, [[1, 2, 3]], 10, sampling=GREEDY)
    got = generate(params, config, [[1, 2, 3]], 10, sampling=GREEDY, ignore_eos=True, allow_past_ctx=True)[0]
    assert got == greedy_alone(params, config, [1, 2, 3], 10)


# --- stopping, samples, streaming --------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    config = GPTConfig(vocab_size=61, n_ctx=40, n_layer=2, n_head=2, n_embd=16)
    return config, wide_params(config, seed=4)


def test_each_row_stops_at_its_own_end_of_text(small):
    config, params = small
    prompts = [[1, 2, 3], [7, 8]]
    free = generate(params, config, prompts, 15, sampling=GREEDY, ignore_eos=True)
    eos = free[0][3 + 4]  # the 5th token row 0 generates
    got = generate(params, config, prompts, 15, sampling=GREEDY, eos_id=eos)
    for row, full, prompt in zip(got, free, prompts):
        cont = full[len(prompt):]
        expected = full[: len(prompt) + cont.index(eos)] if eos in cont else full
        assert row == expected
    steps = [t.tolist() for t in stream(params, config, prompts, 15, sampling=GREEDY, eos_id=eos)]
    stop = free[0][3:].index(eos)  # the step at which row 0 meets it
    assert steps[stop][0] == eos and all(s[0] == STOPPED for s in steps[stop + 1:])


def test_samples_are_seeded_and_rows_are_prompt_major(small):
    config, params = small
    kw = dict(sampling=Sampling(temperature=1.0), num_samples=3, ignore_eos=True)
    a = generate(params, config, [[1, 2], [3, 4, 5]], 10, seed=7, **kw)
    assert a == generate(params, config, [[1, 2], [3, 4, 5]], 10, seed=7, **kw)
    assert a != generate(params, config, [[1, 2], [3, 4, 5]], 10, seed=8, **kw)
    assert [r[:2] for r in a[:3]] == [[1, 2]] * 3 and [r[:3] for r in a[3:]] == [[3, 4, 5]] * 3
    assert len({tuple(r) for r in a[:3]}) > 1  # samples of one prompt differ


def test_top_k_1_and_a_tiny_top_p_are_greedy(small):
    config, params = small
    greedy = generate(params, config, [[1, 2]], 10, sampling=GREEDY, ignore_eos=True)
    for s in (Sampling(temperature=1.5, top_k=1), Sampling(temperature=1.5, top_p=1e-6)):
        assert generate(params, config, [[1, 2]], 10, sampling=s, seed=0, ignore_eos=True) == greedy


def test_stream_and_callback_see_the_tokens_generate_returns(small):
    config, params = small
    kw = dict(sampling=Sampling(temperature=0.9, top_k=20, top_p=0.9), seed=3, ignore_eos=True)
    seen = []
    rows = generate(params, config, [[1, 2]], 8, on_token=lambda t: seen.append(t.tolist()), **kw)
    streamed = [t.tolist() for t in stream(params, config, [[1, 2]], 8, **kw)]
    assert seen == streamed and rows == [[1, 2] + [s[0] for s in streamed]]


def test_vocab_limit_samples_only_ids_below_it(small):
    """A vocabulary padded past the tokenizer's: greedy over the first `limit` logits of a
    full forward, and sampled ids all below the limit."""
    config, params = small
    limit = 9  # most of this model's likeliest ids lie above it
    unlimited = generate(params, config, [[1, 2]], 12, sampling=GREEDY, ignore_eos=True)[0]
    assert max(unlimited[2:]) >= limit
    assert generate(params, config, [[1, 2]], 12, sampling=GREEDY, ignore_eos=True, vocab_limit=limit)[0] == \
        greedy_alone(params, config, [1, 2], 12, vocab_limit=limit)
    sampled = generate(params, config, [[1, 2]], 30, sampling=Sampling(temperature=2.0), seed=0,
                       num_samples=4, ignore_eos=True, vocab_limit=limit)
    assert all(t < limit for row in sampled for t in row[2:])
    with pytest.raises(FgptError, match="vocab_limit"):
        generate(params, config, [[1, 2]], 1, vocab_limit=config.vocab_size + 1)


@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12), k=st.integers(1, 12),
       p=st.floats(0.01, 1.0), seed=st.integers(0, 100))
def test_sampled_tokens_lie_in_the_top_k_and_the_nucleus(logits, k, p, seed):
    x = torch.tensor([logits])
    gen = torch.Generator().manual_seed(seed)
    k_set = set(x[0].topk(min(k, len(logits))).indices.tolist())
    ties = set(torch.nonzero(x[0] >= x[0].topk(min(k, len(logits))).values[-1]).flatten().tolist())
    assert int(sample(x, Sampling(top_k=k), gen)) in k_set | ties
    probs = x[0].softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    nucleus, mass = set(), 0.0  # the smallest likeliest set reaching p, built by hand
    for i in order:
        nucleus.add(i)
        mass += probs[i]
        if mass >= p - 1e-6:
            break
    tied = {i for i in order if any(abs(probs[i] - probs[j]) < 1e-6 for j in nucleus)}
    assert int(sample(x, Sampling(top_p=p), gen)) in nucleus | tied


def test_validation_errors(small):
    config, params = small
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
                dict(top_k=0), dict(top_p=0.0),
                dict(top_p=1.5)):
        with pytest.raises(FgptError):
            Sampling(**bad)
    with pytest.raises(FgptError, match="n_ctx"):
        generate(params, config, [[1] * 30], 11)
    with pytest.raises(FgptError, match="empty prompt"):
        generate(params, config, [[]], 5)
    with pytest.raises(FgptError, match="outside the vocabulary"):
        generate(params, config, [[config.vocab_size]], 5)


# --- the command line: bad input is one line on stderr, no traceback ---------------------

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "run.generate", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    from safetensors.torch import load_file, save_file
    root = tmp_path_factory.mktemp("cli")
    good = save_hub_style(hf_model(50257, 16, 1, 1, 8), root / "good")
    files = {}
    for name, edit in {"unknown": lambda s: s.__setitem__("h.0.attn.extra", torch.zeros(1)),
                       "missing": lambda s: s.pop("ln_f.bias")}.items():
        state = load_file(good)
        edit(state)
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text((root / "good" / "config.json").read_text())
        files[name] = root / name
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    (root / "text.safetensors").write_text("not a checkpoint\n")
    (root / "contradict").mkdir()
    save_file(load_file(good), root / "contradict" / "model.safetensors", metadata={"format": "pt"})
    (root / "contradict" / "config.json").write_text('{"n_embd": 16, "n_head": 1, "n_layer": 1, "n_positions": 16}')
    return root


BAD = {
    "missing path": (["--checkpoint", "{root}/nope/model.safetensors"], "not found"),
    "truncated file": (["--checkpoint", "{root}/truncated.safetensors"], "not a readable safetensors"),
    "not safetensors": (["--checkpoint", "{root}/text.safetensors"], "not a readable safetensors"),
    "unknown key": (["--checkpoint", "{root}/unknown"], "unknown keys h.0.attn.extra"),
    "missing key": (["--checkpoint", "{root}/missing"], "missing keys ln_f.bias"),
    "shape vs config.json": (["--checkpoint", "{root}/contradict"], "config.json says"),
    "prompt too long": (["--checkpoint", "{root}/good", "--max-new-tokens", "14"], "exceeds n_ctx=16"),
    "top_p": (["--checkpoint", "{root}/good", "--top-p", "1.5"], "top_p"),
    "negative temperature": (["--checkpoint", "{root}/good", "--temperature", "-0.5"], "temperature"),
    "top_k": (["--checkpoint", "{root}/good", "--top-k", "0"], "top_k"),
    "empty prompt": (["--checkpoint", "{root}/good", "--prompt", ""], "empty prompt"),
    "no checkpoint at all": ([], "no checkpoint under out/"),
}


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_without_traceback(case, cli_checkpoint, tmp_path):
    args, message = BAD[case]
    args = [a.format(root=cli_checkpoint) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", "one two three four five six"]  # 6 tokens
    out = run_cli(*args, "--max-new-tokens", "3", cwd=tmp_path) if "--max-new-tokens" not in args \
        else run_cli(*args, cwd=tmp_path)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- section: api -->")[1].split("<!-- /section: api -->")[0]
    code = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "checkpoints" / "demo" / "model.safetensors").is_file()
    assert capsys.readouterr().out.startswith("Hello, world. Hello again")


def test_bf16_cached_decoding_follows_the_bf16_full_forward():
    config = GPTConfig(vocab_size=53, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
    params = tree.cast(wide_params(config), torch.bfloat16)
    tokens = torch.randint(0, 53, (1, 20))
    full = forward(params, tokens, config).float()
    from fgpt.inference.kv_cache import KVCache
    cache = KVCache.allocate(config, 1, 20, dtype=torch.bfloat16)
    steps = [forward(params, tokens[:, :8], config, cache=cache)]
    steps += [forward(params, tokens[:, t: t + 1], config, cache=cache) for t in range(8, 20)]
    cached = torch.cat(steps, dim=1).float()
    assert cached.dtype == full.dtype and ((cached - full).abs().max() / full.abs().max()) < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_decode_layout_stores_each_matrix_as_measured_and_keeps_its_values(dtype):
    from fgpt.inference import int8
    from fgpt.inference.decode_layout import IN_OUT, PACKED, SPLIT, fastest_layout
    config = GPTConfig(vocab_size=53, n_ctx=16, n_layer=2, n_head=2, n_embd=32)
    params = init_params(config, seed=0)
    params = int8.quantize(params) if dtype == "int8" else tree.cast(params, getattr(torch, dtype))
    fast = decode_layout(params)
    flat = tree.flatten(fast)
    assert {path.removesuffix(".stored") for path in flat} == tree.flatten(params).keys()
    for path, before in tree.flatten(params).items():
        split = path + ".stored" in flat  # a SplitMatrix's child: W.T's rows [out, in] (and zero rows after)
        t = flat[path] if not split else flat[path + ".stored"][:before.shape[path != "wte.weight"]]
        t = t.T if split and path != "wte.weight" else t  # as `params` has it: W [in, out], wte [V, d]
        assert t.dtype == before.dtype and torch.equal(t, before), path
        if t.dim() == 2 and t.is_floating_point() and path != "wpe.weight":
            used = t.T if path == "wte.weight" else t  # the head multiplies by wte.T
            layout = fastest_layout(tuple(used.shape), t.dtype)
            assert split == (layout in (SPLIT, PACKED)), path
            if not split:
                rows_in = used.stride(1) == 1  # memory rows run along `out`: stored [in, out]
                assert rows_in == (layout == IN_OUT), path
        elif t.dtype == torch.int8:
            assert t.is_contiguous(), path  # [out, in] rows, as torch's int8 kernel reads them
