"""A plain GPT-2 checkpoint as a GGUF file for llama.cpp (`python -m run.convert --to-gguf`).

    write_gguf(path, config, params, "q8_0")      # f32 | f16 | q8_0

What llama.cpp's own converter (convert_hf_to_gguf.py, class GPT2Model) writes for an HF
GPT-2 checkpoint, through the same `gguf` package:
- architecture `gpt2`; `gpt2.block_count`, `.context_length`, `.embedding_length`,
  `.feed_forward_length` (4d), `.attention.head_count`, `.attention.layer_norm_epsilon`;
  `general.file_type` and `general.quantization_version`;
- tensors renamed by gguf's GPT-2 table (wte -> token_embd, wpe -> position_embd, h.N.ln_1 ->
  blk.N.attn_norm, attn.c_attn -> attn_qkv, attn.c_proj -> attn_output, ln_2 -> ffn_norm,
  mlp.c_fc -> ffn_up, mlp.c_proj -> ffn_down, ln_f -> output_norm); the Conv1D weights
  transposed to [out, in]; no `output` tensor (the head is tied: llama.cpp reuses token_embd);
- in f16 / q8_0 files the 2-D weights take that type, except position_embd, which stays f32
  as do biases and norms; a weight whose rows do not split into q8_0's 32-value blocks falls
  back to f16, as the converter does;
- the tokenizer: `tokenizer.ggml.model` gpt2, `.pre` gpt-2, the 50257 byte-level tokens in id
  order (type normal, <|endoftext|> control), the 50000 merges, bos = eos = 50256; a vocabulary
  padded past 50257 (nanoGPT's 50304) gets llama.cpp's `[PAD{id}]` entries, type unused.
llama.cpp's gpt2 has learned positions, full causal attention and one K/V head per query head,
so a rotary, grouped-query or windowed model is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.data.tokenizer import EOT, _verified
from fgpt.errors import FgptError

TYPES = ("f32", "f16", "q8_0")
# fgpt's dotted path (block part stripped) -> gguf's name
NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
         "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
         "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
         "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_VOCAB = EOT + 1
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # gguf.TokenType


def gguf_module():
    try:
        import gguf
    except ModuleNotFoundError:
        raise FgptError("--to-gguf needs the gguf package: pip install 'fgpt[gguf]' (or pip install gguf)") from None
    return gguf


def check_exportable(config: GPTConfig) -> None:
    """llama.cpp's gpt2 architecture has none of the variants: one line naming what is not."""
    variants = [name for name, present in (("rotary positions (pos_emb=rope)", config.pos_emb == "rope"),
                                           (f"grouped-query attention (n_kv_head={config.n_kv_head})",
                                            config.kv_heads != config.n_head),
                                           (f"sliding-window attention (window={config.window})",
                                            any(w is not None for w in config.layer_windows)))
                if present]
    if variants:
        raise FgptError(f"--to-gguf: llama.cpp's gpt2 architecture has no {' or '.join(variants)}; "
                        "only a plain GPT-2 converts")
    if config.vocab_size < GPT2_VOCAB:
        raise FgptError(f"--to-gguf: vocab_size {config.vocab_size} is smaller than GPT-2's {GPT2_VOCAB}: "
                        "the file carries the GPT-2 tokenizer, which would not fit")


def gguf_name(path: str) -> str:
    """fgpt dotted path -> GGUF tensor name (h.3.attn.c_attn.weight -> blk.3.attn_qkv.weight)."""
    if path in NAMES:
        return NAMES[path]
    _, block, rest = path.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{block}.{NAMES[module]}.{leaf}"


def gguf_tensors(config: GPTConfig, params: dict) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in llama.cpp's layout (linear weights transposed to [out, in])."""
    out = {}
    for path, t in tree.flatten(params).items():
        t = t.detach().to("cpu", torch.float32)
        if path.startswith("h.") and path.endswith(".weight") and t.ndim == 2:
            t = t.T  # Conv1D [in, out] -> [out, in]
        out[gguf_name(path)] = np.ascontiguousarray(t.numpy())
    return out


def tensor_type(gguf, name: str, array: np.ndarray, file_type: str):
    """The converter's rule: 1-D, norms, biases and position_embd f32; other weights the file's type."""
    if file_type == "f32" or array.ndim <= 1 or not name.endswith(".weight") or name.startswith("position_embd"):
        return gguf.GGMLQuantizationType.F32
    if file_type == "f16":
        return gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    return gguf.GGMLQuantizationType.Q8_0 if array.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def vocabulary(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """GPT-2's byte-level tokens in id order, their types and the BPE merges, from the same
    official files the tokenizer reads (fgpt/data/tokenizer.py)."""
    encoder = json.loads(Path(_verified("encoder.json")).read_text(encoding="utf-8"))
    by_id = {i: token for token, i in encoder.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TOKEN_CONTROL if i == EOT else TOKEN_NORMAL if i in by_id else TOKEN_UNUSED for i in range(vocab_size)]
    lines = Path(_verified("vocab.bpe")).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line.strip()]  # the first line is '#version: 0.2'
    return tokens, types, merges


def write_gguf(path: str | Path, config: GPTConfig, params: dict, file_type: str = "f16",
               name: str = "fgpt") -> Path:
    """Write `params` (a plain GPT-2 of `config`) to the GGUF file `path`; returns it."""
    if file_type not in TYPES:
        raise FgptError(f"--to-gguf must be one of {', '.join(TYPES)}, got {file_type!r}")
    check_exportable(config)
    gguf = gguf_module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT)
    writer.add_eos_token_id(EOT)
    for tensor_name, array in gguf_tensors(config, params).items():
        qtype = tensor_type(gguf, tensor_name, array, file_type)
        writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
