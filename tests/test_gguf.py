"""`python -m run.convert --to-gguf` (fgpt/gguf_export.py): the file read back with gguf's own
reader holds every tensor of the source under the name gguf's GPT-2 name map gives it, in
llama.cpp's layout and type, with the converter's metadata and the GPT-2 tokenizer; variants
are refused in one line. Where llama-cpp-python is installed, llama.cpp's greedy tokens
equal fgpt's."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fgpt import GPTConfig, forward, init_params, save_checkpoint, tree
from fgpt.data.tokenizer import EOT, gpt2_encoding
from run import convert
from run._cli import main_guard

gguf = pytest.importorskip("gguf")

PLAIN = GPTConfig(vocab_size=50257, n_ctx=32, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = init_params(PLAIN, seed=3)
    params = tree.tree_map(lambda t: t + 0.01 * torch.randn_like(t), params)  # non-zero biases, non-unit gains
    root = tmp_path_factory.mktemp("gguf")
    save_checkpoint(root / "model", PLAIN, params)
    return root, params


READERS: dict = {}  # one conversion and one read per type (GGUFReader parses 100k strings)


def convert_to(root, file_type: str):
    if file_type not in READERS:
        out = root / f"model-{file_type}.gguf"
        convert.main(["--checkpoint", str(root / "model"), "--to-gguf", file_type, "--out", str(out)])
        READERS[file_type] = gguf.GGUFReader(str(out))
    return READERS[file_type]


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.slow  # GPT-2-vocabulary files written and read back
@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_every_tensor_reads_back_as_the_source(checkpoint, file_type):
    root, params = checkpoint
    reader = convert_to(root, file_type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, PLAIN.n_layer)
    source = {names.get_name(path, try_suffixes=(".weight", ".bias")): t
              for path, t in tree.flatten(params).items()}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(source)  # no `output`: llama.cpp ties the head to token_embd
    Q = gguf.GGMLQuantizationType
    for name, want in source.items():
        t = tensors[name]
        if want.ndim == 2 and name.startswith("blk."):
            want = want.T  # Conv1D [in, out] -> [out, in], as the converter writes them
        want = want.numpy()
        wide = want.ndim == 2 and not name.startswith("position_embd")
        expected_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[file_type] if wide else Q.F32
        assert t.tensor_type == expected_type, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)  # gguf lists dims reversed
        assert tuple(int(d) for d in reversed(t.shape)) == want.shape, name
        if t.tensor_type == Q.F32:
            assert np.array_equal(got, want), name
        elif t.tensor_type == Q.F16:
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # q8_0: blocks of 32 along a row, one scale d = max|x| / 127 each, error <= d / 2
            blocks = want.reshape(-1, 32)
            scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            # + q (|q| <= 127) times the fp16 rounding of d (relative 2^-11)
            assert (err <= scale * (0.5 + 127 * 2 ** -11) + 1e-8).all(), name


def test_metadata_and_tokenizer_are_the_converters(checkpoint):
    root, _ = checkpoint
    reader = convert_to(root, "f16")
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expected = {"gpt2.block_count": PLAIN.n_layer, "gpt2.context_length": PLAIN.n_ctx,
                "gpt2.embedding_length": PLAIN.n_embd, "gpt2.feed_forward_length": 4 * PLAIN.n_embd,
                "gpt2.attention.head_count": PLAIN.n_head}
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(PLAIN.layer_norm_epsilon)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == PLAIN.vocab_size
    enc = gpt2_encoding()
    (the,) = enc.encode(" the")
    assert tokens[the] == "\u0120the"  # byte-level BPE: the space is U+0120
    assert tokens[EOT] == "<|endoftext|>" and types[EOT] == gguf.TokenType.CONTROL
    assert types[the] == gguf.TokenType.NORMAL
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(enc._mergeable_ranks) - 256  # one merge per token past the 256 bytes
    assert field(reader, "tokenizer.ggml.bos_token_id") == EOT == field(reader, "tokenizer.ggml.eos_token_id")


@pytest.mark.parametrize("variant, word", [(dict(pos_emb="rope"), "rotary"), (dict(n_kv_head=1), "grouped-query"),
                                           (dict(window=8), "sliding-window")])
def test_variants_are_refused_in_one_line(tmp_path, monkeypatch, capsys, variant, word):
    config = PLAIN.replace(**variant)
    save_checkpoint(tmp_path / "model", config, init_params(config, seed=0))
    out = tmp_path / "x.gguf"
    monkeypatch.setattr(sys, "argv", ["run.convert", "--checkpoint", str(tmp_path / "model"), "--to-gguf", "f16",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main_guard(convert.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and word in err and err.startswith("error:")
    assert not out.exists()


def test_llama_cpp_greedy_tokens_equal_fgpts(checkpoint):
    """f32 weights: llama.cpp and fgpt compute the same network, so the same greedy tokens
    (the weights are nudged off init, so the logits are not near-ties)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    root, params = checkpoint
    convert_to(root, "f32")  # written under root
    llm = llama_cpp.Llama(model_path=str(root / "model-f32.gguf"), n_ctx=PLAIN.n_ctx, n_threads=1, verbose=False)
    prompt = gpt2_encoding().encode("def add(x):")
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 12:
            break
    tokens = torch.tensor([prompt])
    for _ in range(12):
        nxt = forward(params, tokens, PLAIN)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    assert theirs == tokens[0, len(prompt):].tolist()


def test_an_existing_out_is_kept_unless_forced(checkpoint, monkeypatch, capsys):
    root, _ = checkpoint
    out = root / "taken.gguf"
    out.write_bytes(b"mine")
    monkeypatch.setattr(sys, "argv", ["run.convert", "--checkpoint", str(root / "model"), "--to-gguf", "f32",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main_guard(convert.main)
    assert e.value.code == 2 and "--force" in capsys.readouterr().err and out.read_bytes() == b"mine"
