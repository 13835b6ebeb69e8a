"""The Pallas GPU kernels in interpret mode: head tiles, D chunks, split-L, padding,
budgets, precision and tuning knobs, against float64 references.

The generic interpreter NaN-fills outputs and the padding of inputs, so a dx row
or partial a kernel fails to write, or a masked-off element it reads, shows up as
NaN (see test_poison_is_on in test_attention_pool_numerics.py)."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_pool_cases import GRAD_TOL, TOL, make_inputs
from jaxemb.kernels.attention_pool import pallas_gpu, reference, vjp


def _close(actual, want, tol):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  assert not np.isnan(actual).any(), "NaN in output (unwritten or 0/0)"
  scale = max(1.0, float(np.abs(want).max(initial=0)))
  np.testing.assert_allclose(actual, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _kernel_grads(x, q, starts, ends, w, **knobs):
  """out, dx, dq of sum(pool * w) through the GPU kernels (interpret mode)."""
  pool = vjp.make_pool(functools.partial(pallas_gpu.forward, interpret=True, **knobs),
                       functools.partial(pallas_gpu.backward, interpret=True, **knobs))

  def run(x, q):
    out, pullback = jax.vjp(lambda x, q: pool(x, q, starts, ends), x, q)
    return (out,) + pullback(w.astype(out.dtype))

  return jax.jit(run)(x, q)


def _float64_grads(x, q, starts, ends, w):
  """The same from the XLA reference in float64 (x padding rows set to 0)."""
  valid = np.asarray(reference.range_mask(starts, ends, x.shape[1]).any(1))
  x64 = np.where(valid[..., None], np.asarray(x, np.float32), 0.0).astype(np.float64)
  with jax.enable_x64(True):
    q64, w64 = jnp.asarray(q, jnp.float64), jnp.asarray(w, jnp.float64)
    pool = lambda x, q: reference.pool_ranges(x, q, starts, ends)[0]
    out, pullback = jax.jit(lambda x, q: jax.vjp(pool, x, q))(jnp.asarray(x64), q64)
    return [np.asarray(a) for a in (out,) + pullback(w64)]


def _check(got, want, dtype="float32"):
  _close(got[0], want[0], TOL[dtype])
  for g, w in zip(got[1:], want[1:]):
    _close(g, w, GRAD_TOL[dtype])


def _short_segments(rng, B, L, S):
  """(B, L) sorted ids: short segments (1-9 rows, some empty), -1 padding."""
  ids = np.full((B, L), -1, np.int32)
  for b in range(B):
    sizes = rng.integers(0, 10, size=S) * (rng.random(S) > 0.2)
    row = np.repeat(np.arange(S), sizes)[: L - 3]
    ids[b, : row.size] = row
  return ids


def test_two_head_tiles_short_segments_backward():
  """H=20 at D=600 (two head tiles of 16; the backward also chunks D): every
  head tile's dx of a row block is summed before one store. Short packed
  segments put several ranges, and programs, in each block."""
  rng = np.random.default_rng(0)
  B, L, D, H, S = 2, 48, 600, 20, 8
  cfg = pallas_gpu.config(L, D, H, 4, 16, kernel="backward")
  assert cfg.heads_p // cfg.head_tile == 2 and cfg.dim_p // cfg.dim_chunk == 2
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  ids = jnp.asarray(_short_segments(rng, B, L, S))
  starts, ends = reference.ranges_from_segments(ids, S)
  w = jnp.asarray(rng.normal(size=(B, S, H, D)), jnp.float32)
  _check(_kernel_grads(x, q, starts, ends, w, block_l=16),
         _float64_grads(x, q, starts, ends, w))


@pytest.mark.parametrize("knobs", [dict(block_l=16),
                                   dict(block_l=16, dim_chunk=16, sms=1000)],
                         ids=["whole_d", "d_chunks_split_l"])
def test_nan_padding_is_never_read_and_dx_padding_is_zero(knobs):
  """x padding (after each row's last range) is NaN: out, dx and dq still match
  float64, and dx is exactly 0 on every padding row. Rows: full, empty, lengths
  off the block grid, trailing empty segments, ids >= S (not pooled, dx 0)."""
  rng = np.random.default_rng(1)
  B, L, D, H, S = 4, 600, 40, 3, 4
  ids = np.full((B, L), -1, np.int32)
  ids[0] = np.repeat(np.arange(S), L // S)                        # no padding
  ids[2, :37] = np.repeat([0, 1], [20, 17])                       # segments 2, 3 empty
  ids[3, :300] = np.repeat(np.arange(6), 50)                      # ids 4, 5 >= S
  starts, ends = reference.ranges_from_segments(jnp.asarray(ids), S)  # row 1 empty
  pad = np.arange(L)[None, :] >= np.asarray(ends)[:, -1:]
  x = np.where(pad[..., None], np.nan, rng.normal(size=(B, L, D)))
  x = jnp.asarray(x, jnp.float32)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  w = jnp.asarray(rng.normal(size=(B, S, H, D)), jnp.float32)
  got = _kernel_grads(x, q, starts, ends, w, **knobs)
  _check(got, _float64_grads(x, q, starts, ends, w))
  dx = np.asarray(got[1])
  assert pad[3, 200] and pad.sum() > 1000
  assert np.array_equal(dx[pad], np.zeros_like(dx[pad]))
  if "sms" in knobs:
    assert pallas_gpu.num_splits(B, S, 4, L, 16, 1000) == 2


def test_lengths_nan_padding_bfloat16_head_tiles():
  """Lengths mode, bf16, two head tiles: NaN padding, dx 0 there."""
  c = make_inputs(3, 70, 600, 20, "lengths", "bfloat16", 1.0, seed=4)
  lengths = jnp.asarray([70, 0, 33])
  starts, ends = reference.ranges_from_lengths(lengths, 70)
  pad = np.arange(70)[None, :] >= np.asarray(lengths)[:, None]
  x = jnp.where(jnp.asarray(pad)[..., None], jnp.nan, c["x"])
  w = jnp.asarray(c["cotangent"], jnp.float32)
  got = _kernel_grads(x, c["q"], starts, ends, w, block_l=16)
  _check(got, _float64_grads(x, c["q"], starts, ends, w), "bfloat16")
  dx = np.asarray(jnp.asarray(got[1], jnp.float32))
  assert got[1].dtype == jnp.bfloat16 and not dx[pad].any()


def test_split_l_one_long_row():
  """B=1, one long range: split-L (8 chunks of 512 rows) and its LSE merge
  match float64, forward and backward; so does the unsplit kernel (one SM and
  two D chunks per range)."""
  rng = np.random.default_rng(2)
  L, D, H = 4096, 40, 4
  x = jnp.asarray(rng.normal(size=(1, L, D)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D) * 3, jnp.float32)
  starts, ends = reference.ranges_from_lengths(jnp.asarray([L - 100]), L)
  w = jnp.asarray(rng.normal(size=(1, 1, H, D)), jnp.float32)
  assert pallas_gpu.config(L, D, H, 4).block_l == 128
  assert pallas_gpu.num_splits(1, 1, 1, L, 128, 132) == 8
  assert pallas_gpu.num_splits(1, 1, 1, L, 128, 1) == 2
  want = _float64_grads(x, q, starts, ends, w)
  split = _kernel_grads(x, q, starts, ends, w, sms=132)
  _check(split, want)
  assert pallas_gpu.num_splits(1, 1, 2, L, 128, 1) == 1
  single = _kernel_grads(x, q, starts, ends, w, sms=1, block_l=128, dim_chunk=32)
  _check(single, want)


@pytest.mark.parametrize("L,block_l", [(1024, 16), (65536, 16), (65536, 128), (300, 16),
                                       (10**6, 64)])
def test_num_splits_respects_min_chunk(L, block_l):
  """Chunks are at least 256 rows and 4 blocks; the factor is a power of two
  and only as large as the GPU needs."""
  for B, S, per_range, sms in itertools.product((1, 8), (1, 4), (1, 2), (1, 132, 10**4)):
    n = pallas_gpu.num_splits(B, S, per_range, L, block_l, sms)
    assert n & (n - 1) == 0
    assert n == 1 or L // n >= max(256, 4 * block_l)
    assert n == 1 or B * S * per_range * n // 2 < 2 * sms   # no more than needed
  assert pallas_gpu.num_splits(1, 1, 1, 1024, 16, 132) == 4         # not 16 (64 rows)


def _pallas_outputs(fn, *args):
  """Shapes of the outputs of every pallas_call in fn's jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [[v.aval.shape for v in e.outvars] for e in jaxpr.eqns
          if e.primitive.name == "pallas_call"]


