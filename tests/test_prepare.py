"""Streaming preparation (fgpt.data.pipeline, `python -m run.prepare`): every source format gives
the tokens tiktoken gives the same documents, the split follows each document's name, the
output appears only when complete, and bad input is one line naming the file."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fgpt import data
from fgpt.data import pipeline, shards, sources
from fgpt.data.pipeline import is_val, prepare
from fgpt.data.shards import open_shards
from fgpt.data.sources import list_files
from fgpt.data.tokenizer import EOT, gpt2_encoding
from fgpt.errors import FgptError
from run import prepare as run_prepare

# Tricky on purpose: special-token text (encoded as ordinary text), non-ASCII, an empty
# document, whitespace runs, and a line break inside a document.
DOCS = [f"Document {i}: caf\u00e9 \u4e2d\u6587 {'  ' * (i % 3)}x{i}qz <|endoftext|> end.\nsecond line {i}"
        for i in range(40)] + ["", "   ", "last document"]


def reference(docs) -> np.ndarray:
    """tiktoken itself: doc0 EOT doc1 EOT ... docN."""
    out = []
    for i, d in enumerate(docs):
        out += ([EOT] if i else []) + gpt2_encoding().encode_ordinary(d)
    return np.array(out)


def write_text_files(root, docs):
    root.mkdir()
    for i, d in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(d)
    return root


def write_jsonl(path, docs, field="text"):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def write_parquet(path, docs, field="text"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=7)
    return path


WRITERS = {"jsonl": write_jsonl, "jsonl.gz": write_jsonl, "parquet": write_parquet}


def prepared(src, out, **kw):
    kw.setdefault("progress", False)
    prepare(list_files(str(src)), out, **kw)
    train, val, info = open_shards(out)
    return np.asarray(train), np.asarray(val), info["manifest"]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "jsonl.gz", "parquet"])
def test_each_format_gives_the_tokens_of_tiktoken_on_the_same_documents(tmp_path, fmt):
    if fmt == "text":
        src = write_text_files(tmp_path / "docs", DOCS)
    else:
        (tmp_path / "src").mkdir()
        src = WRITERS[fmt](tmp_path / "src" / f"corpus.{fmt}", DOCS)
    train, val, manifest = prepared(src, tmp_path / "out", val_fraction=0.0)
    assert len(val) == 0 and manifest["documents"] == len(DOCS)
    np.testing.assert_array_equal(train, reference(DOCS))
    assert manifest["max_token"] == int(train.max()) and manifest["dtype"] == "uint16"


def test_the_formats_agree_on_the_split_too(tmp_path):
    results = {}
    for fmt, write in WRITERS.items():
        (tmp_path / fmt).mkdir()
        write(tmp_path / fmt / f"corpus.{fmt}", DOCS)
        results[fmt] = prepared(tmp_path / fmt, tmp_path / f"out-{fmt}", val_fraction=0.3)[:2]
    for train, val in results.values():
        np.testing.assert_array_equal(train, results["jsonl"][0])
        np.testing.assert_array_equal(val, results["jsonl"][1])
    # ... and the split is the hash of each record's name `corpus#<index>`.
    in_val = [d for i, d in enumerate(DOCS) if is_val(f"corpus#{i}", 0.3)]
    in_train = [d for i, d in enumerate(DOCS) if not is_val(f"corpus#{i}", 0.3)]
    assert in_val and in_train
    np.testing.assert_array_equal(results["jsonl"][0], reference(in_train))
    np.testing.assert_array_equal(results["jsonl"][1], reference(in_val))


def test_workers_chunks_and_shard_sizes_do_not_change_the_tokens(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 5)
    base_train, base_val, base = prepared(src, tmp_path / "a", workers=1)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)  # many chunks in flight at once
    train, val, manifest = prepared(src, tmp_path / "b", workers=3, shard_tokens=97)
    np.testing.assert_array_equal(train, base_train)
    np.testing.assert_array_equal(val, base_val)
    assert len(manifest["splits"]["train"]["shards"]) == -(-len(train) // 97)
    assert all(s["tokens"] == 97 for s in manifest["splits"]["train"]["shards"][:-1])


SAFE_TEXT = st.lists(st.sampled_from(list("ab1. \n\t\r'\u00e9\u4e2d\u00a0\x1c!") + ["  ", "\n\n", "'s", "<|endoftext|>"]),
                     max_size=60).map("".join)


@given(text=SAFE_TEXT)
@settings(max_examples=200)
def test_a_safe_cut_never_changes_the_tokens(text):
    """The cut points a large text file is split at: left + right encode as the whole."""
    enc = gpt2_encoding()
    whole = enc.encode_ordinary(text)
    for m in sources.SAFE_CUT.finditer(text):
        cut = m.start()
        assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) == whole, (text, cut)


def test_a_large_text_file_is_streamed_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    text = "".join(f"line {i}: caf\u00e9  x{i} \u4e2d\u6587\n\n  indented {i}\tend\n" for i in range(400))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.txt").write_text(text)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 512)
    pieces = list(sources.read_chunks(list_files(str(tmp_path / "src"))))
    assert len(pieces) > 20 and pieces[1].continues == [True]
    train, val, manifest = prepared(tmp_path / "src", tmp_path / "out", val_fraction=0.0, workers=2)
    np.testing.assert_array_equal(train, reference([text]))
    assert manifest["documents"] == 1


@pytest.mark.parametrize("name_in_val", [False, True])
def test_one_document_is_split_by_position(tmp_path, name_in_val):
    # a file name whose hash sends the only document to train, or to val
    name = next(f"only{i}.txt" for i in range(1000) if is_val(f"only{i}.txt") == name_in_val)
    text = "".join(f"line {i} of a single document\n" for i in range(300))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_text(text)
    train, val, manifest = prepared(tmp_path / "src", tmp_path / "out", shard_tokens=100)
    whole = reference([text])
    assert manifest["split_by"] == "position" and len(val) == len(whole) // 10
    np.testing.assert_array_equal(np.concatenate([train, val]), whole)


def test_hidden_files_and_directories_are_not_documents(tmp_path):
    src = write_text_files(tmp_path / "docs", DOCS[:4])
    (src / ".git").mkdir()
    (src / ".git" / "index").write_bytes(b"DIRC\0\0\0\2")  # binary: an error if it were read
    (src / ".notes.txt").write_text("not a document")
    train, _, _ = prepared(src, tmp_path / "out", val_fraction=0.0)
    np.testing.assert_array_equal(train, reference(DOCS[:4]))


def test_a_glob_names_documents_as_its_directory_does_however_it_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "owt" / "part").mkdir(parents=True)
    write_jsonl(tmp_path / "owt" / "a.jsonl", DOCS[:20])
    write_jsonl(tmp_path / "owt" / "part" / "b.jsonl", DOCS[20:])
    monkeypatch.chdir(tmp_path)
    # the reference: the directory source, whose names are paths relative to it
    by_dir = list_files("owt")
    base_train, base_val, _ = prepared("owt", tmp_path / "out-dir", val_fraction=0.3)
    assert len(base_val) and len(base_train)
    for i, spec in enumerate(["owt/**/*.jsonl", "./owt/**/*.jsonl", f"{tmp_path}/owt/**/*.jsonl"]):
        files = list_files(spec)
        assert [f.name for f in files] == [f.name for f in by_dir] == ["a.jsonl", "part/b.jsonl"], spec
        assert data.cache_key(files) == data.cache_key(by_dir), spec
        train, val, _ = prepared(spec, tmp_path / f"out-{i}", val_fraction=0.3)
        np.testing.assert_array_equal(train, base_train)
        np.testing.assert_array_equal(val, base_val)


def test_val_from_another_source(tmp_path):
    src = write_text_files(tmp_path / "train", DOCS[:5])
    held_out = write_text_files(tmp_path / "held", DOCS[5:8])
    prepare(list_files(str(src)), tmp_path / "out", val_files=list_files(str(held_out)),
            val_description=str(held_out), progress=False)
    train, val, info = open_shards(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(train), reference(DOCS[:5]))
    np.testing.assert_array_equal(np.asarray(val), reference(DOCS[5:8]))
    assert info["manifest"]["split_by"] == "source"


def test_lone_surrogates_are_replaced_as_tiktoken_does(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n')  # valid JSON, not encodable as UTF-8
    train, _, _ = prepared(path, tmp_path / "out", val_fraction=0.0)
    np.testing.assert_array_equal(train, gpt2_encoding().encode_ordinary("a\ud800b"))


def test_vocabularies_past_65536_ids_get_uint32_shards(tmp_path, monkeypatch):
    assert shards.dtype_for(50257) == np.uint16 and shards.dtype_for(65536) == np.uint16
    assert shards.dtype_for(65537) == np.uint32
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    monkeypatch.setattr(pipeline, "dtype_for", lambda n: np.dtype(np.uint32))
    train, val, manifest = prepared(src, tmp_path / "out")
    assert manifest["dtype"] == "uint32" and train.dtype == np.uint32
    monkeypatch.undo()
    train16, val16, _ = prepared(src, tmp_path / "out16")
    np.testing.assert_array_equal(train, train16)
    np.testing.assert_array_equal(val, val16)


# --- bad input -------------------------------------------------------------------------

def bad_sources(tmp_path):
    """name -> (a source path, the error it must give)."""
    d = tmp_path / "bad"
    d.mkdir()
    cases = {}

    def case(name, content, match, filename=None):
        path = d / (filename or name)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        cases[name] = (path, match)

    case("malformed.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', r"malformed.jsonl line 4: not valid JSON")
    case("missing.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"line 2: no 'text' field \(its fields: body\)")
    case("number.jsonl", '{"text": 3}\n', r"line 1: 'text' is a int, not a string")
    case("list.jsonl", '[1, 2]\n', r"line 1: a list, not a JSON object")
    case("latin1.jsonl", '{"text": "a"}\n'.encode() + '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"line 2: not UTF-8")
    case("latin1.txt", "caf\u00e9".encode("latin-1"), r"latin1.txt is not UTF-8 text \(byte 3\)")
    case("binary.txt", b"\x7fELF\x00\x01", r"binary.txt is a binary file, not text")
    case("empty.txt", "", r"the files hold no text")
    case("spaces.jsonl", '{"text": "  "}\n', r"the files hold no text")
    case("truncated.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:30], r"truncated.jsonl.gz: cannot read it")
    return cases


def test_bad_input_is_an_error_naming_the_file_and_nothing_is_left(tmp_path):
    for name, (path, match) in bad_sources(tmp_path).items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(FgptError, match=match):
            prepare(list_files(str(path)), out, progress=False)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{name}")], name


def test_a_late_error_leaves_no_output_even_after_shards_were_written(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} " * 50}) + "\n" for i in range(3000)) + "{oops\n")
    with pytest.raises(FgptError, match="line 3001: not valid JSON"):
        prepare(list_files(str(path)), tmp_path / "out", shard_tokens=1000, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.jsonl"]


def test_parquet_without_the_column_or_without_pyarrow(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "c.parquet", DOCS, field="body")
    with pytest.raises(FgptError, match=r"has no column 'text' \(its columns: id, body\)"):
        prepare(list_files(str(path)), tmp_path / "out", progress=False)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(FgptError, match=r"pip install 'fgpt\[data\]'"):
        prepare(list_files(str(path)), tmp_path / "out", text_field="body", progress=False)


def test_force_replaces_the_output_only_once_the_new_one_is_complete(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "out"
    prepare(list_files(str(good)), out, progress=False)
    before = (out / "manifest.json").read_text()
    with pytest.raises(FgptError, match="already exists"):
        prepare(list_files(str(good)), out, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(FgptError, match="line 2"):
        prepare(list_files(str(bad)), out, force=True, progress=False)
    assert (out / "manifest.json").read_text() == before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.{dead}.x.tmp"  # what a killed run leaves: a hidden temporary with its pid
    live = tmp_path / f".out.{os.getpid()}.y.tmp"  # a run still at work
    for tmp in (stale, live):
        tmp.mkdir()
        (tmp / "train_000000.bin").write_bytes(b"\xff" * 10)
    prepare(list_files(str(write_jsonl(tmp_path / "other.jsonl", DOCS[:3]))), out, force=True,
            val_fraction=0.0, progress=False)
    np.testing.assert_array_equal(open_shards(out)[0], reference(DOCS[:3]))
    # the new run used neither temporary; it removed the dead run's and left the live one's
    assert not stale.exists()
    assert (live / "train_000000.bin").read_bytes() == b"\xff" * 10


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cases = bad_sources(tmp_path)
    for argv, match in [(["--data", str(cases["malformed.jsonl"][0])], "line 4: not valid JSON"),
                        (["--data", str(tmp_path / "nowhere")], "no such file or directory"),
                        (["--data", str(cases["malformed.jsonl"][0]), "--val", str(tmp_path / "nowhere")],
                         f"--val {tmp_path / 'nowhere'}: no such file or directory"),
                        (["--data", str(cases["malformed.jsonl"][0]), "--workers", "0"], "--workers must be at least 1")]:
        with pytest.raises(SystemExit) as e:
            from run._cli import main_guard
            main_guard(lambda: run_prepare.main([*argv, "--out", str(tmp_path / "out"), "--quiet"]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


@pytest.mark.slow  # a subprocess
def test_cli_end_to_end(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "out"
    ok = subprocess.run([sys.executable, "-m", "run.prepare", "--data", str(src), "--out", str(out),
                         "--val-fraction", "0.2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out) and "prepared" in ok.stderr
    assert json.loads((out / "manifest.json").read_text())["val_fraction"] == 0.2
    bad = subprocess.run([sys.executable, "-m", "run.prepare", "--data", str(src), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --out")


def test_the_cache_key_names_the_text_field_only_where_files_have_fields(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    write_jsonl(tmp_path / "b.jsonl", DOCS[:3])
    text, records = list_files(str(tmp_path / "a.txt")), list_files(str(tmp_path))
    assert data.cache_key(text, text_field="body") == data.cache_key(text)  # the same tokens: one cache
    assert data.cache_key(records, text_field="body") != data.cache_key(records)
