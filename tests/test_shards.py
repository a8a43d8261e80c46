"""Reading token shards: fgpt's prepared directories, nanoGPT's train.bin / val.bin and llm.c's
header-ful shards as one virtual stream per split; batches that do not depend on how the
stream is cut into shards; one-line errors for files that disagree with their header or
manifest, and for token ids past the model's vocabulary."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fgpt import GPTConfig, data
from fgpt.data.pipeline import prepare
from fgpt.data.shards import LLMC_MAGIC, Shard, TokenStream, open_shards
from fgpt.data.sources import list_files
from fgpt.errors import FgptError
from fgpt.parallel import Strategy
from fgpt.training.train import TrainConfig, train

TOKENS = np.random.default_rng(0).integers(0, 50257, 3000).astype(np.uint16)


def stream_in_pieces(tmp_path, tokens, cuts, dtype=np.uint16) -> TokenStream:
    """`tokens` written as raw shard files cut at `cuts`."""
    shards, bounds = [], [0, *sorted(cuts), len(tokens)]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        path = tmp_path / f"piece_{i:04d}.bin"
        tokens[a:b].astype(dtype).tofile(path)
        shards.append(Shard(path, b - a))
    return TokenStream(shards, dtype)


def write_llmc(path, tokens, *, magic=LLMC_MAGIC, version=1, count=None):
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16 if version == 1 else np.uint32).tobytes())


@given(cuts=st.lists(st.integers(1, len(TOKENS) - 1), max_size=8), data_=st.data())
@settings(max_examples=30)
def test_a_stream_of_shards_slices_like_one_array(tmp_path_factory, cuts, data_):
    stream = stream_in_pieces(tmp_path_factory.mktemp("s"), TOKENS, cuts)
    assert len(stream) == len(TOKENS) and stream.max() == TOKENS.max()
    for _ in range(10):
        a = data_.draw(st.integers(-len(TOKENS) - 5, len(TOKENS) + 5))
        b = data_.draw(st.integers(-len(TOKENS) - 5, len(TOKENS) + 5))
        np.testing.assert_array_equal(stream[a:b], TOKENS[a:b])
    i = data_.draw(st.integers(-len(TOKENS), len(TOKENS) - 1))
    assert stream[i] == TOKENS[i]
    np.testing.assert_array_equal(np.asarray(stream), TOKENS)
    assert [int(t) for t in stream] == TOKENS.tolist()


@given(cuts=st.lists(st.integers(1, len(TOKENS) - 1), min_size=1, max_size=8),
       seed=st.integers(0, 2**31), step=st.integers(0, 10**6), seq_len=st.integers(1, 40),
       world=st.sampled_from([1, 2, 3]))
@settings(max_examples=30)
def test_the_global_batch_does_not_depend_on_the_shards(tmp_path_factory, cuts, seed, step, seq_len, world):
    """One shard or many, any world size: the batch of step s is the same."""
    one = stream_in_pieces(tmp_path_factory.mktemp("one"), TOKENS, [])
    many = stream_in_pieces(tmp_path_factory.mktemp("many"), TOKENS, cuts)
    kw = dict(seq_len=seq_len, batch_size=6, seed=seed, step=step)
    x, y = data.rank_batch(TOKENS, **kw)  # the in-memory array: the reference
    for stream in (one, many):
        parts = [data.rank_batch(stream, rank=r, world_size=world, **kw) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    ex, ey = data.eval_batch(many, seq_len=seq_len, batch_size=3, seed=0, index=step)
    assert torch.equal(ex, data.eval_batch(TOKENS, seq_len=seq_len, batch_size=3, seed=0, index=step)[0])


def test_nanogpt_layout(tmp_path):
    TOKENS[:2000].tofile(tmp_path / "train.bin")
    TOKENS[2000:].tofile(tmp_path / "val.bin")
    corpus = data.load_corpus(str(tmp_path), progress=False)
    np.testing.assert_array_equal(np.asarray(corpus.train), TOKENS[:2000])
    np.testing.assert_array_equal(np.asarray(corpus.val), TOKENS[2000:])
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(FgptError, match=r"val.bin holds 2001 bytes: not a whole number of uint16 tokens"):
        data.load_corpus(str(tmp_path))
    (tmp_path / "val.bin").unlink()
    with pytest.raises(FgptError, match="has train.bin but no val.bin"):
        data.load_corpus(str(tmp_path))


def test_llmc_layout(tmp_path):
    write_llmc(tmp_path / "fineweb_train_000001.bin", TOKENS[:1000])
    write_llmc(tmp_path / "fineweb_train_000002.bin", TOKENS[1000:2500])
    write_llmc(tmp_path / "fineweb_val_000000.bin", TOKENS[2500:])
    corpus = data.load_corpus(str(tmp_path), progress=False)
    assert len(corpus.train.shards) == 2
    np.testing.assert_array_equal(np.asarray(corpus.train), TOKENS[:2500])
    np.testing.assert_array_equal(np.asarray(corpus.val), TOKENS[2500:])


def test_llmc_single_shard_names(tmp_path):
    """llm.c's smaller datasets name their one shard per split `*_train.bin` / `*_val.bin`."""
    write_llmc(tmp_path / "tiny_shakespeare_train.bin", TOKENS[:2000])
    write_llmc(tmp_path / "tiny_shakespeare_val.bin", TOKENS[2000:])
    corpus = data.load_corpus(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(corpus.train), TOKENS[:2000])
    np.testing.assert_array_equal(np.asarray(corpus.val), TOKENS[2000:])