def test_partials_are_stored_as_h_by_d():
  """Split-L partials (forward out, lse; backward dq) are H x D, not padded."""
  B, L, D, H, S = 2, 4096, 600, 20, 3
  sds = jax.ShapeDtypeStruct
  x, q = sds((B, L, D), jnp.bfloat16), sds((H, D), jnp.float32)
  st = sds((B, S), jnp.int32)
  fwd = _pallas_outputs(functools.partial(pallas_gpu.forward, sms=132), x, q, st, st)
  cfg = pallas_gpu.config(L, D, H, 2)
  per_range = cfg.heads_p // cfg.head_tile * cfg.dim_p // cfg.dim_chunk
  ns = pallas_gpu.num_splits(B, S, per_range, L, cfg.block_l, 132)
  assert ns > 1 and fwd == [[(B, S, ns, H, D), (B, S, ns, H)]]
  g, lse = sds((B, S, H, D), jnp.float32), sds((B, S, H), jnp.float32)
  bwd = _pallas_outputs(functools.partial(pallas_gpu.backward, sms=132),
                        x, q, st, st, lse, g, lse)
  cfg = pallas_gpu.config(L, D, H, 2, kernel="backward")
  ns = pallas_gpu.num_splits(B, S, cfg.dim_p // cfg.dim_chunk, L, cfg.block_l, 132)
  assert ns > 1 and bwd == [[(B, L, D), (B, S, ns, H, D)]]


BUDGET_SHAPES = list(itertools.product((64, 600, 1280, 2048, 4096), (2, 4), (1, 8, 20)))


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_every_config_fits_the_budgets(kernel):
  """Default and sweep configs for D x dtype x H stay inside the register and
  shared-memory budgets, with D chunks that tile the padded D."""
  for (D, itemsize, H), knobs in itertools.product(
      BUDGET_SHAPES, [{}] + pallas_gpu.sweep_configs()):
    cfg = pallas_gpu.config(4096, D, H, itemsize, kernel=kernel, **knobs)
    regs, smem = pallas_gpu.budget_bytes(kernel, cfg, itemsize)
    reg_limit, smem_limit = pallas_gpu.budget_limits(cfg.num_warps)
    assert regs <= reg_limit and smem <= smem_limit, (D, itemsize, H, knobs, cfg)
    assert reg_limit <= cfg.num_warps * 32 * 255 * 4 and smem_limit <= 163 * 1024
    dc = cfg.dim_chunk
    assert dc & (dc - 1) == 0 and cfg.dim_p % dc == 0 and dc >= min(64, cfg.dim_p)
    assert all(cfg._asdict()[k] == v for k, v in knobs.items())
  # D = 1280 fp32 (padded to 2048) is chunked rather than over budget
  assert pallas_gpu.config(4096, 1280, 8, 4, kernel=kernel).dim_chunk < 2048


def test_over_budget_raises_a_clear_error():
  with pytest.raises(pallas_gpu.BudgetError, match=r"D=64 .* H=8192"):
    pallas_gpu.config(100, 64, 8192, 4, kernel="backward")
  assert not pallas_gpu.fits(100, 64, 8192, 4) and pallas_gpu.fits(100, 64, 8, 4)
  with pytest.raises(pallas_gpu.BudgetError, match="block_l=128"):
    pallas_gpu.config(100, 4096, 8, 4, 128, dim_chunk=4096)


@pytest.mark.parametrize("bad,match", [
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(num_stages=0), "num_stages must be a positive int"),
    (dict(dim_chunk=24), "dim_chunk must be a power of two"),
    (dict(dim_chunk=128), "dim_chunk must be <= the padded D = 64"),
    (dict(precision="tf32"), "precision must be one of"),
])
def test_bad_knobs_are_refused(bad, match):
  x, q = jnp.zeros((1, 20, 40)), jnp.zeros((2, 40))
  st = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match=match):
    pallas_gpu.forward(x, q, st, st + 20, interpret=True, **bad)


