"""Multiple-choice scoring against transformers scoring every ending on its own, and the
HellaSwag reader's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from fgpt import FgptError, load_checkpoint
from fgpt.evaluation.multiple_choice import Question, accuracy, read_questions, score_endings
from hf_reference import hf_model


def hf_ending_logprob(model, context: list[int], ending: list[int]) -> float:
    """One unpadded sequence per ending; the context cut from the left to fit n_ctx."""
    context = context[max(0, len(context) + len(ending) - model.config.n_positions):]
    ids = torch.tensor([context + ending])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(ending))


def random_questions(n: int, vocab: int, n_ctx: int, seed: int) -> list[Question]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist())

    # contexts from 1 token to past n_ctx (cut from the left), 2-5 endings of 1-8 tokens
    return [Question(ids(1, n_ctx + 10), tuple(ids(1, 9) for _ in range(int(torch.randint(2, 6, (1,), generator=g)))),
                     int(torch.randint(0, 2, (1,), generator=g))) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_ending_scores_match_transformers(batch_size, tmp_path):
    model = hf_model(101, 24, 2, 4, 32, seed=batch_size, init=0.5)
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    questions = random_questions(8, 101, 24, seed=batch_size)
    scores = score_endings(params, config, questions, batch_size=batch_size, progress=False)
    ref = [[hf_ending_logprob(model, list(q.context), list(e)) for e in q.endings] for q in questions]
    for q, sc, r in zip(questions, scores, ref):
        assert [n for _, n in sc] == [len(e) for e in q.endings]
        assert [s for s, _ in sc] == pytest.approx(r, rel=1e-4, abs=1e-4)
    # the accuracies from the reference's own scores, picked with torch's argmax
    acc = sum(int(torch.tensor(r).argmax()) == q.label for q, r in zip(questions, ref))
    acc_norm = sum(int(torch.tensor([s / len(e) for s, e in zip(r, q.endings)]).argmax()) == q.label
                   for q, r in zip(questions, ref))
    assert accuracy(questions, scores) == {"acc": acc / 8, "acc_norm": acc_norm / 8, "n": 8}


@given(st.lists(st.lists(st.tuples(st.floats(-50, 0), st.integers(1, 9)), min_size=2, max_size=5),
                min_size=1, max_size=6), st.data())
def test_accuracy_counts_argmax_of_sum_and_of_mean(scores, data):
    questions = [Question((1,), ((1,),) * len(sc), data.draw(st.integers(0, len(sc) - 1))) for sc in scores]
    result = accuracy(questions, scores)
    # numpy's argmax: the first of tied maxima (hypothesis draws ties, at 0 and -50 say)
    by_sum = [int(np.argmax([s for s, _ in sc])) for sc in scores]
    by_mean = [int(np.argmax([s / n for s, n in sc])) for sc in scores]
    assert result["n"] == len(scores)
    assert result["acc"] == sum(p == q.label for p, q in zip(by_sum, questions)) / len(scores)
    assert result["acc_norm"] == sum(p == q.label for p, q in zip(by_mean, questions)) / len(scores)


def test_reader_tokenises_ctx_and_space_prefixed_endings(tmp_path):
    from fgpt.data.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"ctx": "A man sits down.", "endings": ["He eats.", "She runs"], "label": 1})
                    + "\n\n" + json.dumps({"ctx": "x", "endings": ["a", "b", "c"], "label": "2"}) + "\n")
    first, second = read_questions(path)
    assert first.context == tuple(enc.encode_ordinary("A man sits down."))
    assert first.endings == (tuple(enc.encode_ordinary(" He eats.")), tuple(enc.encode_ordinary(" She runs")))
    assert (first.label, second.label) == (1, 2)
    assert len(read_questions(path, limit=1)) == 1


@pytest.mark.parametrize("line, message", [
    ('{"endings": ["a", "b"], "label": 0}', "missing field ctx"),
    ('{"ctx": "c", "label": 0}', "missing field endings"),
    ('{"ctx": "c", "endings": ["a", "b"]}', "missing field label"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": 2}', "label 2 is out of range for 2 endings"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": -1}', "label -1 is out of range"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": true}', "label must be an integer"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": 0.5}', "label must be an integer"),
    ('{"ctx": "c", "endings": "ab", "label": 0}', "endings must be a list of at least two strings"),
    ('{"ctx": "c", "endings": ["a"], "label": 0}', "endings must be a list of at least two strings"),
    ('{"ctx": "c", "endings": ["a", 3], "label": 0}', "endings must be a list"),
    ('{"ctx": "", "endings": ["a", "b"], "label": 0}', "ctx must be a non-empty string"),
    ('["ctx", "endings"]', "expected a JSON object"),
    ('{"ctx": "c", ', "not JSON"),
])
def test_bad_questions_name_their_line(line, message, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"ctx": "ok", "endings": ["a", "b"], "label": 0}\n' + line + "\n")
    with pytest.raises(FgptError, match=f"q.jsonl:2: {message}"):
        read_questions(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(FgptError, match="holds no questions"):
        read_questions(tmp_path / "empty.jsonl")
    with pytest.raises(FgptError, match="cannot read"):
        read_questions(tmp_path / "missing.jsonl")


def test_ending_longer_than_the_context_window_is_refused(tmp_path):
    model = hf_model(101, 24, 1, 1, 16)
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    with pytest.raises(FgptError, match="ending 1 has 24 tokens"):
        score_endings(params, config, [Question((1, 2), ((3,), (4,) * 24), 0)], progress=False)
    with pytest.raises(FgptError, match="token id 101 is outside"):
        score_endings(params, config, [Question((1, 2), ((3,), (101,)), 0)], progress=False)
