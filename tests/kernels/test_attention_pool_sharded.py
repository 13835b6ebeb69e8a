"""shard_map wrapper on 8 simulated CPU devices, inside a batch-sharded jit.

The kernels run in the generic interpreter (interpret="hlo"): the TPU interpreter
keeps cross-device state and was seen to hang inside shard_map on simulated devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from attention_pool_cases import TOL, make_inputs, np_pool
from kernels import attention_pool_sharded
from kernels.attention_pool import reference


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("mode", ["lengths", "segments"])
def test_sharded_matches_reference(impl, mode):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  c = make_inputs(8, 40, 16, 3, mode, "float32", 0.7, seed=1)
  x = jax.device_put(c["x"], NamedSharding(mesh, P("data")))
  kw = dict(c["kw"])
  S = kw.pop("num_segments", None)

  @jax.jit
  def run(x, q, rows):
    key = "segment_ids" if S else "lengths"
    return attention_pool_sharded(x, q, mesh=mesh, axis="data", num_segments=S,
                                  temperature=0.7, implementation=impl,
                                  interpret="hlo" if impl != "xla" else False,
                                  **{key: rows})

  rows = next(iter(kw.values()))
  out = run(x, c["q"], rows)
  assert out.sharding.spec[0] == "data"
  want = np_pool(c["x"], c["q"], temperature=0.7, **c["kw"])
  np.testing.assert_allclose(np.asarray(out), want if S else want[:, 0],
                             **TOL["float32"])

  # Gradients of the replicated queries are summed over the shards.
  grad = jax.jit(jax.grad(lambda q: run(x, q, rows).sum()))(c["q"])
  starts, ends = (reference.ranges_from_segments(rows, S) if S
                  else reference.ranges_from_lengths(rows, 40))
  ref = lambda q: reference.pool_ranges(c["x"], q / 0.7, starts, ends)[0].sum()
  want_g = jax.jit(jax.grad(ref))(c["q"])
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_g), rtol=1e-4, atol=1e-4)


def test_sharded_rejects_indivisible_batch():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    attention_pool_sharded(jnp.zeros((6, 4, 2)), jnp.zeros((1, 2)), mesh=mesh)