def test_sweep_configs():
  sweep = pallas_gpu.sweep_configs()
  assert len(sweep) == 18 and len({tuple(s.items()) for s in sweep}) == 18
  assert {s["block_l"] for s in sweep} == {16, 32, 64}
  assert {s["num_warps"] for s in sweep} == {4, 8}
  assert {s["num_stages"] for s in sweep} == {2, 3, 4}


def test_sweep_knobs_run_and_match_float64():
  """A non-default sweep setting (and its D chunk) computes the same pooling."""
  c = make_inputs(2, 90, 100, 5, "segments", "float32", 1.0, seed=6)
  starts, ends = reference.ranges_from_segments(c["kw"]["segment_ids"], 4)
  w = jnp.asarray(c["cotangent"], jnp.float32)
  knobs = dict(block_l=32, num_warps=4, num_stages=3, dim_chunk=32)
  _check(_kernel_grads(c["x"], c["q"], starts, ends, w, **knobs),
         _float64_grads(c["x"], c["q"], starts, ends, w))


@pytest.mark.parametrize("precision", pallas_gpu.PRECISIONS)
def test_precision_matches_float64(precision):
  """bf16x3 (3 bf16 dots, exact in interpret mode) is within ~1e-5 of float64,
  out and grads; tf32x3 runs as IEEE fp32 in interpret mode (no TF32 on CPU)."""
  c = make_inputs(2, 100, 128, 4, "segments", "float32", 1.0, seed=1)
  starts, ends = reference.ranges_from_segments(c["kw"]["segment_ids"], 4)
  w = jnp.asarray(c["cotangent"], jnp.float32)
  got = _kernel_grads(c["x"], c["q"], starts, ends, w, precision=precision)
  want = _float64_grads(c["x"], c["q"], starts, ends, w)
  tol = dict(rtol=1e-4, atol=1e-4) if precision == "bf16x3" else TOL["float32"]
  for g, wt in zip(got, want):
    _close(g, wt, tol)
  err = np.abs(np.asarray(got[0]) - want[0]).max()
  assert (err > 2e-6) == (precision == "bf16x3")   # bf16x3 really is 3 bf16 passes


