"""Bad input gets one clear error naming the argument and what was expected."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.kernels import attention_pool

X = jnp.zeros((2, 6, 4), jnp.float32)
Q = jnp.zeros((3, 4), jnp.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(queries=jnp.zeros((3, 5))), ValueError, r"queries must have shape \(H, D\) with D = 4"),
    (dict(x=jnp.zeros((2, 6))), ValueError, r"x must have shape \(B, L, D\)"),
    (dict(x=jnp.zeros((2, 6, 4), jnp.int32)), TypeError, "x must be a float array"),
    (dict(queries=jnp.zeros((3, 4), jnp.int32)), TypeError, "queries must be a float"),
    (dict(lengths=jnp.array([3, 7])), ValueError, r"lengths must be in \[0, L=6\], got lengths\[1\] = 7"),
    (dict(lengths=jnp.array([-1, 2])), ValueError, r"got lengths\[0\] = -1"),
    (dict(lengths=jnp.array([1.0, 2.0])), TypeError, "lengths must be an integer array"),
    (dict(lengths=jnp.array([1, 2, 3])), ValueError, r"lengths must have shape \(B,\) = \(2,\)"),
    (dict(segment_ids=jnp.array([[0, 0, 1, 0, -1, -1]] * 2)), ValueError,
     "non-decreasing along L so each segment is one contiguous run"),
    (dict(segment_ids=jnp.array([[0, -1, 1, 1, -1, -1]] * 2)), ValueError,
     "padding \\(negative ids\\) must be trailing"),
    (dict(segment_ids=jnp.array([[0, 1, 2, 2, -1, -1]] * 2), num_segments=2), ValueError,
     "id 2 >= num_segments = 2"),
    (dict(segment_ids=jnp.zeros((2, 6), jnp.float32)), TypeError, "segment_ids must be an integer"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), ValueError, r"segment_ids must have shape \(B, L\)"),
    (dict(segment_ids=jnp.zeros((2, 6), jnp.int32), lengths=jnp.array([1, 1])), ValueError,
     "either lengths or segment_ids"),
    (dict(temperature=0.0), ValueError, r"temperature must be >= 1.175e-38 .*got 0"),
    (dict(temperature=-2.0), ValueError, "temperature must be >= 1.175e-38"),
    (dict(temperature=float("nan")), ValueError, "temperature must be >= 1.175e-38"),
    (dict(temperature=1e-45), ValueError, r"smallest normal float32.*got 1e-45"),
    (dict(temperature=jnp.float32(1e-45)), ValueError, "temperature must be >= 1.175e-38"),
    (dict(queries=jnp.full((3, 4), 1e3), temperature=1.2e-38), ValueError,
     r"queries / temperature must be finite in float32; got temperature 1.2e-38"),
    (dict(value_bias=jnp.zeros((3, 4))), ValueError, "value_bias needs value_weight"),
    (dict(block_l=0), ValueError, "block_l must be a positive int"),
    (dict(block_l=-128, implementation="pallas_tpu"), ValueError,
     "block_l must be a positive int"),
    (dict(block_l=16.0), ValueError, "block_l must be a positive int"),
    (dict(block_l=True), ValueError, "block_l must be a positive int"),
    (dict(block_l=48, implementation="pallas_gpu"), ValueError,
     "block_l for pallas_gpu must be a power of two >= 16"),
    (dict(block_l=64, implementation="pallas_tpu"), ValueError,
     "block_l for pallas_tpu must be a multiple of 128"),
    (dict(temperature=jnp.ones(2)), ValueError, "temperature must be a scalar"),
    (dict(key_weight=jnp.zeros((4, 3, 2))), ValueError, r"key_weight must have shape \(D, H, K\)"),
    (dict(value_weight=jnp.zeros((4, 2, 5))), ValueError, "value_weight must have shape"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of"),
    (dict(x=jnp.zeros((2, 6, 4), jnp.float16), implementation="pallas_tpu"), TypeError,
     "supports x of dtype float32 or bfloat16"),
    (dict(backward="fast", implementation="pallas_gpu"), ValueError,
     "backward must be 'kernel' or 'xla'"),
])
def test_bad_input(kwargs, error, match):
  args = dict(x=X, queries=Q)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    attention_pool(args.pop("x"), args.pop("queries"), **args)


def test_traced_segment_ids_need_num_segments():
  with pytest.raises(ValueError, match="num_segments must be given"):
    jax.jit(lambda ids: attention_pool(X, Q, segment_ids=ids))(jnp.zeros((2, 6), jnp.int32))


def test_under_jit_lengths_are_clipped():
  """Values cannot be checked under jit: lengths are clipped to [0, L] instead."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 4)), jnp.float32)
  out = jax.jit(lambda l: attention_pool(x, Q, lengths=l))(jnp.array([-3, 9]))
  want = attention_pool(x, Q, lengths=jnp.array([0, 6]))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
