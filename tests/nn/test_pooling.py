"""AttentionPooling against multi-head attention pooling written out in float64."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.nn.pooling import AttentionPooling


def _mha_pool_float64(params, x, lengths, temperature):
  """Explicit K and V (no folding), masked softmax per head, concat, out proj."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  k = np.einsum("bld,dhk->blhk", x, p["key"])
  v = np.einsum("bld,dhk->blhk", x, p["value"]) + p["value_bias"]
  s = np.einsum("hk,blhk->bhl", p["query"], k) / temperature
  out = np.zeros((x.shape[0],) + p["query"].shape)
  for b, n in enumerate(lengths):
    if n:
      w = np.exp(s[b, :, :n] - s[b, :, :n].max(-1, keepdims=True))
      out[b] = np.einsum("hl,lhk->hk", w / w.sum(-1, keepdims=True), v[b, :n])
  y = out.reshape(x.shape[0], -1)
  return y @ p["out"] + p["out_bias"]


def test_matches_explicit_multihead_attention():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 17, 12)), jnp.float32)
  lengths = jnp.array([17, 5, 0])
  model = AttentionPooling(num_heads=3, head_dim=4, out_features=6)
  variables = jax.jit(lambda k, x, l: model.init(k, x, lengths=l))(
      jax.random.key(0), x, lengths)
  params = nn.unbox(variables["params"])
  out = jax.jit(lambda v, x, l: model.apply(v, x, lengths=l))(variables, x, lengths)
  assert out.shape == (3, 6)
  want = _mha_pool_float64(params, x, np.asarray(lengths), np.sqrt(4))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  # An empty row pools to zeros, so its output is the output bias.
  np.testing.assert_allclose(np.asarray(out[2]), np.asarray(params["out_bias"]), atol=1e-6)


def test_params_have_logical_axes():
  x = jnp.zeros((2, 8, 12))
  model = AttentionPooling(num_heads=3, out_features=12, mlp_dim=16)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  names = nn.get_partition_spec(variables)["params"]
  assert tuple(names["key"]) == ("embed", "heads", "kv")
  assert tuple(names["query"]) == ("heads", "kv")
  assert tuple(names["mlp_in"]["kernel"]) == ("embed", "mlp")


def test_map_head_segments_and_gradients():
  """MAP head on packed segments: (B, S, F), finite gradients, kernel == XLA."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 40, 16)), jnp.float32)
  ids = jnp.asarray(np.repeat([[0] * 10 + [1] * 25 + [-1] * 5], 2, axis=0))
  make = lambda impl: AttentionPooling(num_heads=2, out_features=16, mlp_dim=32,
                                       learn_temperature=True, implementation=impl,
                                       interpret="hlo" if impl != "xla" else False)
  apply = lambda model, v: model.apply(v, x, segment_ids=ids, num_segments=3)
  variables = jax.jit(lambda k: make("xla").init(k, x, segment_ids=ids,
                                                 num_segments=3))(jax.random.key(0))
  kernel = make("pallas_tpu")
  out = jax.jit(lambda v: apply(kernel, v))(variables)
  assert out.shape == (2, 3, 16)
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(jax.jit(lambda v: apply(make("xla"), v))(variables)),
                             rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda v: jnp.sum(apply(kernel, v) ** 2)))(variables)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.asarray(nn.unbox(grads["params"])["log_temperature"]) != 0


def test_without_projections_pools_x_directly():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
  model = AttentionPooling(num_heads=2, project_kv=False)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(model.apply)(variables, x)
  q = np.asarray(nn.unbox(variables["params"])["query"], np.float64)
  s = np.einsum("bld,hd->bhl", np.asarray(x, np.float64), q) / np.sqrt(8)
  w = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhl,bld->bhd", w / w.sum(-1, keepdims=True), np.asarray(x, np.float64))
  np.testing.assert_allclose(np.asarray(out), want.reshape(2, 16), rtol=1e-5, atol=1e-5)
