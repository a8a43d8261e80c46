"""Multiple-choice scoring by completion, as GPT-2 HellaSwag evaluations do it.

    questions = read_questions("hellaswag_val.jsonl")   # {"ctx", "endings", "label"} per line
    scores = score_endings(params, config, questions)   # per question, per ending: (sum, n)
    accuracy(questions, scores)                         # {"acc", "acc_norm", "n"}

Each ending is the tokens of `" " + ending` after the tokens of `ctx`; its score is the
summed log-probability of those tokens given everything before them. `acc` picks the ending
with the highest sum, `acc_norm` the highest mean per ending token (llm.c's hellaswag.py,
which reports acc_norm 0.2955 for GPT-2 124M on HellaSwag's 10,042 validation questions).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fgpt.config import GPTConfig
from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError, check_at_least
from fgpt.model import forward

log = logging.getLogger("fgpt")


@dataclass(frozen=True)
class Question:
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int


# --- reading ---------------------------------------------------------------------------------

def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """A JSONL file in HellaSwag's layout, tokenised with GPT-2's BPE. `label` may be an
    integer or a string of digits (HF datasets store HellaSwag's labels as strings)."""
    enc = gpt2_encoding()
    if Path(path).is_dir():
        raise FgptError(f"--data {path} is a directory: --task mc reads one JSONL file of questions")
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is dropped
    except OSError as e:
        raise FgptError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FgptError(f"{path} is not UTF-8 text (byte {e.start})") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(questions) == limit:
            break
        if not line.strip():
            continue
        ctx, endings, label = _fields(line, f"{path}:{number}")
        questions.append(Question(tuple(enc.encode_ordinary(ctx)),
                                  tuple(tuple(enc.encode_ordinary(" " + e)) for e in endings), label))
    if not questions:
        raise FgptError(f"{path} holds no questions (one JSON object a line: ctx, endings, label)")
    return questions


def _fields(line: str, where: str) -> tuple[str, list[str], int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise FgptError(f"{where}: not JSON ({e})") from None
    if not isinstance(row, dict):
        raise FgptError(f"{where}: expected a JSON object with ctx, endings and label")
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        raise FgptError(f"{where}: missing field {', '.join(missing)}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx:
        raise FgptError(f"{where}: ctx must be a non-empty string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise FgptError(f"{where}: endings must be a list of at least two strings")
    empty = [i for i, e in enumerate(endings) if not e.strip()]
    if empty:
        raise FgptError(f"{where}: ending {empty[0]} is empty (an empty ending would be scored as one space)")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise FgptError(f"{where}: label must be an integer, got {row['label']!r}")
    if not 0 <= label < len(endings):
        raise FgptError(f"{where}: label {label} is out of range for {len(endings)} endings")
    return ctx, endings, label


# --- scoring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    question: int
    ending: int
    tokens: tuple[int, ...]  # context (left-truncated to fit n_ctx) + ending
    start: int  # index of the ending's first token in `tokens`


def _rows(questions: list[Question], n_ctx: int) -> list[_Row]:
    rows, truncated = [], 0
    for qi, q in enumerate(questions):
        for ei, ending in enumerate(q.endings):
            if len(ending) >= n_ctx:
                raise FgptError(f"question {qi + 1}: ending {ei} has {len(ending)} tokens; with at least "
                                f"one token of context that exceeds n_ctx={n_ctx}")
            context = q.context[max(0, len(q.context) + len(ending) - n_ctx):]  # keep the nearest
            truncated += len(context) < len(q.context)
            rows.append(_Row(qi, ei, context + ending, len(context)))
    if truncated:
        log.warning("%d ending(s) had their context cut from the left to fit n_ctx=%d", truncated, n_ctx)
    return rows


@torch.inference_mode()
def _score_batch(params: dict, config: GPTConfig, rows: list[_Row], device) -> list[float]:
    """Summed log-probability of each row's ending. Rows are right-padded: causal attention
    keeps the padding out of every scored position."""
    T = max(len(r.tokens) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r.tokens)] = torch.tensor(r.tokens)
    x = x.to(device)
    lo, hi = min(r.start for r in rows) - 1, T - 1  # logits at j predict token j + 1
    logits = forward(params, x[:, :-1], config, logits_for=slice(lo, hi))  # [B, hi - lo, V]
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), x[:, lo + 1:].flatten(), reduction="none")
    logp = logp.view(len(rows), hi - lo)
    position = torch.arange(lo + 1, T, device=x.device)  # the token each column scores
    starts = torch.tensor([r.start for r in rows], device=x.device)
    ends = torch.tensor([len(r.tokens) for r in rows], device=x.device)
    scored = (position[None] >= starts[:, None]) & (position[None] < ends[:, None])
    return (logp * scored).sum(1).tolist()


def score_endings(params: dict, config: GPTConfig, questions: list[Question], *, batch_size: int = 8,
                  device: torch.device | str = "cpu", progress: bool = True) -> list[list[tuple[float, int]]]:
    """(summed log-probability, token count) of every ending of every question. Rows run in
    batches of similar length (longest first), so little of a batch is padding."""
    check_at_least("--batch-size", batch_size, 1)
    bad = [t for q in questions for t in q.context + sum(q.endings, ()) if not 0 <= t < config.vocab_size]
    if bad:
        raise FgptError(f"token id {bad[0]} is outside the model's vocabulary of {config.vocab_size}")
    rows = sorted(_rows(questions, config.n_ctx), key=lambda r: -len(r.tokens))
    scores = [[(0.0, 0)] * len(q.endings) for q in questions]
    with tqdm(total=len(rows), unit="ending", desc="multiple choice", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            for r, s in zip(batch, _score_batch(params, config, batch, device)):
                scores[r.question][r.ending] = (s, len(r.tokens) - r.start)
            bar.update(len(batch))
    return scores


def accuracy(questions: list[Question], scores: list[list[tuple[float, int]]]) -> dict:
    """acc: the label has the highest summed log-probability; acc_norm: the highest mean per
    ending token. Ties go to the first ending, as argmax does."""
    def pick(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))

    acc = sum(pick([s for s, _ in sc]) == q.label for q, sc in zip(questions, scores))
    acc_norm = sum(pick([s / n for s, n in sc]) == q.label for q, sc in zip(questions, scores))
    n = len(questions)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
