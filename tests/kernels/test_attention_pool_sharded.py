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
from jaxemb.kernels import attention_pool, attention_pool_sharded
from jaxemb.kernels.attention_pool import reference

AUTO3 = (jax.sharding.AxisType.Auto,) * 3


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


@pytest.mark.parametrize("mode", ["lengths", "segments"])
def test_active_mesh_with_heads_split_matches_float64(mode):
  """mesh=None takes the jax.set_mesh mesh; rows over (data, fsdp), the 4 heads
  (queries, key/value projections, output) over tensor."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=AUTO3)
  c = make_inputs(4, 24, 8, 4, mode, "float32", 1.0, seed=2)
  rng = np.random.default_rng(3)
  arrays = dict(q=np.asarray(rng.normal(size=(4, 3))),
                key_weight=rng.normal(size=(8, 4, 3)) / 3,
                value_weight=rng.normal(size=(8, 4, 5)), value_bias=rng.normal(size=(4, 5)))
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  kw = dict(c["kw"])
  S = kw.pop("num_segments", None)
  rows_key, rows = next(iter(kw.items()))
  cot = jnp.asarray(rng.normal(size=(4,) + ((S,) if S else ()) + (4, 5)), jnp.float32)

  def loss(a, x, impl, **extra):
    out = impl(x, a["q"], key_weight=a["key_weight"], value_weight=a["value_weight"],
               value_bias=a["value_bias"], num_segments=S, temperature=1.5,
               **{rows_key: rows}, **extra)
    return jnp.sum(out * cot.astype(out.dtype)), out

  sharded = lambda a, x: loss(a, x, attention_pool_sharded, axis=("data", "fsdp"),
                              head_axis="tensor", implementation="pallas_gpu",
                              interpret="hlo")
  with jax.set_mesh(mesh):
    (_, out), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1),
                                                 has_aux=True))(f32, c["x"])
  assert out.sharding.spec[:3] == ((("data", "fsdp"), None, "tensor") if S else
                                   (("data", "fsdp"), "tensor"))
  with jax.enable_x64(True):
    a64 = {k: jnp.asarray(v, jnp.float64) for k, v in arrays.items()}
    x64 = jnp.asarray(np.asarray(c["x"]), jnp.float64)
    ref = lambda a, x: loss(a, x, attention_pool, implementation="xla")
    (_, want), want_g = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(a64, x64)
    want, want_g = jax.device_get((want, want_g))
  np.testing.assert_allclose(np.asarray(out), want, **TOL["float32"])
  for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-4, atol=1e-4)


def test_sharded_rejects_indivisible_batch():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="B=6 of x must be divisible by the 8 devices"):
    attention_pool_sharded(jnp.zeros((6, 4, 2)), jnp.zeros((1, 2)), mesh=mesh)


def test_sharded_rejects_bad_head_axis_unknown_axis_and_missing_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=AUTO3)
  x, q = jnp.zeros((4, 4, 2)), jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="H=3 of queries must be divisible by the 2"):
    attention_pool_sharded(x, q, mesh=mesh, head_axis="tensor")
  with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not in the mesh"):
    attention_pool_sharded(x, q, mesh=mesh, axis="model")
  with pytest.raises(ValueError, match="no mesh given and none is active"):
    attention_pool_sharded(x, q)
