"""AttentionPooling and SimpleAttentionPooling against pooling written out in
float64, on one device and on batch-sharded meshes of 8 simulated devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxemb.nn.pooling import AttentionPooling, SimpleAttentionPooling
from jaxemb.train.mesh import BATCH_AXES, DEFAULT_RULES, make_mesh


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


# -- the single-query form ------------------------------------------------------------

def _simple_pool_float64(weight, x, mask):
  """ppiseq's AttentionPooling1D: scores x @ w^T + log(mask), softmax over L,
  weighted sum. Rows with no valid position are left to the caller."""
  x = np.asarray(x, np.float64)
  with np.errstate(divide="ignore"):
    s = x @ np.asarray(weight, np.float64)[0] + np.log(mask.astype(np.float64))
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bl,bld->bd", w / w.sum(-1, keepdims=True), x)


def test_simple_pooling_is_the_plain_masked_softmax_formula():
  rng = np.random.default_rng(3)
  B, L, D = 4, 13, 10
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  lengths = jnp.array([13, 1, 7, 0])
  model = SimpleAttentionPooling()
  variables = jax.jit(lambda k: model.init(k, x, lengths=lengths))(jax.random.key(0))
  weight = nn.unbox(variables["params"])["weight"]
  assert weight.shape == (1, D)                     # torch Linear(D, 1).weight
  assert np.abs(np.asarray(weight)).max() <= 1 / np.sqrt(D)
  # Scores of O(10): no 1/sqrt(D) scaling would show as a large error.
  weight = jnp.asarray(rng.normal(size=(1, D)) * 3, jnp.float32)
  out = jax.jit(lambda w, x, l: model.apply({"params": {"weight": w}}, x, lengths=l))(
      weight, x, lengths)
  assert out.shape == (B, D)
  mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
  want = _simple_pool_float64(weight, x[:3], mask[:3])
  np.testing.assert_allclose(np.asarray(out[:3]), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[3]), 0.0)   # empty row: zeros, not NaN
  # The same as the general module with one unscaled query and no projections.
  general = AttentionPooling(num_heads=1, project_kv=False, temperature=1.0)
  np.testing.assert_allclose(
      np.asarray(general.apply({"params": {"query": weight}}, x, lengths=lengths)),
      np.asarray(out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_simple_pooling_of_packed_segments_equals_pooling_each_alone(impl):
  rng = np.random.default_rng(4)
  D, sizes = 6, [[5, 1, 9], [12, 3]]       # two packed rows of 16 and 15 positions
  model = SimpleAttentionPooling(implementation=impl,
                                 interpret="hlo" if impl != "xla" else False)
  weight = jnp.asarray(rng.normal(size=(1, D)), jnp.float32)
  apply = lambda **kw: model.apply({"params": {"weight": weight}}, x, **kw)
  x = jnp.asarray(rng.normal(size=(2, 16, D)), jnp.float32)
  ids = np.full((2, 16), -1, np.int32)
  for b, row in enumerate(sizes):
    ids[b, :sum(row)] = np.repeat(np.arange(len(row)), row)
  packed = np.asarray(jax.jit(lambda: apply(segment_ids=jnp.asarray(ids),
                                            num_segments=3))())
  assert packed.shape == (2, 3, D)
  for b, row in enumerate(sizes):
    start = 0
    for s, n in enumerate(row):
      alone = x[b:b + 1, start:start + n]
      want = _simple_pool_float64(weight, alone, np.ones((1, n), bool))[0]
      got_alone = model.apply({"params": {"weight": weight}}, alone)[0]
      np.testing.assert_allclose(packed[b, s], want, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(packed[b, s], np.asarray(got_alone), rtol=1e-5,
                                 atol=1e-5)
      start += n
  np.testing.assert_array_equal(packed[1, 2], 0.0)          # row 1 has no segment 2


# -- on a mesh --------------------------------------------------------------------------

MESHES = {"data8": {"data": 8}, "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2}}


def _pool_float64(params, x, masks, temperature):
  """jnp float64 pooling of x (B, L, D) under masks (B, S, L): explicit K and V
  when the params have them, one head per query, then the output projection."""
  q = params.get("query", params.get("weight"))
  if "key" in params:
    k = jnp.einsum("bld,dhk->blhk", x, params["key"])
    v = jnp.einsum("bld,dhk->blhk", x, params["value"]) + params["value_bias"]
    scores = jnp.einsum("hk,blhk->bhl", q, k) / temperature
  else:
    v = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (q.shape[0], x.shape[2]))
    scores = jnp.einsum("hd,bld->bhl", q, x) / temperature
  s = jnp.where(masks[:, :, None], scores[:, None], -jnp.inf)       # (B, S, H, L)
  w = jnp.exp(s - jnp.max(s, -1, keepdims=True, initial=-1e300))
  w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-300)
  y = jnp.einsum("bshl,blhk->bshk", w, v)
  y = jnp.where(masks.any(-1)[:, :, None, None], y, 0.0)
  y = y.reshape(y.shape[:2] + (-1,))
  if "out" in params:
    y = y @ params["out"] + params["out_bias"]
  return y


def _case(model_kind, mode, impl, seed):
  rng = np.random.default_rng(seed)
  B, L, D = 8, 20, 8
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  interp = "hlo" if impl != "xla" else False
  if model_kind == "map":
    model = AttentionPooling(num_heads=2, out_features=6, implementation=impl,
                             interpret=interp)
  else:
    model = SimpleAttentionPooling(implementation=impl, interpret=interp)
  if mode == "lengths":
    rows = rng.integers(0, L + 1, B).astype(np.int32)
    rows[:2] = [0, L]
    masks = np.arange(L)[None, None] < rows[:, None, None]
    kw = dict(lengths=jnp.asarray(rows))
  else:
    rows = np.full((B, L), -1, np.int32)
    for b in range(1, B):                 # row 0: all padding
      n = int(rng.integers(1, L + 1))
      rows[b, :n] = np.sort(rng.integers(0, 3, n))
    masks = rows[:, None] == np.arange(3)[None, :, None]
    kw = dict(segment_ids=jnp.asarray(rows), num_segments=3)
  variables = model.init(jax.random.key(seed), x, **kw)
  cot = jnp.asarray(rng.normal(size=jax.eval_shape(
      lambda: model.apply(variables, x, **kw)).shape), jnp.float32)
  return model, variables, x, kw, masks, cot


@pytest.mark.parametrize("mesh_name,model_kind,mode,impl", [
    ("data8", "map", "lengths", "pallas_tpu"),
    ("data8", "simple", "segments", "pallas_gpu"),
    ("d2f2t2", "map", "segments", "pallas_tpu"),
    ("d2f2t2", "simple", "lengths", "pallas_tpu"),
    ("d2f2t2", "map", "lengths", "pallas_gpu"),
    ("d2f2t2", "map", "segments", "xla"),
    ("d2f2t2", "simple", "lengths", "xla"),
])
def test_one_device_and_sharded_mesh_give_same_pooling_and_gradients(
    mesh_name, model_kind, mode, impl):
  """Forward and gradients (params and x) inside jit with in/out shardings on a
  batch-sharded mesh, under the training core's rules, equal one device and the
  float64 reference. On d2f2t2 the MAP head's 2 heads are split over 'tensor'."""
  model, variables, x, kw, masks, cot = _case(model_kind, mode, impl, seed=5)
  rows_key = "lengths" if mode == "lengths" else "segment_ids"
  static = {k: v for k, v in kw.items() if k == "num_segments"}

  def loss(v, x, rows):
    out = model.apply(v, x, **{rows_key: rows}, **static)
    return jnp.sum(out * cot), out

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  one = jax.jit(step)(variables, x, kw[rows_key])

  mesh = make_mesh(MESHES[mesh_name])
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh,
                                           DEFAULT_RULES)
    rows_sh = NamedSharding(mesh, P(BATCH_AXES))
    out_sh = NamedSharding(mesh, P(BATCH_AXES))
    sharded = jax.jit(step, in_shardings=(param_sh, rows_sh, rows_sh),
                      out_shardings=((None, out_sh), (param_sh, rows_sh)))
    many = sharded(variables, x, kw[rows_key])
  assert many[0][1].sharding.spec[0] == BATCH_AXES

  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                       nn.unbox(variables["params"]))
    temperature = 2.0 if model_kind == "map" else 1.0      # sqrt(head_dim 4)
    ref = lambda p, x: jnp.sum(_pool_float64(p, x, masks, temperature)
                               * jnp.asarray(cot, jnp.float64).reshape(
                                   x.shape[0], masks.shape[1], -1))
    want = _pool_float64(p64, jnp.asarray(x, jnp.float64), masks, temperature)
    want_gp, want_gx = jax.grad(ref, argnums=(0, 1))(p64, jnp.asarray(x, jnp.float64))
    want, want_gp, want_gx = jax.device_get((want, want_gp, want_gx))
  if mode == "lengths":
    want = want[:, 0]
  for (_, out), (gv, gx) in (one[0], one[1]), (many[0], many[1]):
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-4, atol=1e-4)
    for k, g in nn.unbox(gv["params"]).items():
      np.testing.assert_allclose(np.asarray(g), want_gp[k], rtol=1e-4, atol=1e-4,
                                 err_msg=k)
  np.testing.assert_allclose(np.asarray(many[0][1]), np.asarray(one[0][1]),
                             rtol=1e-6, atol=1e-6)