def test_no_segments_gives_zeros():
  x, q = jnp.ones((2, 20, 8)), jnp.ones((3, 8))
  st = jnp.zeros((2, 0), jnp.int32)
  out, lse = pallas_gpu.forward(x, q, st, st, interpret=True)
  dx, dq = pallas_gpu.backward(x, q, st, st, lse, out, lse, interpret=True)
  assert out.shape == (2, 0, 3, 8)
  assert not np.asarray(dx).any() and not np.asarray(dq).any()


def test_dispatch_checks_gpu_budgets_before_tracing(monkeypatch):
  """An explicit pallas_gpu that fits no budget is one clear error at the call; 'auto' on a GPU backend
  falls back to XLA with a warning."""
  import warnings
  from jaxemb.kernels.attention_pool import api
  x = jnp.zeros((1, 64, 96), jnp.float32)
  q = jnp.zeros((2, 96), jnp.float32)

  def no_fit(*args, **kwargs):
    raise pallas_gpu.BudgetError("no D chunk fits (test)")

  monkeypatch.setattr(pallas_gpu, "config", no_fit)
  with pytest.raises(ValueError, match="no D chunk fits"):
    api._resolve("pallas_gpu", x, q, None, None, None)
  monkeypatch.setattr(pallas_gpu, "AVAILABLE", True)
  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert api._resolve("auto", x, q, None, None, None) == "xla"
  assert any("budgets" in str(m.message) for m in w)
