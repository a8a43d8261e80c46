"""Checkpoints in the Hugging Face GPT-2 safetensors layout, both ways.

    config, params = load_checkpoint("path/to/dir_or_file.safetensors", dtype=torch.bfloat16)
    save_checkpoint("out/run", config, params)   # model.safetensors + config.json, atomically

Loading is a key-path transform (`tree.unflatten`), after two normalisations of the HF
files in the wild: `GPT2LMHeadModel.save_pretrained` prefixes keys with `transformer.`
(and may store a tied `lm_head.weight`); hub files have no prefix and carry
`h.N.attn.bias` / `h.N.attn.masked_bias` mask buffers.

Safetensors comes first. A directory holding only `pytorch_model.bin` (many hub fine-tunes)
loads through `torch.load(weights_only=True)`: its restricted unpickler builds tensors and
plain containers and refuses every other global before calling it, so no code in the file
runs; anything but a flat {name: tensor} mapping is then refused too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fgpt import tree
from fgpt.atomic import atomic_path, atomic_write_text
from fgpt.config import GPTConfig
from fgpt.errors import FgptError
from fgpt.model import param_shapes

log = logging.getLogger("fgpt")

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")  # torch.save files, read tensors-only
CONFIG = "config.json"
HF_PREFIX = "transformer."
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # hub files' causal-mask buffers
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `gpt2`, `openai-community/gpt2`


# --- loading -----------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[GPTConfig, dict]:
    """A safetensors file, a directory holding one (or a sharded set with its index), or a
    hub name -> (config, params). The config comes from the config.json beside the weights,
    else from tensor shapes (see `infer_config`). `dtype` casts floating-point tensors."""
    config, where, keys = _opened(path, device)

    def read(hf_key: str) -> torch.Tensor:
        t = where[hf_key].tensor(hf_key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    flat = {ours: read(hf) for ours, hf in keys.items()}
    if "lm_head.weight" in where:
        _check_tied(read("lm_head.weight"), flat["wte.weight"], path)
    return config, tree.unflatten(flat)


def checkpoint_config(path: str | os.PathLike) -> GPTConfig:
    """The config `load_checkpoint(path)` would return, checked against the tensors' shapes
    without reading the tensors."""
    return _opened(path, "cpu")[0]


def _opened(path, device) -> tuple[GPTConfig, dict, dict[str, str]]:
    """(config, {HF key: the open file holding it}, {our key: HF key}) of a checkpoint."""
    files, config_json = _resolve(path)
    handles = [_open(f, device) for f in files]
    where = {}  # HF key -> the open file holding it
    for h in handles:
        where |= {k: h for k in h.keys()}
    keys = _normalise_keys(list(where), path)
    shapes = {ours: where[hf].shape(hf) for ours, hf in keys.items()}
    config = GPTConfig.from_json(config_json) if config_json else infer_config(shapes)
    _check_against(config, shapes, path, from_json=config_json is not None)
    if config_json is None:
        log.warning("no config.json beside %s: inferred n_layer=%d n_head=%d n_kv_head=%s pos_emb=%s "
                    "from tensor shapes", path, config.n_layer, config.n_head, config.n_kv_head, config.pos_emb)
    return config, where, keys


def _resolve(path) -> tuple[list[Path], Path | None]:
    """The weight files to read and the config.json beside them (None when absent)."""
    p = Path(path).expanduser()
    if not p.exists():
        if _looks_like_hub_name(str(path)):
            return _resolve(_download(str(path)))
        raise FgptError(f"checkpoint not found: {path}")
    if p.is_dir():
        p = _weights_in(p)
    config = p.parent / CONFIG
    config = config if config.is_file() else None
    if p.name.endswith(".index.json"):
        return _shards(p), config
    return [p], config


def _weights_in(directory: Path) -> Path:
    """The weights of a directory: safetensors when there is any, else pytorch_model.bin."""
    for name in (INDEX, WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) > 1:
        raise FgptError(f"{directory} holds several .safetensors files and no {INDEX}: "
                        "pass the file to load")
    if found:
        return found[0]
    for name in (PICKLE_INDEX, PICKLE_WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    raise FgptError(f"no {WEIGHTS} or {PICKLE_WEIGHTS} in {directory}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FgptError(f"bad shard index {index}: {e}") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FgptError(f"shard index {index} names missing files: {', '.join(missing)}")
    return files


def _open(file: Path, device):
    return _TorchFile(file, device) if file.suffix in PICKLE_SUFFIXES else _SafetensorsFile(file, device)


class _SafetensorsFile:
    """A memory-mapped safetensors file: tensors are read only when asked for."""

    def __init__(self, file: Path, device):
        try:
            self._file = safe_open(str(file), framework="pt", device=str(device))
        except (SafetensorError, OSError) as e:
            raise FgptError(f"{file} is not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


class _TorchFile:
    """A torch.save file of tensors alone (`pytorch_model.bin`), unpickled with
    weights_only=True: globals outside torch's allowlist (os.system, any class) are refused
    before they are called."""

    def __init__(self, file: Path, device):
        try:  # zip-format files (torch >= 1.6) map lazily; legacy ones are read whole
            with warnings.catch_warnings():  # e.g. "pickle protocol 4" before refusing a plain pickle
                warnings.simplefilter("ignore")
                loaded = torch.load(file, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # torch's errors on foreign files are many (UnpicklingError, RuntimeError, EOFError...)
            raise FgptError(f"{file} is not a tensors-only torch file; refused without running "
                            f"anything in it ({_why(e)})") from None
        if not isinstance(loaded, dict):
            raise FgptError(f"{file} holds an object of type {type(loaded).__name__}, not a mapping "
                            "of tensor names to tensors")
        bad = [k for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if bad:
            raise FgptError(f"{file}: {bad[0]!r} is of type {type(loaded[bad[0]]).__name__}, not a tensor "
                            "(fgpt reads tensors-only files: a state_dict as save_pretrained writes it)")
        self._tensors = {k: v.detach() for k, v in loaded.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _why(e: Exception) -> str:
    """The telling line of torch's (long, multi-line) load error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if "unsupported" in line.lower()]  # names the refused global
    return (telling or lines or [type(e).__name__])[0]


