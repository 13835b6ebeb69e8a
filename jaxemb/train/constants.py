"""Trees that are used but never trained (pretrained encoders, frozen tables), and trees read from disk.

`place_tree` puts a tree of host or device arrays on the mesh, each leaf sharded by its logical axis
names; every process materialises only its own shards (no compiled program holds the values).
`save_tree` / `load_tree` write and read such a tree as an orbax checkpoint; `load_tree` checks the saved
tree against the expected one first and names the missing, extra or mis-shaped leaf.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A subtree read from `path` (written by save_tree). `like`: the expected tree (arrays or
    ShapeDtypeStructs, optionally boxed with logical axis names, e.g. jax.eval_shape(model.init, ...))."""
    path: str
    like: Any = None


def logical(value, names: tuple):
    """Boxes `value` with logical axis names, e.g. logical(table, ("vocab", "embed"))."""
    return nn.LogicallyPartitioned(value=value, names=tuple(names))


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_of(tree, mesh, rules):
    """NamedShardings from the logical names of boxed leaves (unboxed leaves are replicated)."""
    def one(x):
        if _is_box(x):
            spec = nn.logical_to_mesh_axes(x.names, rules)
            return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, tree, is_leaf=_is_box)


def unbox(tree):
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def _place(value, sharding):
    if isinstance(value, jax.Array):
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def place_tree(tree, mesh, rules):
    """Host arrays (optionally boxed), jax arrays (kept as placed) and Pretrained subtrees (read from disk)
    -> sharded jax arrays."""
    def one(x):
        if isinstance(x, Pretrained):
            return load_tree(x.path, x.like, mesh, rules)
        if isinstance(x, jax.Array) and not _is_box(x):
            return x  # already placed (e.g. another trainer's parameters): keeps its sharding
        return _place(unbox(x), shardings_of(x, mesh, rules))
    return jax.tree.map(one, tree, is_leaf=lambda x: _is_box(x) or isinstance(x, Pretrained))


def save_tree(path: str, tree) -> str:
    """Writes `tree` (arrays, boxes allowed) to the new directory `path` (atomically, by orbax)."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, unbox(tree))
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def _saved_leaves(path: str) -> dict:
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(path)
    finally:
        ckptr.close()
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    return {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}


def check_tree(path: str, like) -> None:
    """Raises ValueError naming the first leaf of `like` missing from, or shaped differently in, `path`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved tree at {path} (expected a directory written by save_tree)")
    saved = _saved_leaves(path)
    want = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(unbox(like))[0]}
    for key, x in want.items():
        if key not in saved:
            raise ValueError(f"{path}: leaf {key!r} is missing (saved leaves: {', '.join(sorted(saved)[:8])}"
                             f"{' ...' if len(saved) > 8 else ''})")
        shape = tuple(getattr(saved[key], "shape", ()))
        if shape != tuple(x.shape):
            raise ValueError(f"{path}: leaf {key!r} has shape {shape}, expected {tuple(x.shape)}")
    extra = sorted(set(saved) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected leaves {', '.join(extra[:8])} (the expected tree has "
                         f"{len(want)} leaves)")


def load_tree(path: str, like, mesh, rules):
    """Reads the tree saved at `path`, each leaf sharded by the logical names in `like`, after check_tree."""
    path = os.path.abspath(path)
    if like is None:
        raise ValueError(f"loading {path} needs the expected tree (Pretrained(path, like=...))")
    check_tree(path, like)
    shardings = shardings_of(like, mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unbox(like), shardings)
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, target)
    finally:
        ckptr.close()
