"""Attention pooling over a device mesh. Pallas calls are not auto-partitioned by
XLA, so the call is wrapped in ``jax.shard_map``: rows split along B over the batch
mesh axes, heads optionally split over other axes, everything else replicated."""
import math

import jax
from jax.sharding import PartitionSpec as P

from . import api


def attention_pool_sharded(x, queries, *, mesh=None, axis="data", head_axis=None,
                           lengths=None, segment_ids=None, num_segments=None,
                           key_weight=None, value_weight=None, value_bias=None,
                           temperature=1.0, **kwargs):
  """``attention_pool`` inside ``jax.shard_map``; works eagerly and inside jit.

  Args:
    mesh: a Mesh or AbstractMesh; None takes the active one (``jax.set_mesh``).
    axis: mesh axis name, tuple of names, or None: x, lengths and segment_ids are
      split along B over it, and so is the output. B must be divisible by its size.
    head_axis: mesh axis name, tuple of names, or None: queries, key_weight,
      value_weight, value_bias and the output are split along H over it (every
      head is pooled independently). H must be divisible by its size.
    Other arguments are those of ``attention_pool`` (implementation, interpret,
    block_l, backward go through kwargs). Inputs not split over a mesh axis are
    replicated over it; gradients of replicated arguments are summed over the
    shards by shard_map's transpose. With Pallas kernels in interpret mode on
    simulated devices use interpret="hlo" (see ``attention_pool``).

  Returns:
    As ``attention_pool``: (B, H, Dv), or (B, S, H, Dv) with segment_ids.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError("attention_pool_sharded: no mesh given and none is active; "
                       "pass mesh= or call it under jax.set_mesh(mesh)")
  if getattr(x, "ndim", None) != 3:
    raise ValueError(f"x must have shape (B, L, D), got {getattr(x, 'shape', x)}")
  if getattr(queries, "ndim", None) != 2:
    raise ValueError(f"queries must have shape (H, D) or (H, K), "
                     f"got {getattr(queries, 'shape', queries)}")
  if segment_ids is not None and num_segments is None:
    num_segments = api._check_segments(segment_ids, None, x.shape[0], x.shape[1])
  _check_divisible("batch", "B", x.shape[0], "x", mesh, axis)
  _check_divisible("heads", "H", queries.shape[0], "queries", mesh, head_axis)

  # None entries are dropped: shard_map specs must match the argument trees.
  shared = _present(queries=(queries, P(head_axis)),
                    key_weight=(key_weight, P(None, head_axis)),
                    value_weight=(value_weight, P(None, head_axis)),
                    value_bias=(value_bias, P(head_axis)),
                    temperature=(temperature, P()))
  per_row = _present(x=(x, P(axis)), lengths=(lengths, P(axis)),
                     segment_ids=(segment_ids, P(axis)))
  out_spec = (P(axis, None, head_axis) if segment_ids is not None
              else P(axis, head_axis))

  def local(rows, shared):
    shared = dict(shared)
    return api.attention_pool(rows.pop("x"), shared.pop("queries"),
                              num_segments=num_segments, **rows, **shared, **kwargs)

  specs = tuple({k: s for k, (_, s) in d.items()} for d in (per_row, shared))
  fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec,
                     check_vma=False)
  return fn({k: v for k, (v, _) in per_row.items()},
            {k: v for k, (v, _) in shared.items()})


def axis_size(mesh, axis):
  """Number of devices along mesh axis ``axis`` (a name, tuple of names or None)."""
  names = () if axis is None else axis if isinstance(axis, tuple) else (axis,)
  unknown = [a for a in names if a not in mesh.shape]
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not in the mesh {dict(mesh.shape)}")
  return math.prod(mesh.shape[a] for a in names)


def kernel_implementation(implementation, x, queries, *, segment_ids=None,
                          num_segments=None, block_l=None):
  """The implementation ``attention_pool`` will run ("xla", "pallas_tpu" or
  "pallas_gpu") for these inputs; checks x and queries as it does."""
  return api._resolve(implementation, x, queries, num_segments, segment_ids,
                      block_l)


def _check_divisible(what, dim, n, name, mesh, axis):
  size = axis_size(mesh, axis)
  if n % size:
    raise ValueError(f"{what} size {dim}={n} of {name} must be divisible by the {size} "
                     f"devices of mesh axis {axis!r} it is split over "
                     f"(mesh {dict(mesh.shape)})")


def _present(**items):
  return {k: (v, s) for k, (v, s) in items.items() if v is not None}
