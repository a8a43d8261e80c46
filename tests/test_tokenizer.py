"""The offline GPT-2 tokenizer against transformers' independent BPE over the same files."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, strategies as st

from fgpt import FgptError
from fgpt.data import tokenizer
from fgpt.data.tokenizer import EOT, gpt2_encoding

TEXTS = ["Hello world", "The dog's 3 bones -- aren't they?\n\n  indented\ttab",
         "naïve café, 日本語, emoji 🐕 and  double  spaces   ", "a document<|endoftext|>the next one"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import GPT2Tokenizer
    data = tokenizer.data_dir()
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


@pytest.mark.parametrize("text", TEXTS)
def test_same_tokens_as_transformers(text, hf_tokenizer):
    assert gpt2_encoding().encode(text, allowed_special="all") == hf_tokenizer.encode(text)


def test_end_of_text_is_50256_and_the_vocabulary_is_gpt2s():
    enc = gpt2_encoding()
    assert enc.eot_token == EOT == 50256
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc is gpt2_encoding()  # built once per process


@given(st.text(max_size=40))
def test_decode_inverts_encode(text):
    enc = gpt2_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_a_tampered_vocabulary_is_rejected(tmp_path, monkeypatch):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(tokenizer.data_dir() / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("x y\n")
    monkeypatch.setattr(tokenizer, "data_dir", lambda: tmp_path)
    with pytest.raises(FgptError, match="sha256"):
        tokenizer._verified("vocab.bpe")
