"""Helpers over parameter trees: nested dicts (and the `h` list) of tensors.

A tree's dotted paths are exactly the HF safetensors keys (`h.0.attn.c_attn.weight`), so
loading and saving are key-path transforms, not renaming tables.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
import torch

Tree = Any  # nested dict / list of tensors
NAMESPACE = "fgpt"  # optree's registry of the node types these trees may hold (fgpt/inference/int8.py's)
# The float dtypes by their command-line names: the inference tools' --dtype spells them as
# torch does; a training run's --precision and --reduce-dtype as nanoGPT / torchtitan do.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flatten(tree: Tree) -> dict[str, torch.Tensor]:
    """Nested tree -> {"h.0.attn.c_attn.weight": tensor, ...} (optree's sorted leaf order)."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return {_key(p): leaf for p, leaf in zip(paths, leaves)}


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """Inverse of `flatten`: dotted keys -> nested dicts; all-digit key sets become lists."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _lists_from_digit_dicts(root)


def _lists_from_digit_dicts(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _lists_from_digit_dicts(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        indices = sorted(int(k) for k in node)
        if indices == list(range(len(indices))):
            return [node[str(i)] for i in indices]
    return node


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree) -> Tree:
    return optree.tree_map(fn, tree, namespace=NAMESPACE)


def leaves(tree: Tree, is_leaf: Callable[[Any], bool] | None = None) -> list:
    return optree.tree_leaves(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def cast(tree: Tree, dtype: torch.dtype) -> Tree:
    """Cast floating-point leaves to `dtype` (integer leaves stay as they are)."""
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def count(tree: Tree) -> int:
    return sum(x.numel() for x in leaves(tree))


def weight_decayed(shape) -> bool:
    """AdamW's weight decay applies to matrices and embeddings (>= 2-D leaves), not to biases
    or layer-norm gains (1-D): one rule for every strategy's optimizer."""
    return len(shape) >= 2
