"""Data pipeline: splits, caching, document separators, and batches that do not depend on
the world size. (Formats and preparation: test_prepare.py; shard layouts: test_shards.py.)"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import data
from fgpt.data.tokenizer import EOT, gpt2_encoding


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_docs(root, n):
    """n files, each holding a marker word no other file has."""
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"marker{i}qz appears only in document {i}.\n")
    return root


def test_val_split_never_overlaps_train(tmp_path, cache):
    corpus = data.load_corpus(str(write_docs(tmp_path / "docs", 60)), progress=False)
    enc = gpt2_encoding()
    train_ids, val_ids = np.asarray(corpus.train), np.asarray(corpus.val)
    train, val = enc.decode(train_ids.tolist()), enc.decode(val_ids.tolist())
    in_val = {i for i in range(60) if f"marker{i}qz" in val}
    in_train = {i for i in range(60) if f"marker{i}qz" in train}
    assert in_val and in_train
    assert in_val.isdisjoint(in_train) and in_val | in_train == set(range(60))
    # The split follows each file's name, and documents are separated by <|endoftext|>.
    assert in_val == {i for i in range(60) if data.is_val(f"doc{i:03d}.txt")}
    assert int((train_ids == EOT).sum()) == len(in_train) - 1
    assert int((val_ids == EOT).sum()) == len(in_val) - 1


def test_single_file_splits_by_position(tmp_path, cache):
    text = "".join(f"line {i} of a single document\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    corpus = data.load_corpus(str(tmp_path / "one.txt"), progress=False)
    assert len(corpus.val) > 0 and len(corpus.train) > 9 * len(corpus.val) - 10
    assert np.array_equal(np.concatenate([corpus.train[:], corpus.val[:]]), gpt2_encoding().encode_ordinary(text))


def test_builtin_corpus_split_is_a_partition():
    names = [f.name for f in data.source_files(None)]
    assert names == sorted(names) and len(names) > 100
    val = [n for n in names if data.is_val(n)]
    assert 0.05 < len(val) / len(names) < 0.15


def test_cache_is_reused_and_keyed_by_content(tmp_path, cache, monkeypatch):
    docs = write_docs(tmp_path / "docs", 12)
    first = data.load_corpus(str(docs), progress=False)

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again despite a cache")
    monkeypatch.setattr(data, "prepare", no_tokenising)
    again = data.load_corpus(str(docs), progress=False)
    assert again.cache_dir == first.cache_dir
    assert np.array_equal(again.train[:], first.train[:]) and np.array_equal(again.val[:], first.val[:])
    (docs / "doc000.txt").write_text("changed content\n")
    with pytest.raises(AssertionError, match="tokenised again"):
        data.load_corpus(str(docs), progress=False)


TOKENS = np.arange(5000, dtype=np.uint16) % 50257


@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6), per=st.integers(1, 3),
       seq_len=st.integers(1, 16))
@settings(max_examples=15)
def test_global_batch_is_the_same_for_any_world_size(seed, step, per, seq_len):
    batch_size = 6 * per  # divisible by 1, 2 and 3 ranks
    kw = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, step=step)
    x1, y1 = data.rank_batch(TOKENS, **kw)
    assert x1.shape == y1.shape == (batch_size, seq_len)
    for world in (2, 3):
        parts = [data.rank_batch(TOKENS, rank=r, world_size=world, **kw) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    # A pure function of (seed, step): what a resumed run draws for this step is the same.
    assert torch.equal(data.rank_batch(TOKENS, **kw)[0], x1)


@given(seed=st.integers(0, 1000), step=st.integers(0, 1000), seq_len=st.integers(1, 32))
@settings(max_examples=15)
def test_targets_are_the_next_tokens(seed, step, seq_len):
    tokens = np.random.default_rng(seed).integers(0, 50257, 200).astype(np.uint16)
    x, y = data.rank_batch(tokens, seq_len=seq_len, batch_size=4, seed=seed, step=step)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.dtype == torch.int64
    for row_x, row_y in zip(x, y):  # each row is a real window of the token stream
        starts = [s for s in range(len(tokens) - seq_len) if np.array_equal(tokens[s:s + seq_len], row_x)]
        assert any(tokens[s + seq_len] == row_y[-1] for s in starts)


def test_micro_batches_partition_the_rank_slice():
    x, y = data.rank_batch(TOKENS, seq_len=8, batch_size=12, seed=0, step=3, rank=1, world_size=2)
    micro = data.micro_batches(x, y, 3)
    assert len(micro) == 3 and all(m[0].shape == (2, 8) for m in micro)
    assert torch.equal(torch.cat([m[0] for m in micro]), x)


def test_data_too_small_is_a_clear_error():
    with pytest.raises(data.FgptError, match="too few for a context"):
        data.check_fits(TOKENS[:10], 16, 1, "train")
    with pytest.raises(data.FgptError, match="too few to fill a batch"):
        data.check_fits(TOKENS[:100], 16, 8, "train")