def _normalise_keys(hf_keys: list[str], path) -> dict[str, str]:
    """fgpt key -> HF key: drops the `transformer.` prefix, mask buffers and a tied lm_head."""
    keys = {}
    for k in hf_keys:
        if k == "lm_head.weight":
            continue  # checked against wte once read
        ours = k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k
        if _MASK_BUFFER.fullmatch(ours):
            continue
        if ours in keys:
            raise FgptError(f"{path}: {ours} appears both with and without the '{HF_PREFIX}' prefix")
        keys[ours] = k
    return keys


def _check_against(config: GPTConfig, shapes: dict, path, *, from_json: bool) -> None:
    """Every tensor the config needs is present with its shape, and nothing else is."""
    expected = param_shapes(config)
    missing = [k for k in expected if k not in shapes]
    unknown = [k for k in shapes if k not in expected]
    if missing:
        raise FgptError(f"{path}: missing keys {_names(missing)}")
    if unknown:
        raise FgptError(f"{path}: unknown keys {_names(unknown)}")
    for k, shape in expected.items():
        if shapes[k] != shape:
            source = "config.json says" if from_json else "expected"
            raise FgptError(f"{path}: {k} has shape {list(shapes[k])} but {source} {list(shape)}")


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_tied(lm_head: torch.Tensor, wte: torch.Tensor, path) -> None:
    if lm_head.shape != wte.shape or not torch.equal(lm_head, wte):
        raise FgptError(f"{path}: lm_head.weight differs from wte.weight; fgpt ties the LM head to wte")