@pytest.mark.parametrize("header, match", [
    (dict(magic=20240521), r"bad magic 20240521 \(an llm.c shard starts with 20240520\)"),
    (dict(count=1001), r"the header says 1001 tokens \(3026 bytes with the header\) but the file holds 3024 bytes"),
    (dict(version=7), r"header version 7 is not 1 \(uint16\) or 2 \(uint32\)"),
])
def test_llmc_header_errors(tmp_path, header, match):
    write_llmc(tmp_path / "x_train_000000.bin", TOKENS[:1000], **header)
    with pytest.raises(FgptError, match=match):
        data.load_corpus(str(tmp_path))


def test_llmc_version_2_is_uint32_and_short_files_are_errors(tmp_path):
    write_llmc(tmp_path / "x_train_000000.bin", TOKENS[:100], version=2)
    train, val, _ = open_shards(tmp_path)
    assert train.dtype == np.uint32 and len(val) == 0
    np.testing.assert_array_equal(np.asarray(train), TOKENS[:100])
    (tmp_path / "x_train_000000.bin").write_bytes(b"\1" * 100)
    with pytest.raises(FgptError, match="too short for llm.c's 1024-byte header"):
        open_shards(tmp_path)


@pytest.fixture
def prepared_dir(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(60)))
    prepare(list_files(str(src)), tmp_path / "out", shard_tokens=500, progress=False)
    return tmp_path / "out"


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_prepared_directory_opens_as_it_was_written(prepared_dir):
    corpus = data.load_corpus(str(prepared_dir))
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    assert len(corpus.train) == manifest["splits"]["train"]["tokens"] and len(corpus.train.shards) > 2
    assert corpus.cache_dir == prepared_dir and corpus.description == str(prepared_dir)
    raw = np.concatenate([np.fromfile(prepared_dir / s["file"], np.uint16)
                          for s in manifest["splits"]["train"]["shards"]])
    np.testing.assert_array_equal(np.asarray(corpus.train), raw)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(dtype="int64"), r"dtype 'int64' is not one of uint16, uint32"),
    (lambda m: m.update(dtype="uint32"), r"train_000000.bin holds 1000 bytes, but the manifest lists 500 uint32 tokens"),
    (lambda m: m["splits"]["train"]["shards"][0].update(tokens=499), r"holds 1000 bytes, but the manifest lists 499"),
    (lambda m: m["splits"]["val"]["shards"].append({"file": "val_000099.bin", "tokens": 3}), r"cannot read shard .*val_000099.bin"),
    (lambda m: m.update(format="fgpt-data-v1"), r"has format 'fgpt-data-v1', not 'fgpt-shards-v2'"),
    (lambda m: m.pop("splits"), r"is not an fgpt manifest \(KeyError"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("tokens"), r"is not an fgpt manifest \(KeyError"),
    (lambda m: m["splits"]["train"]["shards"][0].update(tokens="500"), r"every shard entry needs a file name and a token count"),
])
def test_a_manifest_that_disagrees_with_the_files_is_an_error(prepared_dir, change, match):
    edit_manifest(prepared_dir, change)
    with pytest.raises(FgptError, match=match):
        data.load_corpus(str(prepared_dir))


def test_a_manifest_that_is_not_json(prepared_dir):
    (prepared_dir / "manifest.json").write_text("{not json")
    with pytest.raises(FgptError, match=r"manifest.json is not an fgpt manifest"):
        data.load_corpus(str(prepared_dir))


MODEL = GPTConfig(n_ctx=16, n_layer=1, n_head=2, n_embd=32)


def test_training_reads_prepared_shards_and_refuses_ids_past_the_vocabulary(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    run = dict(model=MODEL, steps=2, batch_size=2, eval_interval=1, eval_iters=1, checkpoint_interval=0,
               progress=False)
    result = train(TrainConfig(data=str(prepared_dir), **run))
    assert len(result.metrics) == 2 and np.isfinite(result.metrics[-1]["val_loss"])
    # the JSONL it was prepared from, through the cache: the same shards, the same losses
    from_source = train(TrainConfig(data=str(tmp_path / "c.jsonl"), **run))
    assert [m["loss"] for m in from_source.metrics] == [m["loss"] for m in result.metrics]
    nano = tmp_path / "nano"
    nano.mkdir()
    bad = TOKENS.copy()
    bad[1234] = 50257
    bad.tofile(nano / "train.bin")
    TOKENS.tofile(nano / "val.bin")
    with pytest.raises(FgptError, match=r"the train split holds token id 50257, but the model's vocabulary has 50257 ids"):
        train(TrainConfig(data=str(nano), **run))


class FakeRank:
    """The parts of a Strategy corpus loading uses; `others_failed`: what mean_across_ranks
    reports from the other ranks."""
    device = torch.device("cpu")

    def __init__(self, is_main, others_failed=False):
        self.is_main, self.others_failed = is_main, others_failed

    def mean_across_ranks(self, flag):
        return torch.maximum(flag, torch.tensor(float(self.others_failed)))

    any_rank = Strategy.any_rank  # the real rule, over this mean


def test_rank_0s_preparation_error_reaches_every_rank(tmp_path, monkeypatch):
    from fgpt.training.train import load_corpus
    monkeypatch.setenv("FGPT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    cfg = TrainConfig(data=str(bad), progress=False)
    with pytest.raises(FgptError, match="line 2: not valid JSON"):
        load_corpus(cfg, FakeRank(is_main=True))
    with pytest.raises(FgptError, match="rank 0 could not prepare the corpus"):
        load_corpus(cfg, FakeRank(is_main=False, others_failed=True))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(30)))
    corpus = load_corpus(TrainConfig(data=str(good), progress=False), FakeRank(is_main=True))
    assert len(corpus.train) > 0 and corpus.cache_dir.parent == tmp_path / "cache" / "data"
