"""A restricted vocabulary: the corpus's most frequent GPT-2 ids, every other id one UNK.

With the full 50257-id vocabulary the tied embedding of a small GPT-2 holds most of its
parameters and FLOPs (the report's Setup table gives the shares), and attention variants
change little of what the model spends on.
Keeping the `size - 1` most frequent training ids (new ids in order of frequency) and
mapping the rest to UNK = size - 1 leaves real text whose prediction needs context; UNK
targets are left out of the loss (`Corpus.ignore_id`), so no model gains by predicting UNK.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgpt import data
from fgpt.data.tokenizer import EOT, gpt2_encoding

GPT2_IDS = EOT + 1


@dataclass(frozen=True)
class Vocab:
    kept: np.ndarray  # new id -> GPT-2 id, for the size - 1 kept ids
    coverage_train: float  # share of training tokens kept (not UNK)
    coverage_val: float
    complete: bool = False  # every GPT-2 id kept: no UNK id (`unk` is then one past the last id)

    @property
    def size(self) -> int:
        return len(self.kept) + (0 if self.complete else 1)

    @property
    def unk(self) -> int:
        return len(self.kept)

    @property
    def eot(self) -> int | None:
        hits = np.nonzero(self.kept == EOT)[0]
        return int(hits[0]) if len(hits) else None

    def lookup(self) -> np.ndarray:
        """GPT-2 id -> new id (UNK for ids not kept)."""
        table = np.full(GPT2_IDS, self.unk, dtype=np.uint16)
        table[self.kept] = np.arange(len(self.kept), dtype=np.uint16)
        return table

    def decode(self, ids) -> str:
        """Text of new ids; UNK reads as a visible mark."""
        enc = gpt2_encoding()
        out, run = [], []
        for i in ids:
            if int(i) == self.unk:
                out.append(enc.decode(run) + "\u2047")  # ⁇
                run = []
            else:
                run.append(int(self.kept[int(i)]))
        return "".join(out) + enc.decode(run)


def restrict(corpus: data.Corpus, size: int) -> tuple[data.Corpus, Vocab]:
    """The corpus in a vocabulary of `size` ids (the size - 1 most frequent training ids,
    ties broken by id, then UNK)."""
    counts = np.bincount(np.asarray(corpus.train), minlength=GPT2_IDS)
    order = np.lexsort((np.arange(GPT2_IDS), -counts))  # by count, descending; then by id
    kept = order[:size - 1]
    kept = kept[counts[kept] > 0]
    vocab = Vocab(kept=kept, coverage_train=float(counts[kept].sum() / max(1, counts.sum())), coverage_val=0.0)
    table = vocab.lookup()
    train, val = table[np.asarray(corpus.train)], table[np.asarray(corpus.val)]
    vocab = Vocab(kept=kept, coverage_train=vocab.coverage_train,
                  coverage_val=float((val != vocab.unk).mean()) if len(val) else 0.0)
    restricted = data.Corpus(train=train, val=val, cache_dir=None, ignore_id=vocab.unk,
                             description=f"{corpus.description}, its {len(kept)} most frequent GPT-2 ids + UNK")
    return restricted, vocab


def full_vocab() -> Vocab:
    """GPT-2's own vocabulary, unrestricted (the gpu and gpt2 budgets)."""
    return Vocab(kept=np.arange(GPT2_IDS), coverage_train=1.0, coverage_val=1.0, complete=True)