def infer_config(shapes: dict[str, tuple[int, ...]]) -> GPTConfig:
    """A config from tensor shapes alone, for files without a config.json.

    Shapes give vocab_size, n_embd, n_layer, n_ctx (from wpe) and the c_attn width, but not
    the head count. Rule: the head size is GPT-2's 64 when it divides n_embd (true for
    every GPT-2 size), else the largest divisor of n_embd below 64; n_kv_head then follows
    from the c_attn width. Without wpe the model is rotary and n_ctx defaults to 1024.
    A sliding window cannot be seen in shapes at all: ship a config.json for those.
    """
    def need(key):
        if key not in shapes:
            raise FgptError(f"cannot infer a config: no {key} tensor (and no config.json)")
        return shapes[key]

    vocab_size, n_embd = need("wte.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"h\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    head_dim = max(h for h in range(1, min(64, n_embd) + 1) if n_embd % h == 0)
    n_head = n_embd // head_dim
    qkv_heads = need("h.0.attn.c_attn.weight")[-1] // head_dim if n_layer else 3 * n_head
    n_kv_head = (qkv_heads - n_head) // 2
    wpe = shapes.get("wpe.weight")
    return GPTConfig(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_kv_head=None if n_kv_head == n_head else n_kv_head,
                     n_ctx=wpe[0] if wpe else 1024, pos_emb="learned" if wpe else "rope")


# --- the hub (optional) ------------------------------------------------------------------

def _looks_like_hub_name(name: str) -> bool:
    return bool(_HUB_REPO.fullmatch(name)) and not name.endswith((".safetensors", ".json", *PICKLE_SUFFIXES))


def _download(repo: str) -> Path:
    local_hint = (f"download {WEIGHTS} and {CONFIG} from https://huggingface.co/{_hub_repo(repo)}"
                  " on a machine with network and pass their folder: --checkpoint DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FgptError(f"checkpoint {repo!r} is not a local path and huggingface_hub is not "
                        f"installed (pip install 'fgpt[hub]'); or {local_hint}") from None
    try:
        local = Path(snapshot_download(_hub_repo(repo), allow_patterns=[WEIGHTS, INDEX, "*.safetensors", CONFIG]))
        if not any(local.glob("*.safetensors")):  # many fine-tunes ship only the pickle
            local = Path(snapshot_download(_hub_repo(repo), allow_patterns=[
                PICKLE_WEIGHTS, PICKLE_INDEX, "pytorch_model-*.bin", CONFIG]))
        return local
    except Exception as e:  # offline, unknown repo, ...: the hub's own errors are many and long
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FgptError(f"checkpoint {repo!r} is not a local path and the hub could not provide it "
                        f"({first}); {local_hint}") from None


def _hub_repo(name: str) -> str:
    return name if "/" in name else f"openai-community/{name}"


# --- saving ------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, config: GPTConfig, params: dict) -> Path:
    """Write `path/model.safetensors` + `path/config.json` in the layout
    `GPT2LMHeadModel.save_pretrained` uses (keys prefixed `transformer.`, tied head not
    stored). Each file is written to a temporary name in the same directory and moved into
    place with os.replace, so a reader (or a crash) never sees half a file."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    flat = {HF_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tree.flatten(params).items()}
    _check_against(config, {k[len(HF_PREFIX):]: tuple(v.shape) for k, v in flat.items()}, out,
                   from_json=False)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(flat, tmp, metadata={"format": "pt"})
    atomic_write_text(out / CONFIG, json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return out


def latest_checkpoint(root: str | os.PathLike = "out") -> Path:
    """The directory under `root` whose model.safetensors was written last (a training run's
    own directory rather than its checkpoints/step-N, whose file it links to)."""
    found = list(Path(root).glob(f"**/{WEIGHTS}"))
    if not found:
        raise FgptError(f"no checkpoint under {root}/: train one with `just train`, or pass --checkpoint PATH")
    return max(found, key=lambda f: (f.stat().st_mtime, -len(f.parts))).parent
