"""Batch-sharded attention pooling: Pallas calls are not auto-partitioned by XLA,
so the call is wrapped in ``jax.shard_map`` over the batch axis of a mesh."""

import jax
from jax.sharding import PartitionSpec as P

from kernels.attention_pool import api


def attention_pool_sharded(x, queries, *, mesh, axis="data", lengths=None,
                           segment_ids=None, num_segments=None, key_weight=None,
                           value_weight=None, value_bias=None, temperature=1.0,
                           **kwargs):
  """``attention_pool`` with x, lengths and segment_ids split along B over the mesh
  axis (or tuple of axes) ``axis``; queries, projection weights and temperature are
  replicated. B must be divisible by the size of ``axis``. Works inside jit; the
  output is sharded along B the same way. Other keyword arguments (implementation,
  interpret, block_l, backward) go to ``attention_pool``. Gradients of replicated
  arguments are summed over the shards by shard_map's transpose.
  """
  if segment_ids is not None and num_segments is None:
    num_segments = api._check_segments(segment_ids, None, x.shape[0], x.shape[1])
  size = 1
  for a in (axis if isinstance(axis, tuple) else (axis,)):
    size *= mesh.shape[a]
  if x.shape[0] % size:
    raise ValueError(f"batch {x.shape[0]} of x must be divisible by the {size} "
                     f"devices of mesh axis {axis!r}")
  shared = dict(queries=queries, key_weight=key_weight, value_weight=value_weight,
                value_bias=value_bias, temperature=temperature)
  per_row = dict(x=x, lengths=lengths, segment_ids=segment_ids)

  def local(per_row, shared):
    return api.attention_pool(per_row["x"], shared.pop("queries"),
                              lengths=per_row["lengths"],
                              segment_ids=per_row["segment_ids"],
                              num_segments=num_segments, **shared, **kwargs)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis),
                     check_vma=False)
  return fn(per_row, shared)
