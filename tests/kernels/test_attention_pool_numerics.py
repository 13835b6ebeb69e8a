"""Kernels (interpret mode) and the XLA path against a float64 reference.

Interpreted Pallas outputs start as NaN (InterpretParams(uninitialized_memory=
"nan") for the TPU kernel; the generic interpreter NaN-fills float outputs), so an
element a kernel fails to write fails the comparison; test_poison_is_on checks that.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention_pool_cases import GRAD_TOL, TOL, cases, expected, make_inputs
from jaxemb.kernels import attention_pool
from jaxemb.kernels.attention_pool import pallas_gpu, pallas_tpu, reference

POISON = pltpu.InterpretParams(uninitialized_memory="nan")
INTERPRET = {"xla": False, "pallas_tpu": POISON, "pallas_gpu": True}


def _close(actual, want, tol, scale=None):
  """|actual - want| <= atol * max(1, scale) + rtol * |want|; scale defaults to
  max |want| (errors of reductions grow with the size of what was summed)."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  assert not np.isnan(actual).any(), "NaN in output (unwritten or 0/0)"
  if scale is None:
    scale = float(np.abs(want).max(initial=0))
  scale = max(1.0, scale)
  np.testing.assert_allclose(actual, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _run(c, impl, **extra):
  fn = lambda x, q, kw: attention_pool(x, q, temperature=c["temperature"],
                                       implementation=impl, interpret=INTERPRET[impl],
                                       **kw, **extra)
  if "num_segments" in c["kw"]:
    fn = functools.partial(fn, kw=c["kw"])
    return jax.jit(lambda x, q: fn(x, q))(c["x"], c["q"])
  return jax.jit(fn)(c["x"], c["q"], c["kw"])


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
@settings(max_examples=6, deadline=None)
@given(c=cases())
def test_forward_matches_float64(impl, c):
  out = _run(c, impl)
  assert out.dtype == c["x"].dtype
  _close(out, expected(c), TOL[c["dtype"]])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("shape", [
    (2, 1, 8, 1, "lengths"),       # L = 1
    (3, 130, 40, 64, "lengths"),   # H = 64, L not a block multiple
    (2, 257, 8, 5, "segments"),    # several segments per block
])
def test_forward_edge_shapes(impl, shape):
  B, L, D, H, mode = shape
  c = make_inputs(B, L, D, H, mode, "float32", 0.5, seed=L + H)
  _close(_run(c, impl, block_l=128 if impl == "pallas_tpu" else 16), expected(c),
         TOL["float32"])


def test_gpu_kernel_split_l_and_head_tiles():
  """Split-L merge (sms=1 vs many) and several head tiles (H=20 at D=600)."""
  c = make_inputs(2, 200, 600, 20, "segments", "float32", 1.0, seed=3)
  q = c["q"]
  starts, ends = reference.ranges_from_segments(c["kw"]["segment_ids"], 4)
  want = np.asarray(reference.pool_ranges(c["x"], q, starts, ends)[0])
  for sms in (1, 1000):
    out, lse = pallas_gpu.forward(c["x"], q, starts, ends, block_l=16,
                                  interpret=True, sms=sms)
    _close(out, want, TOL["float32"])
  assert pallas_gpu.config(200, 600, 20, 4)[1:4] == (16, 1024, 32)  # 2 head tiles


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_lse_matches_float64(impl):
  c = make_inputs(2, 150, 8, 3, "segments", "float32", 1.0, seed=11)
  starts, ends = reference.ranges_from_segments(c["kw"]["segment_ids"], 4)
  mod = pallas_tpu if impl == "pallas_tpu" else pallas_gpu
  _, lse = mod.forward(c["x"], c["q"], starts, ends, interpret=INTERPRET[impl])
  with jax.enable_x64(True):
    _, want = reference.pool_ranges(jnp.asarray(c["x"], jnp.float64),
                                    jnp.asarray(c["q"], jnp.float64), starts, ends)
    want = np.asarray(want)
  lse = np.asarray(lse)
  assert np.array_equal(np.isinf(lse), np.isinf(want))    # -inf exactly when empty
  _close(np.where(np.isinf(want), 0, lse), np.where(np.isinf(want), 0, want),
         TOL["float32"])


def _grads(c, impl, **extra):
  w = jnp.asarray(c["cotangent"])
  if c["mode"] == "lengths":
    w = w[:, 0]

  def loss(x, q, t):
    out = attention_pool(x, q, temperature=t, implementation=impl,
                         interpret=INTERPRET[impl], **c["kw"], **extra)
    return jnp.sum(out.astype(w.dtype) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      c["x"], c["q"], jnp.float32(c["temperature"]))


def _grads_float64(c):
  with jax.enable_x64(True):
    c64 = dict(c, x=jnp.asarray(c["x"], jnp.float64), q=jnp.asarray(c["q"], jnp.float64),
               cotangent=np.asarray(c["cotangent"], np.float64))
    w = jnp.asarray(c64["cotangent"])
    if c["mode"] == "lengths":
      w = w[:, 0]
    loss = lambda x, q, t: jnp.sum(attention_pool(
        x, q, temperature=t, implementation="xla", **c["kw"]) * w)
    return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        c64["x"], c64["q"], jnp.float64(c["temperature"]))]


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
@settings(max_examples=4, deadline=None)
@given(c=cases(max_l=200, dims=(8, 40), heads=(1, 3, 16)))
def test_custom_vjp_matches_float64_grad(impl, c):
  got = _grads(c, impl)
  want = _grads_float64(c)
  assert got[0].dtype == c["x"].dtype
  tol = GRAD_TOL[c["dtype"]]
  _close(got[0], want[0], tol)
  _close(got[1], want[1], tol)
  # d/dtemperature = -sum(dq * q) / t cancels heavily: its error is relative to
  # the sum of the absolute terms, not to the (possibly tiny) result.
  terms = np.abs(want[1] * np.asarray(c["q"], np.float64)).sum() / c["temperature"]
  _close(got[2], want[2], tol, scale=terms)


