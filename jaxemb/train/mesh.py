"""Device mesh and logical-axis sharding rules.

The mesh has named axes (data, fsdp, tensor). Models name the axes of their parameters and activations
logically ('batch', 'embed', 'mlp', ...); `rules` map logical names to mesh axes, so the same model runs
unchanged on one CPU, on 8 simulated devices, on a GPU or on a TPU pod.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data and fsdp axes

# Logical axis -> mesh axis. FSDP shards the model dimension of every weight matrix; tensor parallelism
# shards heads, MLP and vocabulary dimensions.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    ("entities", ("fsdp", "tensor")),
)


def make_mesh(shape: dict, num_devices: int = 0) -> Mesh:
    """Builds a Mesh with axes (data, fsdp, tensor). One axis size may be -1 (takes the rest).

    `num_devices` > 0 uses only the first that many devices (e.g. a 1-device mesh on an 8-device host).
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are visible")
        devices = devices[:num_devices]
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh.shape may have at most one -1 axis, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    if num_devices:
        grid = np.asarray(devices, dtype=object).reshape(sizes)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding for an array whose leading axis is the global batch."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rules_from_config(rules) -> tuple:
    """Config rules are lists like [['batch', ['data', 'fsdp']], ['kv', None]]; returns hashable tuples."""
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be [logical_name, mesh_axis or list or None]")
        name, axes = item
        if isinstance(axes, (list, tuple)):
            bad = [a for a in axes if a not in MESH_AXES]
            axes = tuple(axes)
        else:
            bad = [axes] if axes is not None and axes not in MESH_AXES else []
        if bad:
            raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {bad}; mesh axes: {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)