def _jaxpr_text(model, variables, x, mesh_shape, num_devices=0):
  fn = lambda v, x: model.apply(v, x)
  if mesh_shape is None:
    return str(jax.make_jaxpr(fn)(variables, x))
  mesh = make_mesh(mesh_shape, num_devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    return str(jax.make_jaxpr(fn)(variables, x))


def test_pallas_is_wrapped_in_shard_map_only_on_a_multi_device_mesh():
  x = jnp.zeros((8, 16, 4))
  kernel = SimpleAttentionPooling(implementation="pallas_tpu", interpret="hlo")
  xla = SimpleAttentionPooling(implementation="xla")
  variables = kernel.init(jax.random.key(0), x)
  assert "shard_map" not in _jaxpr_text(kernel, variables, x, None)
  assert "shard_map" not in _jaxpr_text(kernel, variables, x, {"data": 1}, 1)
  assert "shard_map" in _jaxpr_text(kernel, variables, x, {"data": 8})
  assert "shard_map" not in _jaxpr_text(xla, variables, x, {"data": 8})


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_batch_not_divisible_by_the_batch_axes_is_a_clear_error(impl):
  x = jnp.zeros((6, 16, 4))
  model = SimpleAttentionPooling(implementation=impl,
                                 interpret="hlo" if impl != "xla" else False)
  variables = {"params": nn.unbox(model.init(jax.random.key(0), x)["params"])}
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    with pytest.raises(ValueError, match=r"B=6 of x must be divisible by the 4 devices "
                                         r"of mesh axes \('data', 'fsdp'\).*'batch'"):
      model.apply(variables, x)