def test_gpu_backward_head_tiles():
  """H=20 at D=600 runs two head tiles; dx is accumulated across them."""
  c = make_inputs(2, 70, 600, 20, "lengths", "float32", 1.0, seed=5)
  got = _grads(c, "pallas_gpu", block_l=16)
  for g, w in zip(got, _grads_float64(c)):
    _close(g, w, GRAD_TOL["float32"])


def test_backward_xla_fallback():
  c = make_inputs(2, 50, 8, 2, "segments", "float32", 1.0, seed=7)
  for g, w in zip(_grads(c, "pallas_tpu", backward="xla"), _grads_float64(c)):
    _close(g, w, GRAD_TOL["float32"])


def test_fully_masked_rows_are_zero_not_nan():
  x = jnp.ones((2, 20, 8), jnp.float32)
  q = jnp.ones((3, 8), jnp.float32)
  lengths = jnp.array([0, 5])
  for impl in INTERPRET:
    pool = lambda x: attention_pool(x, q, lengths=lengths, implementation=impl,
                                    interpret=INTERPRET[impl])
    out = jax.jit(pool)(x)
    assert np.array_equal(np.asarray(out[0]), np.zeros((3, 8)))
    g = jax.jit(jax.grad(lambda x: pool(x).sum()))(x)
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g[0]).any()


def test_poison_is_on():
  """An element a kernel does not write comes back NaN in both interpreters."""
  def half(o_ref):
    o_ref[:8] = jnp.zeros((8, 128), jnp.float32)

  shape = jax.ShapeDtypeStruct((16, 128), jnp.float32)
  for interpret in (True, POISON):
    out = np.asarray(pl.pallas_call(half, out_shape=shape, interpret=interpret)())
    assert not out[:8].any() and np.isnan(out[8:]).all()


@pytest.mark.parametrize("impl", INTERPRET)
def test_empty_sequence_gives_zeros(impl):
  """L = 0: every row is empty, so every path returns zeros, with zero gradients."""
  rng = np.random.default_rng(1)
  x = jnp.zeros((2, 0, 8), jnp.float32)
  q = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  proj = dict(value_weight=jnp.asarray(rng.normal(size=(8, 3, 5)), jnp.float32),
              value_bias=jnp.asarray(rng.normal(size=(3, 5)), jnp.float32))
  for kw, shape in [({}, (2, 3, 8)), (dict(lengths=jnp.zeros(2, jnp.int32)), (2, 3, 8)),
                    (dict(segment_ids=jnp.zeros((2, 0), jnp.int32), num_segments=2),
                     (2, 2, 3, 8)), (proj, (2, 3, 5))]:
    pool = lambda q, kw=kw: attention_pool(x, q, implementation=impl,
                                           interpret=INTERPRET[impl], **kw)
    out = np.asarray(jax.jit(pool)(q))
    assert out.shape == shape and not out.any() and not np.isnan(out).any()
    g = np.asarray(jax.jit(jax.grad(lambda q: pool(q).sum()))(q))
    assert np.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("impl", INTERPRET)
def test_traced_bad_temperature_is_nan_on_every_path(impl):
  """Under jit a temperature cannot be refused: one that is not >= the smallest
  normal float32, or that makes queries / temperature overflow, gives an all-NaN
  output on every path; a good traced temperature matches the reference."""
  c = make_inputs(2, 40, 8, 3, "segments", "float32", 0.5, seed=2)
  pool = jax.jit(lambda x, q, t: attention_pool(
      x, q, temperature=t, implementation=impl, interpret=INTERPRET[impl], **c["kw"]))
  for q, t in [(c["q"], 0.0), (c["q"], -1.0), (c["q"], np.nan), (c["q"], 1e-45),
               (c["q"] + 1e3, 1.2e-38)]:
    out = np.asarray(pool(c["x"], q, jnp.float32(t)))
    assert np.isnan(out).all(), (t, out)
  _close(pool(c["x"], c["q"], jnp.float32(0.5)), expected(c), TOL["float32"])
